//! The one way a test waits for state: poll with a deadline, never sleep for it.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// Pause between two probes: short enough to catch a state that lasts only a moment (a batch
/// in `finalizing`), long enough not to load what is probed.
const POLL_EVERY: Duration = Duration::from_millis(10);

/// Calls `probe` until it returns `Ok`, pausing [`POLL_EVERY`] between calls, for at most
/// `within`; returns its value.
///
/// `probe` returns `Err(what it saw)` while the state is not reached yet. Past the deadline,
/// the error says what was awaited (`what`), for how long, and the last observation. The probe
/// runs at least once, and a probe that cannot go on (an unexpected state, a broken
/// connection) panics or asserts as any test code does.
pub async fn eventually<T, E: Display, F: Future<Output = Result<T, E>>>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> F,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + within;
    loop {
        let seen = match probe().await {
            Ok(value) => return Ok(value),
            Err(seen) => seen,
        };
        if Instant::now() >= deadline {
            anyhow::bail!("{what}: not within {within:?}; last seen: {seen:#}");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}
