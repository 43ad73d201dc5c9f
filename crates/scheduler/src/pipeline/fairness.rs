//! Who gets the next free slot: the dispatcher's fairness, as plain data and pure functions.
//!
//! Each free slot of a model goes to the tenant that has been served the fewest request lines
//! so far, and within a tenant to the batch with the earliest deadline (then the oldest). A
//! tenant that becomes active starts at the current minimum (virtual-time fair queuing), so
//! it neither starves the others with an old low count nor waits behind their history; a
//! tenant with no work left is forgotten.
//!
//! Nothing here touches the metadata store or the queue: the [`Dispatcher`](super::Dispatcher)
//! claims and publishes what [`Fairness::pick`] chooses and reports it back with
//! [`Fairness::record`].

use std::collections::HashMap;

use nightshift_core::TenantId;
use nightshift_metadata::DispatchCandidate;

/// Request lines handed out per active tenant. In memory: after a restart every tenant starts
/// even, which is fair enough.
#[derive(Debug, Default)]
pub(crate) struct Fairness {
    /// Lines handed out per tenant that had work waiting at the last [`Fairness::admit`].
    served: HashMap<TenantId, u64>,
}

impl Fairness {
    /// Starts a round over `candidates` (every model's): tenants with work waiting are
    /// counted, a newcomer (or one that fell behind) at the current minimum among them;
    /// tenants without are forgotten.
    pub(crate) fn admit(&mut self, candidates: &[DispatchCandidate]) {
        let active: Vec<&TenantId> = candidates
            .iter()
            .filter(|c| c.pending > 0)
            .map(|c| &c.batch.tenant_id)
            .collect();
        let floor = active
            .iter()
            .filter_map(|t| self.served.get(*t).copied())
            .min()
            .unwrap_or(0);
        for t in &active {
            let v = self.served.entry((*t).clone()).or_insert(floor);
            *v = (*v).max(floor);
        }
        self.served.retain(|t, _| active.contains(&t));
    }

    /// The index in `candidates` (one model's) of the batch that gets the next free slot:
    /// the least-served tenant with work, then its earliest deadline, then its oldest batch;
    /// the first of equals. `None` when no candidate has a chunk pending.
    pub(crate) fn pick(&self, candidates: &[DispatchCandidate]) -> Option<usize> {
        candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| c.pending > 0)
            .min_by_key(|(_, c)| {
                (
                    self.served(&c.batch.tenant_id),
                    c.batch.expires_at,
                    c.batch.created_at_us,
                )
            })
            .map(|(i, _)| i)
    }

    /// Counts `lines` handed out to `tenant`.
    pub(crate) fn record(&mut self, tenant: &TenantId, lines: u32) {
        *self.served.entry(tenant.clone()).or_default() += u64::from(lines);
    }

    /// Lines handed out to `tenant` since it became active.
    pub(crate) fn served(&self, tenant: &TenantId) -> u64 {
        self.served.get(tenant).copied().unwrap_or(0)
    }
}

/// Free slots of a model whose `candidates` have chunks in flight, under `max_in_flight`.
pub(crate) fn free_slots(max_in_flight: u32, candidates: &[DispatchCandidate]) -> u32 {
    let in_flight: u32 = candidates.iter().map(|c| c.in_flight).sum();
    max_in_flight.saturating_sub(in_flight)
}

/// `candidates` grouped by model, each group in the order given.
pub(crate) fn by_model(
    candidates: Vec<DispatchCandidate>,
) -> HashMap<String, Vec<DispatchCandidate>> {
    let mut by_model: HashMap<String, Vec<DispatchCandidate>> = HashMap::new();
    for c in candidates {
        let model = c.batch.model.clone().unwrap_or_default();
        by_model.entry(model).or_default().push(c);
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
            fairness.record(&candidates[i].batch.tenant_id, lines);
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
        assert_eq!(fairness.served(&tenant(1)), 4000);

        // a small batch of another tenant arrives behind the big one, due later
        let mut small = candidate(2, 1, 200);
        small.batch.created_at_us = 2;
        let mut both = vec![big.remove(0), small];
        fairness.admit(&both);
        // it starts at the minimum of those counted, not at zero (which would starve the
        // big one until it caught up)...
        assert_eq!(fairness.served(&tenant(2)), 4000);
        // ...so the tie goes to the earlier deadline, and the small batch gets the slot after
        let order = hand_out(&mut fairness, &mut both, 3, 500);
        assert_eq!(order, [tenant(1), tenant(2), tenant(1)]);
    }

    #[test]
    fn the_least_served_tenant_wins_whatever_the_deadlines() {
        let candidates = vec![candidate(1, 5, 10), candidate(2, 5, 1_000)];
        let mut fairness = Fairness::default();
        fairness.admit(&candidates);
        fairness.record(&tenant(1), 1);
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
        fairness.record(&tenant(1), 100);
        fairness.record(&tenant(2), 900);
        // tenant 2 runs out of work: forgotten
        fairness.admit(&[candidate(1, 1, 1), candidate(2, 0, 1)]);
        assert_eq!(fairness.served(&tenant(2)), 0);
        fairness.record(&tenant(1), 50);
        // it returns at tenant 1's count, not with its old 900
        fairness.admit(&[candidate(1, 1, 1), candidate(2, 1, 1)]);
        assert_eq!(fairness.served(&tenant(2)), 150);
        assert_eq!(fairness.served(&tenant(1)), 150);
    }

    #[test]
    fn free_slots_count_every_batch_of_the_model_and_never_go_negative() {
        let mut a = candidate(1, 3, 1);
        a.in_flight = 3;
        let mut b = candidate(2, 3, 1);
        b.in_flight = 2;
        assert_eq!(free_slots(8, &[a.clone(), b.clone()]), 3);
        assert_eq!(free_slots(4, &[a, b]), 0);
        assert_eq!(free_slots(4, &[]), 4);
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
