//! Chunk results: an executor reports a chunk whose part is durable; the chunk is marked
//! done (idempotently) and, when nothing of the batch is left in flight, finalization is
//! requested. The message is acked only after both are recorded. The queue worker
//! ([`run_worker`]) consumes them: a result that cannot be recorded because the metadata
//! store is down is held and retried (it never counts toward the delivery limit); one that
//! can never be recorded (undecodable, an invalid batch id, an unknown report) is
//! dead-lettered.

use std::sync::Arc;
use std::time::Duration;

use nightshift_core::BatchId;
use nightshift_proto::v1::ChunkResult;
use nightshift_queue::{
    Disposition, Handler, Job, QueueKind, WorkerConfig, async_trait, run_worker,
};
use nightshift_telemetry::propagation;
use prost::Message;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use nightshift_core::time::now_unix;
use nightshift_proto::v1::ChunkReport;

use super::{PipelineSettings, finalize_if_ready};
use crate::{SchedulerError, SchedulerPorts, metrics};

/// How long, at shutdown, chunk results being recorded may take before they are re-published.
pub const RESULTS_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Chunk results recorded at once.
pub const RESULTS_PREFETCH: u16 = 64;

/// Consumes chunk results until `stop` is cancelled, through the queue worker
/// ([`run_worker`]: reconnects, holds results while the metadata store is down without
/// counting them, drains on shutdown). `wake` is notified whenever a result is recorded, so
/// the dispatcher hands out a freed slot at once.
pub async fn consume_results(
    ports: SchedulerPorts,
    settings: PipelineSettings,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let config = WorkerConfig {
        shutdown_grace: RESULTS_SHUTDOWN_GRACE,
        ..WorkerConfig::new(QueueKind::ChunkResults, RESULTS_PREFETCH)
    }
    .fit_to(ports.queue.consumer_timeout());
    let queue = ports.queue.clone();
    let handler = Arc::new(ResultHandler {
        ports,
        settings,
        wake,
    });
    run_worker(queue, config, handler, stop).await;
}

/// Records one chunk result per delivery.
struct ResultHandler {
    ports: SchedulerPorts,
    settings: PipelineSettings,
    wake: Arc<Notify>,
}

#[async_trait]
impl Handler for ResultHandler {
    async fn handle(&self, job: &Job<'_>) -> Disposition {
        if job.attempt == 1 {
            propagation::observe_delivery(QueueKind::ChunkResults.as_str(), job.headers);
        }
        let result = match ChunkResult::decode(job.payload.as_ref()) {
            Ok(result) => result,
            Err(e) => return Disposition::Poison(format!("undecodable chunk result: {e}")),
        };
        // A child of the executor's chunk span, in the batch's trace.
        let span = tracing::info_span!(
            "chunk_result",
            batch_id = %result.batch_id,
            chunk_index = result.chunk_index,
            report = result.report,
            completed = result.completed,
            failed = result.failed,
        );
        propagation::set_parent_from_headers(&span, job.headers);
        match handle(&self.ports, &self.settings, &result)
            .instrument(span)
            .await
        {
            Ok(()) => {
                self.wake.notify_one();
                Disposition::Done
            }
            Err(e) => match e.outage() {
                Some(dependency) => Disposition::Outage {
                    dependency,
                    error: e.to_string(),
                },
                None => Disposition::Poison(e.to_string()),
            },
        }
    }
}

/// Records one chunk result (idempotent: a redelivered result changes nothing):
/// - `RUNNING` (a heartbeat): the chunk's lease is renewed (`chunk_lease` from now) and the
///   chunk marked started; ignored for a chunk already done or failed;
/// - `FAILED`: the chunk is given up with the report's error (unless it is done): its lines
///   without a result line become `chunk_failed` error lines, and the batch may now be
///   ready to finalize;
/// - `DONE`: the chunk is done; the batch is asked to finalize if nothing more will run.
///
/// A finalize job that cannot be published is not an error here: the batch is already asked
/// to finalize, and the stalled-finalization sweep publishes the job again.
///
/// An error is a metadata store outage (the message is fine: handle it again once the store
/// is back, see [`SchedulerError::outage`]) or a message that can never be handled (an
/// invalid batch id, an unknown report: [`SchedulerError::Malformed`]).
pub(crate) async fn handle(
    ports: &SchedulerPorts,
    settings: &PipelineSettings,
    result: &ChunkResult,
) -> Result<(), SchedulerError> {
    let Ok(batch) = BatchId::parse(&result.batch_id) else {
        return Err(SchedulerError::Malformed(format!(
            "invalid batch id {:?}",
            result.batch_id
        )));
    };
    let chunk = result.chunk_index;
    match ChunkReport::try_from(result.report) {
        Ok(ChunkReport::Running) => {
            ports
                .metadata
                .renew_chunk_lease(&batch, chunk, now_unix(), settings.chunk_lease_secs())
                .await?;
            return Ok(());
        }
        Ok(ChunkReport::Failed) => {
            let failure = if result.error.is_empty() {
                "the chunk could not be run"
            } else {
                result.error.as_str()
            };
            if ports.metadata.fail_chunk(&batch, chunk, failure).await? {
                ::metrics::counter!(metrics::CHUNKS_FAILED, "reason" => "executor").increment(1);
                tracing::error!(batch_id = %batch, chunk, error = %failure, "chunk given up: an executor reported it can never run");
            }
        }
        Ok(ChunkReport::Done) => {
            let part = result.part_tally();
            if ports
                .metadata
                .complete_chunk(&batch, chunk, part.as_ref())
                .await?
            {
                ::metrics::counter!(metrics::CHUNKS_DONE).increment(1);
                tracing::debug!(batch_id = %batch, chunk, completed = result.completed, failed = result.failed, "chunk done");
            }
        }
        Err(_) => {
            return Err(SchedulerError::Malformed(format!(
                "unknown chunk report {}",
                result.report
            )));
        }
    }
    match finalize_if_ready(ports, settings, &batch, now_unix()).await {
        Ok(_) => Ok(()),
        Err(SchedulerError::Queue(e)) => {
            tracing::warn!(batch_id = %batch, error = %e, "finalize job not published; the stalled-finalization sweep will");
            Ok(())
        }
        Err(e) => Err(e),
    }
}
