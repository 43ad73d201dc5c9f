//! The scheduler's half of running batches: handing chunks out fairly, tracking their
//! results, expiring batches at their deadline, and asking the finalizer to end them — plus
//! the gRPC service the finalizer calls back.
//!
//! Every step is driven by the metadata store's compare-and-set transitions, so each is safe
//! to repeat: a redelivered chunk result, a second scheduler, a restart half-way.
//!
//! Every batch reaches a terminal state whatever is lost on the way:
//! - a dispatched chunk is leased ([`PipelineSettings::chunk_lease`]): its executor's
//!   heartbeats renew the lease, and the lease sweep ([`leases`]) re-drives a chunk whose
//!   task, executor or result was lost, or gives it up after
//!   [`PipelineSettings::max_chunk_attempts`] (its unfinished lines become `chunk_failed`
//!   error lines);
//! - a cancelled or expiring batch is finalized within [`PipelineSettings::ending_grace`]
//!   whatever its chunks do;
//! - a finalize job is published again once its finalization lease is gone
//!   ([`PipelineSettings::finalize_retry_after`]);
//! - every step that asks for finalization is repeated by the periodic [`sweep_once`], and
//!   [`recover`] picks every non-terminal batch up at start.

mod dispatch;
mod fairness;
pub mod leases;
mod results;
mod service;
#[cfg(test)]
mod tests;

use std::time::Duration;

use nightshift_core::BatchId;
use nightshift_core::batch::{BatchRecord, BatchStatus};
use nightshift_core::time::now_unix;
use nightshift_proto::v1::FinalizeJob;
use nightshift_queue::QueueKind;
use nightshift_telemetry::propagation;
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use dispatch::Dispatcher;
pub use results::consume_results;
pub use service::PipelineService;

use crate::{SchedulerError, SchedulerPorts, metrics};

/// Version of the queue messages this scheduler writes.
pub const SCHEMA_VERSION: u32 = 1;

/// Dispatch, lease and tracking settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineSettings {
    /// Chunks of one model handed out and not yet done, across all batches. Set it near
    /// executors × their prefetch: below, executors idle; above, the surplus waits in the
    /// queue (bounded by `max_queued_chunks_per_model`).
    pub max_in_flight_chunks_per_model: u32,
    /// Of those, chunks handed out that no executor has started yet (their tasks wait in the
    /// queue), across all batches of the model: the dispatcher's lookahead. Fairness is
    /// decided when a chunk is handed out, and the queue serves tasks in order, so a newly
    /// arrived batch's first chunk waits behind at most this many; executors still find the
    /// next task waiting when they finish one. 0: no bound (only `max_in_flight_…`).
    pub max_queued_chunks_per_model: u32,
    /// How often the dispatcher looks for work when nothing wakes it.
    #[serde(with = "humantime_serde")]
    pub dispatch_interval: Duration,
    /// How often the pipeline sweeps run: deadlines, chunk leases, endings, stalled
    /// finalizations, cancel flags.
    #[serde(with = "humantime_serde")]
    pub expiry_interval: Duration,
    /// How long a dispatched chunk is owned without news from an executor. Executors report
    /// a chunk running when they start it and every `executor.heartbeat_interval` (keep that
    /// well under this); each report renews the lease. Past it, the lease sweep re-drives the
    /// chunk (its executor died, or its task or result was lost or dead-lettered).
    #[serde(with = "humantime_serde")]
    pub chunk_lease: Duration,
    /// Dispatches of a chunk whose executors keep dying or falling silent before it is given
    /// up: its lines without a result become `chunk_failed` error lines and its model slot is
    /// freed. A task that was lost before any executor started it does not count.
    pub max_chunk_attempts: u32,
    /// A cancelled or expiring batch is finalized once its in-flight chunks came back or
    /// their leases expired, and at the latest this long after `cancelling_at` /
    /// `expires_at`, whatever its chunks are doing (the finalizer keeps whatever results
    /// their parts hold). Bounds how long cancel and expiry take.
    #[serde(with = "humantime_serde")]
    pub ending_grace: Duration,
    /// A batch asked to finalize that is still not terminal this long after its finalize job
    /// was (re)published, and whose finalization lease is absent or expired, gets its job
    /// published again (the job was lost or dead-lettered, or its finalizer died). A slow
    /// finalization renews its lease and is never duplicated.
    #[serde(with = "humantime_serde")]
    pub finalize_retry_after: Duration,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            max_in_flight_chunks_per_model: 8,
            max_queued_chunks_per_model: 2,
            dispatch_interval: Duration::from_millis(500),
            expiry_interval: Duration::from_secs(1),
            chunk_lease: Duration::from_secs(120),
            max_chunk_attempts: 4,
            ending_grace: Duration::from_secs(60),
            finalize_retry_after: Duration::from_secs(60),
        }
    }
}

