//! Who gets the next free slot: the dispatcher's fairness, as plain data and pure functions.
//!
//! Each model's slots are shared on their own: each free slot of a model goes to the tenant
//! that has been served the fewest request lines *on that model*, and within a tenant to the
//! batch with the earliest deadline (then the oldest). A tenant heavy on one model is not held
//! back on another, where it may be the lightest. A tenant that becomes active on a model
//! starts at the current minimum of that model's active tenants (virtual-time fair queuing),
//! so it neither starves the others with an old low count nor waits behind their history; a
//! tenant with no work left on a model is forgotten there.
//!
//! The accounts survive a scheduler restart: the [`Dispatcher`](super::Dispatcher) loads them
//! from the metadata store ([`Fairness::from_accounts`]) before its first round and saves them
//! ([`Fairness::accounts`]) after each round that changed them, in one write. They are kept
//! rather than derived from the chunks because virtual time is not in the chunks: the lines a
//! tenant's running batches were handed out would put a newcomer back at zero after a restart
//! (starving the others until it caught up), and the offset it started at is exactly what
//! would have to be stored. Both costs are bounded by the live work, never by history: the
//! accounts hold one row per model and active tenant (an idle tenant's row is deleted), read
//! once per process and rewritten whole per changing round. A crash between a claim and the
//! save forgets at most that round's lines, which only shifts the order of later slots.
//!
//! Nothing here touches the metadata store or the queue: the [`Dispatcher`](super::Dispatcher)
//! claims and publishes what [`Fairness::pick`] chooses, reports it back with
//! [`Fairness::record`], and stores the accounts.

use std::collections::HashMap;

use nightshift_core::TenantId;
use nightshift_metadata::{DispatchAccount, DispatchCandidate};

/// Request lines handed out per model to each tenant active on it, in virtual time.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Fairness {
    /// Per model, lines handed out per tenant that had work waiting on it at the last
    /// [`Fairness::admit`] (or at the save this was loaded from).
    served: HashMap<String, HashMap<TenantId, u64>>,
}

impl Fairness {
    /// The accounts as saved: `accounts` as [`Fairness::accounts`] returned them.
    pub(crate) fn from_accounts(accounts: Vec<DispatchAccount>) -> Self {
        let mut fairness = Self::default();
        for a in accounts {
            fairness
                .served
                .entry(a.model)
                .or_default()
                .insert(a.tenant, a.served);
        }
        fairness
    }

    /// Every account, to save, ordered by model then tenant.
    pub(crate) fn accounts(&self) -> Vec<DispatchAccount> {
        let mut accounts: Vec<DispatchAccount> = self
            .served
            .iter()
            .flat_map(|(model, tenants)| {
                tenants.iter().map(|(tenant, served)| DispatchAccount {
                    model: model.clone(),
                    tenant: tenant.clone(),
                    served: *served,
                })
            })
            .collect();
        accounts.sort();
        accounts
    }

    /// Starts a round over `candidates` (every model's): on each model, tenants with work
    /// waiting are counted, a newcomer (or one that fell behind) at the current minimum among
    /// them; tenants without are forgotten there, and models without any.
    pub(crate) fn admit(&mut self, candidates: &[DispatchCandidate]) {
        let mut active: HashMap<&str, Vec<&TenantId>> = HashMap::new();
        for c in candidates.iter().filter(|c| c.pending > 0) {
            active
                .entry(model_of(c))
                .or_default()
                .push(&c.batch.tenant_id);
        }
        self.served
            .retain(|model, _| active.contains_key(model.as_str()));
        for (model, tenants) in active {
            let served = self.served.entry(model.to_owned()).or_default();
            let floor = tenants
                .iter()
                .filter_map(|t| served.get(*t).copied())
                .min()
                .unwrap_or(0);
            for t in &tenants {
                let v = served.entry((*t).clone()).or_insert(floor);
                *v = (*v).max(floor);
            }
            served.retain(|t, _| tenants.contains(&t));
        }
    }

