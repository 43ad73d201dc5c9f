//! The live-state port.
//!
//! While a batch runs, executors record every finished request here, so that
//! `GET /v1/batches/{id}` can show live `request_counts` (completed / failed) and `usage`; and
//! the scheduler mirrors cancel flags here, so that executors can check them before every
//! request without asking Postgres. This state is a *view*: Postgres stays the truth for
//! statuses and the finalizer recounts lines and usage from the result parts. Losing it loses
//! nothing but the live numbers of running batches.
//!
//! Services depend on the [`LiveState`] trait; binaries choose the adapter: [`RedisState`] in
//! production, [`MemoryState`] for the single-process deployment and as a test double. Every
//! adapter must pass the conformance suite (`conformance`, built with the
//! `testsuite` feature).
//!
//! Contract shared by all adapters:
//! - **exactly once per line.** Chunks are redelivered after crashes and lost acks, so the same
//!   input line may finish several times. [`LiveState::record`] counts a line of a batch at most
//!   once *ever* (until [`LiveState::clear`]): a per-line mark is set and the counters are
//!   incremented atomically together, and a line whose mark is already set is skipped;
//! - **atomic per call.** A [`LiveState::record`] call is applied entirely or not at all, and
//!   concurrent calls (from any number of executors) never lose or double an increment. A call
//!   with an invalid input is refused as a whole before anything is written;
//! - **unknown is empty.** A batch nobody recorded reads as zero counts and not cancelled;
//! - **bounded lifetime.** Adapters that outlive a process (Redis) expire every key of a batch
//!   some time after its last write, so a crashed finalizer never leaks state forever.
//!
//! The port also shares each upstream's concurrency cap between executors: see
//! [`LiveState::lease_permits`] and [`PermitLease`].

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use nightshift_core::results::ResultLine;
pub use nightshift_core::results::Usage;

#[cfg(feature = "testsuite")]
pub mod conformance;
mod memory;
mod redis_state;

pub use memory::MemoryState;
pub use redis_state::{BatchKeys, RedisState, StateConfig};

/// The largest line number [`LiveState::record`] accepts: 2³² − 1, the largest bit offset a
/// Redis bitmap allows. A batch of that many lines is far beyond any configured input limit.
pub const MAX_LINE: u64 = u32::MAX as u64;

/// The largest sum of any one usage field over the outcomes of one [`LiveState::record`] call:
/// 2⁵³, below which Redis' Lua (whose numbers are doubles) adds integers exactly. About 9·10¹⁵
/// tokens in one chunk: unreachable by real requests, so exceeding it means a bug upstream.
pub const MAX_USAGE_PER_CALL: u64 = 1 << 53;

/// The longest batch id accepted (the same bound as the ids of `nightshift-core`).
pub const MAX_BATCH_ID_LEN: usize = 128;

/// The longest upstream or holder name [`LiveState::lease_permits`] accepts.
pub const MAX_LEASE_NAME_LEN: usize = 128;

/// One executor's ask for permits of one upstream: see [`LiveState::lease_permits`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PermitLease<'a> {
    /// The shared resource: the upstream's name (`1..=MAX_LEASE_NAME_LEN` ASCII alphanumerics,
    /// `-`, `_` or `.`, as the routing table allows).
    pub upstream: &'a str,
    /// Who holds the lease: one id per executor process (same alphabet as `upstream`).
    pub holder: &'a str,
    /// Permits the holder would like (its limiter's wish, bounded by its demand).
    pub want: u32,
    /// Permits the holder may be using right now and keeps whatever the others want: never
    /// more than what its previous grant gave it (it cannot have started more).
    pub keep: u32,
    /// The upstream's `max_concurrency`: the sum of every holder's grant never exceeds it
    /// (unless `keep`s already did, e.g. after the backend lost the leases).
    pub cap: u32,
    /// The lease lasts this long after the call unless renewed; a holder that stops renewing
    /// (a dead executor) gives its permits back when it runs out. At least 1 ms.
    pub ttl: Duration,
}

/// What [`LiveState::lease_permits`] granted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PermitGrant {
    /// Permits the holder now holds, for `ttl` from the call: at least its `keep`.
    pub granted: u32,
    /// The holder's fair share: the max-min fair division of `cap` among the wants of every
    /// live holder (rounded up). A holder granted more than it should keep gives the excess
    /// back at its next call by lowering its `keep` to at most this.
    pub share: u32,
    /// Live holders of the upstream, this one included when it holds or wants anything.
    pub holders: u32,
}