impl PipelineSettings {
    /// [`chunk_lease`](Self::chunk_lease) in whole seconds (at least 1).
    pub fn chunk_lease_secs(&self) -> i64 {
        secs(self.chunk_lease).max(1)
    }

    /// [`ending_grace`](Self::ending_grace) in whole seconds.
    pub fn ending_grace_secs(&self) -> i64 {
        secs(self.ending_grace)
    }
}

/// A duration in whole seconds, as the metadata store counts time.
fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Asks the finalizer to end `batch` if it is ready at `now` (nothing more will run, or its
/// ending grace is over: see [`MetadataStore::request_finalize`]). Safe to call any time, as
/// often as wanted: the store grants it once per batch.
///
/// A [`SchedulerError::Metadata`] changed nothing: asking again later works. A
/// [`SchedulerError::Queue`] means the batch *was* asked to finalize but its job was not
/// published: the stalled-finalization sweep publishes it after `finalize_retry_after`.
///
/// [`MetadataStore::request_finalize`]: nightshift_metadata::MetadataStore::request_finalize
pub async fn finalize_if_ready(
    ports: &SchedulerPorts,
    settings: &PipelineSettings,
    batch: &BatchId,
    now: i64,
) -> Result<bool, SchedulerError> {
    let Some(b) = ports
        .metadata
        .request_finalize(batch, now, settings.ending_grace_secs())
        .await?
    else {
        return Ok(false);
    };
    ::metrics::counter!(metrics::BATCH_TRANSITIONS, "to" => b.status.as_str()).increment(1);
    tracing::info!(batch_id = %b.id, status = %b.status, "batch finalizing");
    publish_finalize(ports, &b).await?;
    Ok(true)
}

/// Publishes the finalize job of a batch (again, after a restart: the finalizer is
/// idempotent), in a `request_finalize` span of the batch's trace whose context the job
/// carries to the finalizer.
pub async fn publish_finalize(
    ports: &SchedulerPorts,
    batch: &BatchRecord,
) -> Result<(), SchedulerError> {
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
        .await?;
    Ok(())
}

/// The trace context the batch was created in: the parent of every span of its life.
pub(crate) fn batch_trace(batch: &BatchRecord) -> Option<&str> {
    batch.traceparent.as_deref()
}

/// Runs [`sweep_once`] every `expiry_interval` until `stop` is cancelled. `wake` is notified
/// when a sweep freed model slots (chunks given up), so the dispatcher fills them at once.
pub async fn run_sweeps(
    ports: SchedulerPorts,
    settings: PipelineSettings,
    wake: std::sync::Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(settings.expiry_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        if sweep_once(&ports, &settings, now_unix()).await.freed_slots {
            wake.notify_one();
        }
    }
}

/// What one [`sweep_once`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Batches marked expiring or expired.
    pub expired: usize,
    /// Chunk tasks published again (leases expired).
    pub redriven: usize,
    /// Chunks given up.
    pub given_up: usize,
    /// Batches asked to finalize.
    pub finalizing: usize,
    /// Finalize jobs published again (stalled finalizations).
    pub republished: usize,
    /// Whether model slots were freed (chunks given up).
    pub freed_slots: bool,
}

