//! Gauges sampled periodically: batches per non-terminal status and the age of the oldest,
//! and the depth of every work queue and of its dead-letter queue. They are read from the
//! metadata store and the queue, the sources of truth, rather than counted up and down, so
//! they stay right across restarts and across several schedulers.

use std::time::Duration;

use nightshift_core::time::now_unix_micros;
use nightshift_queue::QueueKind;
use tokio_util::sync::CancellationToken;

use crate::{SchedulerPorts, metrics};

/// Samples every `interval` (the first time at once) until `stop` is cancelled.
pub async fn run(ports: SchedulerPorts, interval: Duration, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        sample_once(&ports, now_unix_micros()).await;
    }
}

/// One sample at `now_us`. A source that does not answer leaves its gauges at their last
/// value (readiness reports the outage).
pub async fn sample_once(ports: &SchedulerPorts, now_us: i64) {
    for status in metrics::LIVE_STATUSES {
        match ports.metadata.batches_with_status(&[status]).await {
            Ok(batches) => {
                let label = status.as_str();
                ::metrics::gauge!(metrics::BATCHES, "status" => label).set(batches.len() as f64);
                ::metrics::gauge!(metrics::BATCH_OLDEST_AGE_SECONDS, "status" => label).set(
                    oldest_age_seconds(batches.iter().map(|b| b.created_at_us), now_us),
                );
            }
            Err(e) => tracing::debug!(status = %status, error = %e, "cannot sample batches"),
        }
    }
    for kind in QueueKind::ALL {
        match ports.queue.depth(kind).await {
            Ok(n) => ::metrics::gauge!(metrics::QUEUE_READY_MESSAGES, "queue" => kind.as_str())
                .set(n as f64),
            Err(e) => tracing::debug!(queue = %kind, error = %e, "cannot sample the queue depth"),
        }
        match ports.queue.dead_lettered(kind).await {
            Ok(n) => {
                ::metrics::gauge!(metrics::QUEUE_DEAD_LETTERED_MESSAGES, "queue" => kind.as_str())
                    .set(n as f64);
            }
            Err(e) => {
                tracing::debug!(queue = %kind, error = %e, "cannot sample the dead-letter queue");
            }
        }
    }
}

/// Seconds between the oldest of `created_at_us` and `now_us`; 0 for none (and never
/// negative, whatever the clocks say).
fn oldest_age_seconds(created_at_us: impl Iterator<Item = i64>, now_us: i64) -> f64 {
    created_at_us.min().map_or(0.0, |oldest| {
        now_us.saturating_sub(oldest).max(0) as f64 / 1e6
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_age_is_that_of_the_earliest_batch() {
        let now = 100_000_000;
        assert_eq!(oldest_age_seconds(std::iter::empty(), now), 0.0);
        assert_eq!(
            oldest_age_seconds([99_000_000, 40_000_000, 70_500_000].into_iter(), now),
            60.0
        );
        assert_eq!(oldest_age_seconds([101_000_000].into_iter(), now), 0.0);
    }
}