/// The decision of [`LiveState::lease_permits`] over the other live holders' `(granted, want)`,
/// shared by the adapters that run in Rust ([`MemoryState`]; `lease.lua` is its Redis twin).
pub(crate) fn settle_lease(lease: &PermitLease<'_>, others: &[(u32, u32)]) -> PermitGrant {
    let cap = u64::from(lease.cap);
    let want = lease.want.min(lease.cap);
    let taken: u64 = others.iter().map(|&(granted, _)| u64::from(granted)).sum();
    let mut wants: Vec<u64> = others.iter().map(|&(_, want)| u64::from(want)).collect();
    wants.push(u64::from(want));
    let share = fair_share(cap, &mut wants);
    let room = cap.saturating_sub(taken);
    let fresh = u64::from(want).min(share).min(room);
    let granted = u32::try_from(fresh.max(u64::from(lease.keep))).unwrap_or(u32::MAX);
    let holders = others.len() + usize::from(granted > 0 || want > 0);
    PermitGrant {
        granted,
        share: u32::try_from(share).unwrap_or(u32::MAX),
        holders: u32::try_from(holders).unwrap_or(u32::MAX),
    }
}

/// Max-min fair level of `cap` over `wants` (sorted in place): the smallest wants are served
/// whole, the rest get an equal share, rounded up so that a cap smaller than the number of
/// holders still lets each of them start one request in turn.
fn fair_share(cap: u64, wants: &mut [u64]) -> u64 {
    wants.sort_unstable();
    let mut left = cap;
    let mut holders = wants.len() as u64;
    for &want in wants.iter() {
        let level = left.div_ceil(holders.max(1));
        if want > level {
            return level;
        }
        left = left.saturating_sub(want);
        holders -= 1;
    }
    // Every want fits: anyone may have up to the whole cap.
    cap
}

/// Checks the names and numbers of a [`PermitLease`].
pub(crate) fn check_lease(lease: &PermitLease<'_>) -> Result<()> {
    for (what, name) in [("upstream", lease.upstream), ("holder", lease.holder)] {
        let ok = !name.is_empty()
            && name.len() <= MAX_LEASE_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !ok {
            return Err(StateError::InvalidInput(format!(
                "{what} {name:?} is not 1 to {MAX_LEASE_NAME_LEN} ASCII alphanumerics, '_', '-' or '.'"
            )));
        }
    }
    if lease.cap == 0 {
        return Err(StateError::InvalidInput(
            "a lease's cap must be at least 1".into(),
        ));
    }
    if lease.ttl < Duration::from_millis(1) {
        return Err(StateError::InvalidInput(
            "a lease's ttl must be at least 1 ms".into(),
        ));
    }
    Ok(())
}

/// Errors of the live-state port.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The caller passed something the contract forbids (a malformed batch id, line 0, a line
    /// above [`MAX_LINE`], usage above [`MAX_USAGE_PER_CALL`]). Nothing was written. A bug in
    /// the caller: retrying will not help.
    #[error("invalid live-state input: {0}")]
    InvalidInput(String),
    /// The configuration cannot work (bad URL, bad prefix, zero TTL).
    #[error("invalid live-state configuration: {0}")]
    Config(String),
    /// The backend failed or is unreachable; retrying later may work. A `record` that failed
    /// this way may or may not have been applied: retrying it is safe, since lines already
    /// counted are skipped. The message is for operators, not clients.
    #[error("live-state backend error: {0}")]
    Backend(String),
}

pub type Result<T, E = StateError> = std::result::Result<T, E>;

/// How one input line of a batch finished: what [`LiveState::record`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LineOutcome {
    /// The 1-based line number in the batch's input file, `1..=MAX_LINE`.
    pub line: u64,
    /// `true` counts the line in `completed` (it goes to the output file), `false` in `failed`
    /// (error file).
    pub succeeded: bool,
    /// Token usage to add to the batch's sum. Added as given, whatever `succeeded` says;
    /// callers pass zeros for failures, as [`ResultLine::usage`] does.
    pub usage: Usage,
}

impl LineOutcome {
    /// A successful line with its usage.
    pub fn succeeded(line: u64, usage: Usage) -> Self {
        Self {
            line,
            succeeded: true,
            usage,
        }
    }

    /// A failed line (no usage).
    pub fn failed(line: u64) -> Self {
        Self {
            line,
            succeeded: false,
            usage: Usage::default(),
        }
    }

    /// The outcome of line `line` whose result an executor wrote as `result`: success and usage
    /// as the finalizer will count them from the parts.
    pub fn of(line: u64, result: &ResultLine) -> Self {
        Self {
            line,
            succeeded: result.is_success(),
            usage: result.usage(),
        }
    }
}

/// The live numbers of one batch: the `request_counts.completed`, `request_counts.failed` and
/// `usage` that `GET /v1/batches/{id}` shows while the batch runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveCounts {
    /// Lines that finished with a 2xx response.
    pub completed: u64,
    /// Lines that finished otherwise.
    pub failed: u64,
    /// Sum of the usage of every counted line.
    pub usage: Usage,
}