/// One round of the pipeline's periodic work at `now`; each step is independent, so a
/// failing one (logged) does not stop the others, and every step is a compare-and-set, safe
/// to run from several schedulers:
/// 1. deadlines: `in_progress` batches past `expires_at` stop getting chunks (and are
///    finalized once nothing is in flight or the ending grace is over); `validating` ones
///    expire at once;
/// 2. chunk leases: expired ones are re-driven, waited for or given up ([`leases`]);
/// 3. endings: every `cancelling` batch gets its cancel flag raised again (the live state may
///    have lost it) and is asked to finalize if it never was; every expiring or finished
///    `in_progress` batch is asked too (a request that failed earlier, or a grace that
///    ended);
/// 4. stalled finalizations (lease absent or expired, job older than `finalize_retry_after`)
///    get their job published again.
pub async fn sweep_once(
    ports: &SchedulerPorts,
    settings: &PipelineSettings,
    now: i64,
) -> SweepReport {
    let mut report = SweepReport::default();

    match ports.metadata.expire_due(now).await {
        Ok(expired) => {
            for b in expired {
                report.expired += 1;
                if b.status == BatchStatus::Expired {
                    ::metrics::counter!(metrics::BATCH_TRANSITIONS, "to" => "expired").increment(1);
                    tracing::warn!(batch_id = %b.id, "batch reached its deadline while validating; expired");
                    continue;
                }
                tracing::info!(batch_id = %b.id, "batch reached its deadline; expiring");
                let asked = finalize_if_ready(ports, settings, &b.id, now).await;
                note_asked(&mut report, asked, &b.id);
            }
        }
        Err(e) => tracing::warn!(error = %e, "expiry sweep failed"),
    }

    let leases = leases::sweep(ports, settings, now).await;
    report.redriven = leases.redriven;
    report.given_up = leases.given_up.len();
    report.freed_slots = !leases.given_up.is_empty();
    for id in &leases.given_up {
        let asked = finalize_if_ready(ports, settings, id, now).await;
        note_asked(&mut report, asked, id);
    }

    match ports
        .metadata
        .batches_with_status(&[BatchStatus::Cancelling])
        .await
    {
        Ok(cancelling) => {
            for b in cancelling {
                if let Err(e) = ports.state.set_cancelled(b.id.as_str()).await {
                    tracing::debug!(batch_id = %b.id, error = %e, "could not raise the cancel flag again");
                }
                let asked = finalize_if_ready(ports, settings, &b.id, now).await;
                note_asked(&mut report, asked, &b.id);
            }
        }
        Err(e) => tracing::warn!(error = %e, "cancelling-batches sweep failed"),
    }
    match ports.metadata.dispatch_candidates().await {
        Ok(candidates) => {
            for c in candidates
                .iter()
                .filter(|c| c.pending == 0 && (c.in_flight == 0 || c.batch.expires_at <= now))
            {
                let asked = finalize_if_ready(ports, settings, &c.batch.id, now).await;
                note_asked(&mut report, asked, &c.batch.id);
            }
        }
        Err(e) => tracing::warn!(error = %e, "ending sweep failed"),
    }

    let retry = secs(settings.finalize_retry_after);
    match ports
        .metadata
        .claim_stalled_finalizations(now.saturating_sub(retry), now)
        .await
    {
        Ok(stalled) => {
            for b in stalled {
                tracing::warn!(batch_id = %b.id, status = %b.status, "finalization did not complete; publishing its job again");
                match publish_finalize(ports, &b).await {
                    Ok(()) => report.republished += 1,
                    Err(e) => {
                        tracing::warn!(batch_id = %b.id, error = %e, "could not re-publish a finalize job");
                    }
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "stalled-finalization sweep failed"),
    }
    report
}

/// Counts a finalization request of a sweep, or logs why it failed.
fn note_asked(report: &mut SweepReport, asked: Result<bool, SchedulerError>, id: &BatchId) {
    match asked {
        Ok(true) => report.finalizing += 1,
        Ok(false) => {}
        Err(e) => tracing::warn!(batch_id = %id, error = %e, "could not request finalization"),
    }
}

/// What [`recover`] did at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Chunk tasks published again.
    pub chunks: usize,
    /// Finalize jobs published again.
    pub finalize_jobs: usize,
    /// Cancel flags raised again.
    pub cancel_flags: usize,
    /// Steps that failed (each logged); the periodic sweeps cover what they missed.
    pub errors: usize,
}

/// Picks up, at start, every non-terminal batch where the previous run may have left it
/// (`validating` batches are the [`Validator`](crate::batches::Validator)'s): the tasks of
/// `in_progress` batches' dispatched chunks are published again and their leases extended by
/// a whole `chunk_lease` (their executors may still run them: they get a lease's time to
/// report before the lease sweep counts them lost); `cancelling` batches get their cancel
/// flag raised again (the live state may be empty); batches asked to finalize get their job
/// published again. Nothing stops at the first error: each failure is logged and counted,
/// and the periodic sweeps drive whatever was missed.
pub async fn recover(ports: &SchedulerPorts, settings: &PipelineSettings) -> Recovery {
    let mut recovery = Recovery::default();
    let now = now_unix();
    match ports.metadata.dispatch_candidates().await {
        Ok(candidates) => {
            for c in candidates.iter().filter(|c| c.in_flight > 0) {
                let chunks = match ports.metadata.dispatched_chunks(&c.batch.id).await {
                    Ok(chunks) => chunks,
                    Err(e) => {
                        tracing::warn!(batch_id = %c.batch.id, error = %e, "could not list dispatched chunks");
                        recovery.errors += 1;
                        continue;
                    }
                };
                for chunk in chunks {
                    let until = now.saturating_add(settings.chunk_lease_secs());
                    if let Err(e) = ports
                        .metadata
                        .extend_chunk_lease(&chunk.batch, chunk.span.index, until)
                        .await
                    {
                        tracing::warn!(batch_id = %chunk.batch, chunk = chunk.span.index, error = %e, "could not extend a chunk lease");
                    }
                    match dispatch::publish_task(ports, &c.batch, &chunk.span, chunk.attempt).await
                    {
                        Ok(()) => recovery.chunks += 1,
                        Err(e) => {
                            tracing::warn!(batch_id = %chunk.batch, chunk = chunk.span.index, error = %e, "could not re-publish a chunk task; its lease will re-drive it");
                            recovery.errors += 1;
                        }
                    }
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not list running batches");
            recovery.errors += 1;
        }
    }
    match ports
        .metadata
        .batches_with_status(&[BatchStatus::Cancelling])
        .await
    {
        Ok(cancelling) => {
            for b in cancelling {
                match ports.state.set_cancelled(b.id.as_str()).await {
                    Ok(()) => recovery.cancel_flags += 1,
                    Err(e) => {
                        tracing::warn!(batch_id = %b.id, error = %e, "could not raise a cancel flag");
                        recovery.errors += 1;
                    }
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not list cancelling batches");
            recovery.errors += 1;
        }
    }
    match ports.metadata.finalize_requested().await {
        Ok(batches) => {
            for b in batches {
                match publish_finalize(ports, &b).await {
                    Ok(()) => recovery.finalize_jobs += 1,
                    Err(e) => {
                        tracing::warn!(batch_id = %b.id, error = %e, "could not re-publish a finalize job");
                        recovery.errors += 1;
                    }
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not list batches being finalized");
            recovery.errors += 1;
        }
    }
    recovery
}
