//! The scheduler's half of running batches: handing chunks out fairly, tracking their
//! results, expiring batches at their deadline, and asking the finalizer to end them — plus
//! the gRPC service the finalizer calls back.
//!
//! Every step is driven by the metadata store's compare-and-set transitions, so each is safe
//! to repeat: a redelivered chunk result, a second scheduler, a restart half-way.

mod dispatch;
mod results;
mod service;

use std::time::Duration;

use nightshift_core::BatchId;
use nightshift_core::batch::BatchRecord;
use nightshift_core::time::now_unix;
use nightshift_proto::v1::FinalizeJob;
use nightshift_queue::QueueKind;
use nightshift_telemetry::propagation;
use prost::Message;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

pub use dispatch::Dispatcher;
pub use results::consume_results;
pub use service::PipelineService;

use crate::{Ports, metrics};

/// Version of the queue messages this scheduler writes.
pub const SCHEMA_VERSION: u32 = 1;

/// Dispatch and tracking settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineSettings {
    /// Chunks of one model handed out and not yet done, across all batches. Set it near
    /// executors × their prefetch: below, executors idle; above, the surplus waits in the
    /// queue, and a newly arrived batch's first chunk waits behind it (fairness is decided
    /// when a chunk is handed out, not once it is queued).
    pub max_in_flight_chunks_per_model: u32,
    /// How often the dispatcher looks for work when nothing wakes it.
    #[serde(with = "humantime_serde")]
    pub dispatch_interval: Duration,
    /// How often deadlines are checked.
    #[serde(with = "humantime_serde")]
    pub expiry_interval: Duration,
    /// A batch asked to finalize that is still not terminal after this long gets its finalize
    /// job published again (the job was lost or dead-lettered; the finalizer is idempotent).
    /// Cancelled and expired batches thus always reach their terminal state.
    #[serde(with = "humantime_serde")]
    pub finalize_retry_after: Duration,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            max_in_flight_chunks_per_model: 8,
            dispatch_interval: Duration::from_millis(500),
            expiry_interval: Duration::from_secs(1),
            finalize_retry_after: Duration::from_secs(300),
        }
    }
}

/// Asks the finalizer to end `batch` if it is ready (nothing in flight, nothing more to
/// run). Safe to call any time, as often as wanted: the store grants it once per batch.
pub async fn finalize_if_ready(ports: &Ports, batch: &BatchId) -> Result<bool, String> {
    let Some(b) = ports
        .metadata
        .request_finalize(batch, now_unix())
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(false);
    };
    publish_finalize(ports, &b).await?;
    ::metrics::counter!(metrics::BATCH_TRANSITIONS, "to" => b.status.as_str()).increment(1);
    tracing::info!(batch_id = %b.id, status = %b.status, "batch finalizing");
    Ok(true)
}

/// Publishes the finalize job of a batch (again, after a restart: the finalizer is
/// idempotent), in a `request_finalize` span of the batch's trace whose context the job
/// carries to the finalizer.
pub async fn publish_finalize(ports: &Ports, batch: &BatchRecord) -> Result<(), String> {
    let span =
        tracing::info_span!("request_finalize", batch_id = %batch.id, status = %batch.status);
    propagation::set_parent(&span, batch_trace(batch));
    let job = FinalizeJob {
        schema_version: SCHEMA_VERSION,
        batch_id: batch.id.to_string(),
    };
    let headers = propagation::message_headers(&span);
    ports
        .queue
        .publish(QueueKind::FinalizeJobs, job.encode_to_vec().into(), headers)
        .instrument(span)
        .await
        .map_err(|e| e.to_string())
}

/// The trace context the batch was created in: the parent of every span of its life.
pub(crate) fn batch_trace(batch: &BatchRecord) -> Option<&str> {
    batch.traceparent.as_deref()
}

/// Deadline sweeps: batches past `expires_at` stop receiving chunks and are finalized as
/// soon as their in-flight chunks come back (executors stop starting requests at the
/// deadline on their own, so that is quick).
pub async fn run_expiry(
    ports: Ports,
    interval: Duration,
    finalize_retry_after: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let retry_secs = i64::try_from(finalize_retry_after.as_secs()).unwrap_or(i64::MAX);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        match ports.metadata.expire_due(now_unix()).await {
            Ok(expired) => {
                for b in expired {
                    tracing::info!(batch_id = %b.id, "batch reached its deadline; expiring");
                    if let Err(e) = finalize_if_ready(&ports, &b.id).await {
                        tracing::warn!(batch_id = %b.id, error = %e, "could not request finalization");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "expiry sweep failed"),
        }
        let now = now_unix();
        match ports
            .metadata
            .claim_stalled_finalizations(now.saturating_sub(retry_secs), now)
            .await
        {
            Ok(stalled) => {
                for b in stalled {
                    tracing::warn!(batch_id = %b.id, status = %b.status, "finalization did not complete; publishing its job again");
                    if let Err(e) = publish_finalize(&ports, &b).await {
                        tracing::warn!(batch_id = %b.id, error = %e, "could not re-publish a finalize job");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "stalled-finalization sweep failed"),
        }
        // Expiring batches whose last chunks came back are caught by the result consumer;
        // this sweep also retries any whose request failed earlier.
        if let Ok(candidates) = ports.metadata.dispatch_candidates().await {
            for c in candidates
                .iter()
                .filter(|c| c.in_flight == 0 && c.pending == 0)
            {
                let _ = finalize_if_ready(&ports, &c.batch.id).await;
            }
        }
    }
}