impl LiveCounts {
    /// Lines counted so far, `completed + failed`.
    pub fn finished(&self) -> u64 {
        self.completed.saturating_add(self.failed)
    }
}

/// The live-state port. See the [crate docs](crate) for the contract every adapter keeps.
///
/// Batch ids are `1..=MAX_BATCH_ID_LEN` ASCII alphanumerics, `_` or `-` (what nightshift's ids
/// are made of); any method given another one fails with [`StateError::InvalidInput`].
#[async_trait]
pub trait LiveState: Send + Sync + fmt::Debug + 'static {
    /// Records finished lines of `batch` and returns how many were newly counted.
    ///
    /// Each line is counted at most once ever: a line already recorded — earlier in the same
    /// call, by an earlier call (a redelivered chunk), or by a concurrent one — is skipped, and
    /// the first outcome recorded for a line is the one that counts. The call is atomic: every
    /// new line is counted with its usage, or none is. An invalid outcome (line 0, a line above
    /// [`MAX_LINE`], a usage field summing above [`MAX_USAGE_PER_CALL`] over the call) fails
    /// the whole call with [`StateError::InvalidInput`] and writes nothing. After a
    /// [`StateError::Backend`] the call may or may not have been applied (a lost reply):
    /// retrying it is safe and counts nothing twice. An empty `outcomes` is a no-op returning 0.
    ///
    /// Meant to be called once per chunk (or per group of finished requests) with all its
    /// lines: the cost is one round trip per call, not per line.
    async fn record(&self, batch: &str, outcomes: &[LineOutcome]) -> Result<u64>;

    /// The live numbers of `batch`; zeros for a batch with nothing recorded (unknown, not
    /// started, or cleared).
    async fn counts(&self, batch: &str) -> Result<LiveCounts>;

    /// [`counts`](Self::counts) of many batches at once, in the order given (duplicates
    /// allowed), in one round trip: for list endpoints.
    async fn counts_many(&self, batches: &[&str]) -> Result<Vec<LiveCounts>>;

    /// Raises the cancel flag of `batch` (the scheduler does, after Postgres says
    /// `cancelling`, for cancel and expiry alike). Idempotent. The flag lives until
    /// [`clear`](Self::clear) or the adapter's expiry.
    async fn set_cancelled(&self, batch: &str) -> Result<()>;

    /// Whether the cancel flag of `batch` is raised; `false` for an unknown batch. Cheap:
    /// executors call it before every request.
    async fn is_cancelled(&self, batch: &str) -> Result<bool>;

    /// Removes everything kept for `batch`: counts, usage, per-line marks and the cancel flag.
    /// Idempotent; clearing an unknown batch succeeds.
    ///
    /// Only the finalizer calls it, after the terminal state is committed to Postgres, when no
    /// executor will record lines of the batch any more: a line recorded after `clear` is
    /// counted again, since its mark is gone too.
    async fn clear(&self, batch: &str) -> Result<()>;

    /// Whether the backend answers (readiness).
    async fn ping(&self) -> Result<()>;

    /// Takes, renews, resizes or gives back `lease.holder`'s lease of permits of
    /// `lease.upstream`, in one atomic step, and returns what it holds now.
    ///
    /// Executors share an upstream's `max_concurrency` this way: each holds a lease of some
    /// permits, starts no more requests than it holds, renews the lease well before its `ttl`
    /// runs out, and asks again when it wants more. The step:
    /// 1. leases that ran out (their holder stopped renewing: it died) are dropped;
    /// 2. the holder's fair share is computed over every live holder's last `want` and this
    ///    call's (see [`PermitGrant::share`]);
    /// 3. the holder is granted `max(keep, min(want, share, cap − the others' grants))`, for
    ///    `ttl` from now (the backend's clock), and its `want` is remembered for the others'
    ///    shares.
    ///
    /// So the grants never sum above `cap` as long as every holder starts no more than it
    /// holds and passes as `keep` at most what it was granted before. `want = keep = 0`
    /// releases the lease. Expiry uses one clock (the backend's), so holders' clocks may
    /// differ; a holder must still treat its lease as gone somewhat before `ttl` after it
    /// *sent* the call. An invalid lease (a bad name, `cap` 0, `ttl` under 1 ms) fails with
    /// [`StateError::InvalidInput`]; after a [`StateError::Backend`] the step may or may not
    /// have been applied.
    async fn lease_permits(&self, lease: &PermitLease<'_>) -> Result<PermitGrant>;
}

/// Checks a batch id against the shape every adapter accepts.
pub(crate) fn check_batch_id(batch: &str) -> Result<()> {
    let ok = !batch.is_empty()
        && batch.len() <= MAX_BATCH_ID_LEN
        && batch
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StateError::InvalidInput(format!(
            "batch id {batch:?} is not 1 to {MAX_BATCH_ID_LEN} ASCII alphanumerics, '_' or '-'"
        )))
    }
}