    /// The index in `candidates` (one model's) of the batch that gets the next free slot:
    /// the tenant least served on that model with work, then its earliest deadline, then its
    /// oldest batch; the first of equals. `None` when no candidate has a chunk pending.
    pub(crate) fn pick(&self, candidates: &[DispatchCandidate]) -> Option<usize> {
        candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| c.pending > 0)
            .min_by_key(|(_, c)| {
                (
                    self.served(model_of(c), &c.batch.tenant_id),
                    c.batch.expires_at,
                    c.batch.created_at_us,
                )
            })
            .map(|(i, _)| i)
    }

    /// Counts `lines` of `model` handed out to `tenant`.
    pub(crate) fn record(&mut self, model: &str, tenant: &TenantId, lines: u32) {
        *self
            .served
            .entry(model.to_owned())
            .or_default()
            .entry(tenant.clone())
            .or_default() += u64::from(lines);
    }

    /// Lines of `model` handed out to `tenant` since it became active on it.
    pub(crate) fn served(&self, model: &str, tenant: &TenantId) -> u64 {
        self.served
            .get(model)
            .and_then(|tenants| tenants.get(tenant))
            .copied()
            .unwrap_or(0)
    }
}

/// The model a candidate's chunks run on (`""` for a batch without one: never, once running).
fn model_of(c: &DispatchCandidate) -> &str {
    c.batch.model.as_deref().unwrap_or_default()
}

/// Free slots of a model whose `candidates` have chunks in flight: under `max_in_flight`
/// chunks handed out and not done, and under `max_queued` of them not yet started (0: no such
/// bound). The second bound is the dispatcher's lookahead: a task published to the queue is
/// served in order, so the fewer wait there, the sooner a newly arrived batch's first chunk,
/// which the fair pick puts first, starts.
pub(crate) fn free_slots(
    max_in_flight: u32,
    max_queued: u32,
    candidates: &[DispatchCandidate],
) -> u32 {
    let in_flight: u32 = candidates.iter().map(|c| c.in_flight).sum();
    let free = max_in_flight.saturating_sub(in_flight);
    if max_queued == 0 {
        return free;
    }
    let queued: u32 = candidates.iter().map(|c| c.queued).sum();
    free.min(max_queued.saturating_sub(queued))
}

/// `candidates` grouped by model, each group in the order given.
pub(crate) fn by_model(
    candidates: Vec<DispatchCandidate>,
) -> HashMap<String, Vec<DispatchCandidate>> {
    let mut by_model: HashMap<String, Vec<DispatchCandidate>> = HashMap::new();
    for c in candidates {
        by_model.entry(model_of(&c).to_owned()).or_default().push(c);
    }
    by_model
}

#[cfg(test)]
mod tests {
    use nightshift_core::BatchId;
    use nightshift_core::batch::{BatchRecord, BatchStatus, RequestCounts};

    use super::*;

    fn tenant(n: u8) -> TenantId {
        TenantId::parse(&format!("tenant_{n:0>24}")).expect("tenant id")
    }

    /// A batch of tenant `t` with `pending` chunks waiting, due at `expires_at`.
    fn candidate(t: u8, pending: u32, expires_at: i64) -> DispatchCandidate {
        DispatchCandidate {
            batch: BatchRecord {
                id: BatchId::generate(),
                tenant_id: tenant(t),
                endpoint: "/v1/chat/completions".into(),
                input_file_id: "file-x".into(),
                completion_window: "24h".into(),
                status: BatchStatus::InProgress,
                model: Some("m".into()),
                errors: vec![],
                metadata: None,
                output_expires_after_secs: 3600,
                output_file_id: None,
                error_file_id: None,
                created_at_us: 1,
                in_progress_at: None,
                expires_at,
                finalizing_at: None,
                completed_at: None,
                failed_at: None,
                expired_at: None,
                cancelling_at: None,
                cancelled_at: None,
                request_counts: RequestCounts::default(),
                usage: Default::default(),
                traceparent: None,
            },
            in_flight: 0,
            queued: 0,
            pending,
        }
    }

    /// Hands out `slots` chunks of `lines` lines each, as the dispatcher does; returns the
    /// tenant of each.
    fn hand_out(
        fairness: &mut Fairness,
        candidates: &mut [DispatchCandidate],
        slots: usize,
        lines: u32,
    ) -> Vec<TenantId> {
        let mut order = vec![];
        for _ in 0..slots {
            let Some(i) = fairness.pick(candidates) else {
                break;
            };
            candidates[i].pending -= 1;
            let c = &candidates[i].batch;
            fairness.record(c.model.as_deref().expect("a model"), &c.tenant_id, lines);
            order.push(candidates[i].batch.tenant_id.clone());
        }
        order
    }

