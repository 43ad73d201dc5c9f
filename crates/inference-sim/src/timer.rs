//! Simulated latency held to a fraction of a millisecond.
//!
//! `tokio::time::sleep` rounds every deadline up to its timer wheel's next millisecond tick and
//! wakes a little after it, so a 50 ms latency lasts 50.5 to 51.5 ms: 1–3 % more than the
//! configured latency, which a latency-bound benchmark (whose ideal is `N·L/C`) would blame
//! on the client. [`PreciseTimer`] keeps the deadlines on one thread of its own, which waits
//! on a condition-variable timeout (a futex: precise to tens of microseconds) until the
//! earliest deadline and then fires every due one. A sleeper waits for its oneshot, so any
//! number of sleepers cost one thread, and a sleeper that gives up just drops its receiver.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// A deadline and whom to tell, ordered by the deadline (then by arrival).
struct Waiter {
    at: Instant,
    seq: u64,
    wake: oneshot::Sender<()>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Waiter {}

impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// The timer thread's handle. Dropping it stops the thread; sleeps still pending then end at
/// once.
#[derive(Debug)]
pub(crate) struct PreciseTimer {
    deadlines: mpsc::Sender<(Instant, oneshot::Sender<()>)>,
}

impl PreciseTimer {
    /// Starts the timer thread.
    pub(crate) fn start() -> std::io::Result<Self> {
        let (deadlines, receiver) = mpsc::channel();
        thread::Builder::new()
            .name("sim-timer".into())
            .spawn(move || run(&receiver))?;
        Ok(Self { deadlines })
    }

    /// Resolves at `at` (within tens of microseconds, on an idle machine).
    pub(crate) async fn sleep_until(&self, at: Instant) {
        let (wake, woken) = oneshot::channel();
        if self.deadlines.send((at, wake)).is_err() {
            // The thread is gone (it never panics; only at process exit): tokio's timer.
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            return;
        }
        // An error means the thread dropped the waiter while stopping: the time is over.
        let _ = woken.await;
    }
}

fn run(receiver: &mpsc::Receiver<(Instant, oneshot::Sender<()>)>) {
    let mut due: BinaryHeap<Reverse<Waiter>> = BinaryHeap::new();
    let mut seq = 0u64;
    loop {
        let now = Instant::now();
        while due.peek().is_some_and(|w| w.0.at <= now) {
            if let Some(Reverse(waiter)) = due.pop() {
                // A sleeper that gave up dropped its receiver: nothing to tell.
                let _ = waiter.wake.send(());
            }
        }
        let next = match due.peek() {
            Some(w) => receiver.recv_timeout(w.0.at.saturating_duration_since(now)),
            None => receiver.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match next {
            Ok((at, wake)) => {
                seq += 1;
                due.push(Reverse(Waiter { at, seq, wake }));
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// How long past its deadline a sleep ended: what [`PreciseTimer`] keeps small.
pub(crate) fn overshoot(deadline: Instant) -> Duration {
    Instant::now().saturating_duration_since(deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_deadline_fires_early() {
        let timer = PreciseTimer::start().expect("thread");
        let start = Instant::now();
        let offsets = [30u64, 10, 20, 10, 0];
        let sleeps = offsets.map(|ms| {
            let at = start + Duration::from_millis(ms);
            let timer = &timer;
            async move {
                timer.sleep_until(at).await;
                (ms, Instant::now().saturating_duration_since(start))
            }
        });
        let woke = futures::future::join_all(sleeps).await;
        for (ms, after) in woke {
            assert!(
                after >= Duration::from_millis(ms),
                "{ms} ms woke after {after:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_sleeper_that_gives_up_does_not_stop_the_others() {
        let timer = PreciseTimer::start().expect("thread");
        let far = Instant::now() + Duration::from_secs(3600);
        // Given up at once: its waiter stays in the heap until its deadline, harmlessly.
        let abandoned = tokio::time::timeout(Duration::ZERO, timer.sleep_until(far)).await;
        assert!(abandoned.is_err());
        let near = Instant::now() + Duration::from_millis(5);
        timer.sleep_until(near).await;
        assert!(Instant::now() >= near);
    }
}