/// Checks the outcomes of one `record` call: every line in `1..=MAX_LINE`, and every usage
/// field's sum over the call at most [`MAX_USAGE_PER_CALL`].
pub(crate) fn check_outcomes(outcomes: &[LineOutcome]) -> Result<()> {
    let mut sums = [0u64; 5];
    for outcome in outcomes {
        if !(1..=MAX_LINE).contains(&outcome.line) {
            return Err(StateError::InvalidInput(format!(
                "line {} is outside 1..={MAX_LINE}",
                outcome.line
            )));
        }
        for (sum, value) in sums.iter_mut().zip(usage_fields(&outcome.usage)) {
            *sum = sum.saturating_add(value);
            if *sum > MAX_USAGE_PER_CALL {
                return Err(StateError::InvalidInput(format!(
                    "usage of one record call sums above {MAX_USAGE_PER_CALL} tokens"
                )));
            }
        }
    }
    Ok(())
}

/// The five counters of a [`Usage`]: input, cached, output, reasoning, total.
pub(crate) fn usage_fields(usage: &Usage) -> [u64; 5] {
    [
        usage.input_tokens,
        usage.input_tokens_details.cached_tokens,
        usage.output_tokens,
        usage.output_tokens_details.reasoning_tokens,
        usage.total_tokens,
    ]
}

/// Builds a [`Usage`] from its five counters, in the order of [`usage_fields`].
pub(crate) fn usage_from_fields([input, cached, output, reasoning, total]: [u64; 5]) -> Usage {
    let mut usage = Usage {
        input_tokens: input,
        output_tokens: output,
        total_tokens: total,
        ..Usage::default()
    };
    usage.input_tokens_details.cached_tokens = cached;
    usage.output_tokens_details.reasoning_tokens = reasoning;
    usage
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(n: u64) -> Usage {
        usage_from_fields([n, n, n, n, n])
    }

    #[test]
    fn batch_ids() {
        for ok in ["batch_abc", "b", "batch-1_X", &"x".repeat(MAX_BATCH_ID_LEN)] {
            assert!(check_batch_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "batch_{x}",
            "a:b",
            "a b",
            "é",
            &"x".repeat(MAX_BATCH_ID_LEN + 1),
        ] {
            assert!(
                matches!(check_batch_id(bad), Err(StateError::InvalidInput(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn outcome_bounds() {
        assert!(check_outcomes(&[]).is_ok());
        assert!(check_outcomes(&[LineOutcome::failed(1), LineOutcome::failed(MAX_LINE)]).is_ok());
        for line in [0, MAX_LINE + 1, u64::MAX] {
            assert!(
                check_outcomes(&[LineOutcome::failed(line)]).is_err(),
                "{line}"
            );
        }
        let half = MAX_USAGE_PER_CALL / 2;
        assert!(
            check_outcomes(&[
                LineOutcome::succeeded(1, usage(half)),
                LineOutcome::succeeded(2, usage(half)),
            ])
            .is_ok()
        );
        assert!(
            check_outcomes(&[
                LineOutcome::succeeded(1, usage(half)),
                LineOutcome::succeeded(2, usage(half + 1)),
            ])
            .is_err()
        );
        assert!(check_outcomes(&[LineOutcome::succeeded(1, usage(u64::MAX))]).is_err());
    }

    #[test]
    fn usage_fields_round_trip() {
        let usage = usage_from_fields([1, 2, 3, 4, 5]);
        assert_eq!(usage.input_tokens, 1);
        assert_eq!(usage.input_tokens_details.cached_tokens, 2);
        assert_eq!(usage.output_tokens, 3);
        assert_eq!(usage.output_tokens_details.reasoning_tokens, 4);
        assert_eq!(usage.total_tokens, 5);
        assert_eq!(usage_fields(&usage), [1, 2, 3, 4, 5]);
    }

    #[test]
    fn outcome_of_a_result_line() {
        use nightshift_core::results::{BatchRequestId, NoResponseCode, ResponseBody};
        let body = ResponseBody::from_json(
            br#"{"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}"#,
        )
        .unwrap();
        let ok = ResultLine::response(BatchRequestId::for_line("b", 1), "c1", 200, "req", body);
        let outcome = LineOutcome::of(1, &ok);
        assert!(outcome.succeeded);
        assert_eq!(usage_fields(&outcome.usage), [3, 0, 4, 0, 7]);
        let failed = ResultLine::no_response(
            BatchRequestId::for_line("b", 2),
            "c2",
            NoResponseCode::BatchCancelled,
            None,
        );
        assert_eq!(LineOutcome::of(2, &failed), LineOutcome::failed(2));
    }
}