    #[test]
    fn slots_alternate_between_tenants_with_equal_chunks() {
        let mut candidates = vec![candidate(1, 10, 100), candidate(2, 10, 100)];
        let mut fairness = Fairness::default();
        fairness.admit(&candidates);
        let order = hand_out(&mut fairness, &mut candidates, 4, 500);
        assert_eq!(order, [tenant(1), tenant(2), tenant(1), tenant(2)]);
    }

    #[test]
    fn a_newcomer_starts_at_the_minimum_and_is_served_within_a_chunk() {
        let mut fairness = Fairness::default();
        let mut big = vec![candidate(1, 400, 100)];
        fairness.admit(&big);
        hand_out(&mut fairness, &mut big, 8, 500);
        assert_eq!(fairness.served("m", &tenant(1)), 4000);

        // a small batch of another tenant arrives behind the big one, due later
        let mut small = candidate(2, 1, 200);
        small.batch.created_at_us = 2;
        let mut both = vec![big.remove(0), small];
        fairness.admit(&both);
        // it starts at the minimum of those counted, not at zero (which would starve the
        // big one until it caught up)...
        assert_eq!(fairness.served("m", &tenant(2)), 4000);
        // ...so the tie goes to the earlier deadline, and the small batch gets the slot after
        let order = hand_out(&mut fairness, &mut both, 3, 500);
        assert_eq!(order, [tenant(1), tenant(2), tenant(1)]);
    }

    #[test]
    fn the_least_served_tenant_wins_whatever_the_deadlines() {
        let candidates = vec![candidate(1, 5, 10), candidate(2, 5, 1_000)];
        let mut fairness = Fairness::default();
        fairness.admit(&candidates);
        fairness.record("m", &tenant(1), 1);
        assert_eq!(fairness.pick(&candidates), Some(1));
    }

    #[test]
    fn within_a_tenant_the_earliest_deadline_goes_first() {
        let mut late = candidate(1, 5, 2_000);
        late.batch.created_at_us = 0; // older, but due later
        let candidates = vec![late, candidate(1, 5, 1_000)];
        let mut fairness = Fairness::default();
        fairness.admit(&candidates);
        assert_eq!(fairness.pick(&candidates), Some(1));
    }

    #[test]
    fn batches_without_pending_chunks_are_never_picked() {
        let candidates = vec![candidate(1, 0, 1), candidate(2, 0, 1)];
        let mut fairness = Fairness::default();
        fairness.admit(&candidates);
        assert_eq!(fairness.pick(&candidates), None);
        assert_eq!(fairness.pick(&[]), None);
    }

    #[test]
    fn idle_tenants_are_forgotten_and_return_at_the_minimum() {
        let mut fairness = Fairness::default();
        fairness.admit(&[candidate(1, 1, 1), candidate(2, 1, 1)]);
        fairness.record("m", &tenant(1), 100);
        fairness.record("m", &tenant(2), 900);
        // tenant 2 runs out of work: forgotten
        fairness.admit(&[candidate(1, 1, 1), candidate(2, 0, 1)]);
        assert_eq!(fairness.served("m", &tenant(2)), 0);
        fairness.record("m", &tenant(1), 50);
        // it returns at tenant 1's count, not with its old 900
        fairness.admit(&[candidate(1, 1, 1), candidate(2, 1, 1)]);
        assert_eq!(fairness.served("m", &tenant(2)), 150);
        assert_eq!(fairness.served("m", &tenant(1)), 150);
    }

    /// A candidate of `candidate`'s for `model`.
    fn on(model: &str, mut c: DispatchCandidate) -> DispatchCandidate {
        c.batch.model = Some(model.into());
        c
    }

