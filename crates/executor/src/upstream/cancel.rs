//! A cancellation flag shared between whoever learns that a batch was cancelled and the calls
//! running its requests.

use std::sync::Arc;

use tokio::sync::watch;

/// A one-way flag: once [`cancel`](Self::cancel)led it stays cancelled. Clones share the flag.
///
/// [`Upstream::call`](super::Upstream::call) reads it before every attempt and wakes up on it
/// while waiting for a concurrency permit or sleeping a backoff, so a cancelled batch stops
/// starting requests at once. An attempt already sent is never cut: its answer is finished
/// work and is kept.
///
/// Built on a `watch` channel rather than an `AtomicBool` so waiters can await the change
/// instead of polling it.
#[derive(Clone, Debug)]
pub struct CancelFlag(Arc<watch::Sender<bool>>);

impl CancelFlag {
    /// A flag not cancelled (yet).
    pub fn new() -> Self {
        Self(Arc::new(watch::Sender::new(false)))
    }

    /// Sets the flag. Idempotent; wakes every waiter of [`cancelled`](Self::cancelled).
    pub fn cancel(&self) {
        self.0.send_replace(true);
    }

    /// True once [`cancel`](Self::cancel) was called on this flag or a clone.
    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes when the flag is set (at once if it already is). Cancel-safe.
    pub async fn cancelled(&self) {
        let mut changes = self.0.subscribe();
        if changes.wait_for(|cancelled| *cancelled).await.is_err() {
            // Unreachable: `self` keeps the sender alive. Never report a cancel that did not
            // happen.
            std::future::pending::<()>().await;
        }
    }
}

impl Default for CancelFlag {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[tokio::test]
    async fn clones_share_the_flag_and_waiters_wake() {
        let flag = CancelFlag::new();
        let clone = flag.clone();
        assert!(!clone.is_cancelled());
        assert!(clone.cancelled().now_or_never().is_none());
        let waiter = tokio::spawn(async move { clone.cancelled().await });
        flag.cancel();
        flag.cancel();
        waiter.await.unwrap();
        assert!(flag.is_cancelled());
        assert!(flag.cancelled().now_or_never().is_some());
    }
}
