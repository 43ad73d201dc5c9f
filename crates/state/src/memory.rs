//! The in-memory adapter; see [`MemoryState`].

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use async_trait::async_trait;

use crate::{
    LineOutcome, LiveCounts, LiveState, PermitGrant, PermitLease, Result, check_batch_id,
    check_lease, check_outcomes, settle_lease,
};

/// [`LiveState`] in this process's memory: for the single-process deployment
/// (`nightshift serve --standalone`) and as the test double of services' unit tests.
///
/// Everything lives in one map behind one mutex, held for the whole of each call: that is what
/// makes a `record` call atomic and exactly-once against concurrent ones. Nothing expires: the
/// state dies with the process, which is also the finalizer's, so nothing can leak beyond it.
/// Like Redis' bitmap, the per-line marks take one bit per line up to the highest line recorded.
#[derive(Default)]
pub struct MemoryState {
    /// Every batch with something recorded or flagged, by id.
    batches: Mutex<HashMap<String, BatchState>>,
    /// Permit leases: upstream → holder → lease. Expired leases are dropped when their
    /// upstream is next leased.
    leases: Mutex<HashMap<String, HashMap<String, Lease>>>,
}

/// One holder's lease of an upstream's permits.
struct Lease {
    granted: u32,
    want: u32,
    expires: Instant,
}

/// What is kept for one batch.
#[derive(Default)]
struct BatchState {
    /// Bit `n` (word `n / 64`, bit `n % 64`) set = line `n` was counted.
    done: Vec<u64>,
    /// The live numbers.
    counts: LiveCounts,
    /// The cancel flag.
    cancelled: bool,
}

impl BatchState {
    /// Sets the mark of `line`; `true` when it was not set before.
    fn mark(&mut self, line: u64) -> bool {
        // `line` ≤ MAX_LINE (checked), so the index fits in usize on 64-bit targets and the
        // vector stays within 512 MiB.
        let word = usize::try_from(line / 64).unwrap_or(usize::MAX);
        let bit = 1u64 << (line % 64);
        if self.done.len() <= word {
            self.done.resize(word + 1, 0);
        }
        let fresh = self.done[word] & bit == 0;
        self.done[word] |= bit;
        fresh
    }
}

impl MemoryState {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, BatchState>> {
        // A panic while holding the lock cannot leave a batch half-updated in a way that
        // matters more than the panic itself; keep serving.
        self.batches.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for MemoryState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryState")
            .field("batches", &self.lock().len())
            .finish()
    }
}

#[async_trait]
impl LiveState for MemoryState {
    async fn record(&self, batch: &str, outcomes: &[LineOutcome]) -> Result<u64> {
        check_batch_id(batch)?;
        check_outcomes(outcomes)?;
        if outcomes.is_empty() {
            return Ok(0);
        }
        let mut batches = self.lock();
        let state = batches.entry(batch.to_owned()).or_default();
        let mut fresh = 0;
        for outcome in outcomes {
            if state.mark(outcome.line) {
                fresh += 1;
                if outcome.succeeded {
                    state.counts.completed += 1;
                } else {
                    state.counts.failed += 1;
                }
                state.counts.usage.merge(&outcome.usage);
            }
        }
        Ok(fresh)
    }

    async fn counts(&self, batch: &str) -> Result<LiveCounts> {
        check_batch_id(batch)?;
        Ok(self
            .lock()
            .get(batch)
            .map(|state| state.counts)
            .unwrap_or_default())
    }

    async fn counts_many(&self, batches: &[&str]) -> Result<Vec<LiveCounts>> {
        for batch in batches {
            check_batch_id(batch)?;
        }
        let states = self.lock();
        Ok(batches
            .iter()
            .map(|batch| {
                states
                    .get(*batch)
                    .map(|state| state.counts)
                    .unwrap_or_default()
            })
            .collect())
    }

    async fn set_cancelled(&self, batch: &str) -> Result<()> {
        check_batch_id(batch)?;
        self.lock().entry(batch.to_owned()).or_default().cancelled = true;
        Ok(())
    }

    async fn is_cancelled(&self, batch: &str) -> Result<bool> {
        check_batch_id(batch)?;
        Ok(self.lock().get(batch).is_some_and(|state| state.cancelled))
    }

    async fn clear(&self, batch: &str) -> Result<()> {
        check_batch_id(batch)?;
        self.lock().remove(batch);
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    async fn lease_permits(&self, lease: &PermitLease<'_>) -> Result<PermitGrant> {
        check_lease(lease)?;
        let now = Instant::now();
        let mut upstreams = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        let holders = upstreams.entry(lease.upstream.to_owned()).or_default();
        holders.retain(|_, held| held.expires > now);
        let others: Vec<(u32, u32)> = holders
            .iter()
            .filter(|(holder, _)| holder.as_str() != lease.holder)
            .map(|(_, held)| (held.granted, held.want))
            .collect();
        let grant = settle_lease(lease, &others);
        let want = lease.want.min(lease.cap);
        if grant.granted == 0 && want == 0 {
            holders.remove(lease.holder);
        } else {
            holders.insert(
                lease.holder.to_owned(),
                Lease {
                    granted: grant.granted,
                    want,
                    expires: now + lease.ttl,
                },
            );
        }
        if holders.is_empty() {
            upstreams.remove(lease.upstream);
        }
        Ok(grant)
    }
}