    #[test]
    fn lines_on_one_model_do_not_count_on_another() {
        let mut fairness = Fairness::default();
        // tenant 1 alone on model "a" for a long while, tenant 2 alone on "b" briefly
        let mut a = vec![on("a", candidate(1, 100, 100))];
        let mut b = vec![on("b", candidate(2, 100, 200))];
        fairness.admit(&[a[0].clone(), b[0].clone()]);
        hand_out(&mut fairness, &mut a, 20, 500);
        hand_out(&mut fairness, &mut b, 1, 500);
        assert_eq!(fairness.served("a", &tenant(1)), 10_000);
        assert_eq!(fairness.served("b", &tenant(2)), 500);

        // tenant 1 sends work for "b" (due earlier): there it starts at tenant 2's count, not
        // with its 10,000 lines of "a", so the two share "b" from the next slot
        b.push(on("b", candidate(1, 100, 100)));
        fairness.admit(&[a[0].clone(), b[0].clone(), b[1].clone()]);
        assert_eq!(fairness.served("b", &tenant(1)), 500);
        let order = hand_out(&mut fairness, &mut b, 4, 500);
        assert_eq!(order, [tenant(1), tenant(2), tenant(1), tenant(2)]);
        // and "a" is untouched by it
        assert_eq!(fairness.served("a", &tenant(1)), 10_000);
        assert_eq!(fairness.served("a", &tenant(2)), 0);
    }

    #[test]
    fn a_model_without_work_is_forgotten() {
        let mut fairness = Fairness::default();
        fairness.admit(&[on("a", candidate(1, 1, 1)), on("b", candidate(1, 1, 1))]);
        fairness.record("a", &tenant(1), 10);
        fairness.record("b", &tenant(1), 20);
        fairness.admit(&[on("a", candidate(1, 1, 1)), on("b", candidate(1, 0, 1))]);
        let models: Vec<String> = fairness.accounts().into_iter().map(|a| a.model).collect();
        assert_eq!(models, ["a"]);
    }

    #[test]
    fn saved_accounts_restore_the_same_choices() {
        let mut candidates = vec![candidate(1, 10, 100), candidate(2, 10, 200)];
        let mut fairness = Fairness::default();
        fairness.admit(&candidates);
        // tenant 1 (due earlier) wins the ties: it is a chunk ahead after three slots
        hand_out(&mut fairness, &mut candidates, 3, 500);
        let accounts = fairness.accounts();
        assert_eq!(
            accounts,
            [
                DispatchAccount {
                    model: "m".into(),
                    tenant: tenant(1),
                    served: 1000
                },
                DispatchAccount {
                    model: "m".into(),
                    tenant: tenant(2),
                    served: 500
                },
            ]
        );

        let mut restored = Fairness::from_accounts(accounts);
        assert_eq!(restored, fairness);
        restored.admit(&candidates);
        // the tenant behind gets the next slot, as it would have without the restart; a
        // fresh account would give it to tenant 1's earlier deadline
        assert_eq!(restored.pick(&candidates), Some(1));
        let mut forgot = Fairness::default();
        forgot.admit(&candidates);
        assert_eq!(forgot.pick(&candidates), Some(0));
    }

    #[test]
    fn free_slots_count_every_batch_of_the_model_and_never_go_negative() {
        let mut a = candidate(1, 3, 1);
        a.in_flight = 3;
        let mut b = candidate(2, 3, 1);
        b.in_flight = 2;
        assert_eq!(free_slots(8, 0, &[a.clone(), b.clone()]), 3);
        assert_eq!(free_slots(4, 0, &[a.clone(), b.clone()]), 0);
        assert_eq!(free_slots(4, 0, &[]), 4);
        assert_eq!(free_slots(4, 2, &[]), 2);
        // the lookahead: chunks handed out but not started bound what more goes out
        a.queued = 1;
        assert_eq!(free_slots(8, 2, &[a.clone(), b.clone()]), 1);
        b.queued = 1;
        assert_eq!(free_slots(8, 2, &[a.clone(), b.clone()]), 0);
        assert_eq!(free_slots(8, 0, &[a.clone(), b.clone()]), 3);
        a.queued = 3;
        assert_eq!(free_slots(8, 2, &[a, b]), 0);
    }

    #[test]
    fn candidates_are_grouped_by_model_in_order() {
        let a = candidate(1, 1, 1);
        let mut b = candidate(2, 1, 1);
        b.batch.model = Some("other".into());
        let c = candidate(3, 1, 1);
        let groups = by_model(vec![a.clone(), b.clone(), c.clone()]);
        assert_eq!(groups.len(), 2);
        let ids =
            |g: &[DispatchCandidate]| g.iter().map(|c| c.batch.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&groups["m"]), [a.batch.id, c.batch.id]);
        assert_eq!(ids(&groups["other"]), [b.batch.id]);
    }
}
