//! One cap across executors: each upstream's `max_concurrency` is shared by every executor
//! calling it, through permit leases in the live state ([`LiveState::lease_permits`]).
//!
//! # How
//!
//! Each executor process is one *holder* (a random id). For each upstream, a task keeps a
//! lease of some permits in the live state and sets the upstream limiter's ceiling to what
//! the lease holds, so the executor never starts more requests than it holds; the sum of the
//! leases never exceeds `max_concurrency`. The task:
//!
//! - asks for what the limiter *wants* (its demand — requests in flight or waiting — with
//!   room to grow: twice the limit in slow start, one more after), and *keeps* what it uses.
//!   Before each call it lowers the ceiling to that `keep`, so the permits in use never
//!   exceed what the lease records, even while the call is under way;
//! - renews every `ttl / 3`; sooner — after [`RETRY_UNMET`] — while it got less than it
//!   wants or more than its fair share (so executors converge to max-min fair shares within
//!   a fraction of a second: one that holds more than its share gives the excess back, one
//!   that waits picks it up); and at once (at most every [`MIN_ASK_GAP`]) when the limiter
//!   wants more than it holds, as in a slow start;
//! - gives everything back when the executor stops. A dead executor's permits come back
//!   after the TTL.
//!
//! Not a round trip per request: one call per upstream every `ttl / 3` when steady, about
//! ten a second while executors compete for a saturated upstream, and a few per round trip
//! while a limit grows.
//!
//! # When the live state is down
//!
//! A failed call is retried every [`RETRY_FAILED`]. Meanwhile the executor keeps what it
//! kept for the call (never more than its last grant) until its lease may have run out:
//! three quarters of the TTL after the last call that succeeded was *sent* (the backend's
//! clock decides expiry; the margin covers the round trip and clock rates). From then on it
//! falls back to an equal split: `max_concurrency` divided by the number of holders the last
//! answer counted (at least 1). Every executor that lost the live state does the same, so
//! the sum stays within the cap as long as no executor joins during the outage; an executor
//! cut off alone from a live state that the others still reach may add its split on top of
//! what they re-lease. An executor that never got an answer counts itself alone. Once the
//! live state answers again, leases take over at the next call.

use std::sync::Arc;
use std::time::Duration;

use nightshift_queue::CancellationToken;
use nightshift_state::{LiveState, PermitLease};
use rand::Rng;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Upstream, Upstreams};
use crate::metrics;

/// How soon a lease is asked again while it gives less than wanted or more than the fair
/// share.
pub const RETRY_UNMET: Duration = Duration::from_millis(100);
/// How soon a failed lease call is retried.
pub const RETRY_FAILED: Duration = Duration::from_millis(250);
/// The shortest gap between two asks for more.
pub const MIN_ASK_GAP: Duration = Duration::from_millis(10);

/// A fresh holder id for this executor process: `executor-<pid>-<8 alphanumerics>`.
pub fn holder_id() -> String {
    let suffix: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(8)
        .map(char::from)
        .collect();
    format!("executor-{}-{suffix}", std::process::id())
}

/// The lease tasks of one executor's upstreams; [`release`](Self::release) stops them and
/// gives every permit back.
#[derive(Debug)]
pub struct Leases {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Leases {
    /// Stops renewing and gives back every lease (best effort: a lease that cannot be given
    /// back runs out after its TTL).
    pub async fn release(self) {
        self.stop.cancel();
        for task in self.tasks {
            if let Err(error) = task.await {
                tracing::error!(error = %error, "a permit lease task panicked");
            }
        }
    }
}

impl Upstreams {
    /// Shares each upstream's `max_concurrency` with the other holders of `state`: from now
    /// on no request starts beyond the permits this executor's lease holds (none until the
    /// first answer). `holder` identifies this executor ([`holder_id`]); `ttl` is how long a
    /// lease lasts without renewal (at least 1 ms).
    pub fn share_caps(&self, state: Arc<dyn LiveState>, holder: &str, ttl: Duration) -> Leases {
        tracing::info!(
            holder,
            ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            "sharing each upstream's max_concurrency with the other executors (permit leases)"
        );
        let stop = CancellationToken::new();
        let holder: Arc<str> = Arc::from(holder);
        let tasks = self
            .iter()
            .map(|upstream| {
                upstream.limiter.set_ceiling(0);
                tokio::spawn(hold_lease(
                    Arc::clone(upstream),
                    Arc::clone(&state),
                    Arc::clone(&holder),
                    ttl,
                    stop.clone(),
                ))
            })
            .collect();
        Leases { stop, tasks }
    }
}

/// Keeps `upstream`'s lease until `stop`, then gives it back.
async fn hold_lease(
    upstream: Arc<Upstream>,
    state: Arc<dyn LiveState>,
    holder: Arc<str>,
    ttl: Duration,
    stop: CancellationToken,
) {
    let limiter = &upstream.limiter;
    let cap = limiter.max();
    let labels = [(metrics::LABEL_UPSTREAM, Arc::clone(&upstream.name))];
    let lease = |want, keep| PermitLease {
        upstream: &upstream.name,
        holder: &holder,
        want,
        keep,
        cap,
        ttl,
    };
    let mut share = cap;
    let mut holders = 1;
    let mut valid_until: Option<Instant> = None;
    let mut fell_back = false;
    loop {
        let (want, keep) = limiter.prepare_renewal(share);
        let sent = Instant::now();
        let next = match state.lease_permits(&lease(want, keep)).await {
            Ok(grant) => {
                limiter.set_ceiling(grant.granted);
                ::metrics::gauge!(metrics::UPSTREAM_LEASE_PERMITS, &labels)
                    .set(f64::from(grant.granted));
                share = grant.share;
                holders = grant.holders.max(1);
                valid_until = sent.checked_add(ttl / 4 * 3);
                if fell_back {
                    tracing::info!(upstream = %upstream.name, "permit lease renewed: the shared cap applies again");
                    fell_back = false;
                }
                if grant.granted < want || grant.granted > grant.share {
                    RETRY_UNMET
                } else {
                    ttl / 3
                }
            }
            Err(error) => {
                ::metrics::counter!(
                    metrics::STATE_ERRORS_TOTAL,
                    metrics::LABEL_OPERATION => metrics::OPERATION_LEASE_PERMITS,
                )
                .increment(1);
                if valid_until.is_none_or(|until| Instant::now() >= until) {
                    let split = (cap / holders).max(1);
                    limiter.set_ceiling(split);
                    ::metrics::gauge!(metrics::UPSTREAM_LEASE_PERMITS, &labels)
                        .set(f64::from(split));
                    if !fell_back {
                        tracing::warn!(
                            upstream = %upstream.name,
                            error = %error,
                            split,
                            holders,
                            "permit lease lost (live state unavailable): using an equal split \
                             of max_concurrency until it answers again"
                        );
                        fell_back = true;
                    }
                } else {
                    tracing::debug!(upstream = %upstream.name, error = %error, "permit lease renewal failed; retrying");
                }
                RETRY_FAILED
            }
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = tokio::time::sleep(next) => {}
            () = limiter.wants_more() => {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(MIN_ASK_GAP) => {}
                }
            }
        }
    }
    // Give everything back but what is still in flight (it runs out with the TTL).
    limiter.set_ceiling(0);
    let keep = limiter.in_flight();
    if let Err(error) = state.lease_permits(&lease(0, keep)).await {
        tracing::warn!(upstream = %upstream.name, error = %error, "cannot give the permit lease back; it runs out by itself");
    }
    ::metrics::gauge!(metrics::UPSTREAM_LEASE_PERMITS, &labels).set(0.0);
}
