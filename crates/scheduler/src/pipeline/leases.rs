//! The chunk lease sweep: finds dispatched chunks nobody reports on and drives them again.
//!
//! A chunk is leased when it is handed out and each RUNNING report of its executor (sent when
//! it starts the chunk and every heartbeat interval) renews the lease. Once a lease expired
//! (see [`MetadataStore::sweep_chunk_leases`] for the exact rules):
//! - the chunk was started: its executor died or went silent, or the task or its result was
//!   dead-lettered. Its task is published again with the next attempt number, up to
//!   `max_chunk_attempts`; then the chunk is given up (`failed`), its unfinished lines become
//!   `chunk_failed` error lines, and its model slot is freed;
//! - it was never started: its task is probably still queued behind others (executors are
//!   busy, or down: an executor outage never fails lines). If the chunk-tasks queue has
//!   ready messages, only the lease is extended; if it has none, the task was lost (a publish
//!   that failed after the claim, a restart at the wrong moment) and it is published again
//!   without counting an attempt.
//!
//! A re-driven chunk that was in fact still running is harmless: re-runs keep every final
//! result of the part and count no line twice.
//!
//! [`MetadataStore::sweep_chunk_leases`]: nightshift_metadata::MetadataStore::sweep_chunk_leases

use std::collections::HashMap;

use nightshift_core::BatchId;
use nightshift_core::batch::BatchRecord;
use nightshift_metadata::LeasePolicy;
use nightshift_queue::QueueKind;

use super::{PipelineSettings, dispatch};
use crate::{SchedulerPorts, metrics};

/// What one lease sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseReport {
    /// Chunk tasks published again.
    pub redriven: usize,
    /// Leases extended because tasks wait in the queue.
    pub extended: u64,
    /// Batches that had a chunk given up (each once): they may be ready to finalize.
    pub given_up: Vec<BatchId>,
}

/// One lease sweep at `now`. Failures are logged: a task that could not be published keeps
/// its renewed lease and is found again when that expires.
pub async fn sweep(ports: &SchedulerPorts, settings: &PipelineSettings, now: i64) -> LeaseReport {
    // A queue that cannot tell its depth counts as busy: extending a lease is always safe.
    let tasks_waiting = match ports.queue.depth(QueueKind::ChunkTasks).await {
        Ok(depth) => depth > 0,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the chunk-tasks queue depth");
            true
        }
    };
    let policy = LeasePolicy {
        lease_secs: settings.chunk_lease_secs(),
        max_attempts: settings.max_chunk_attempts.max(1),
        tasks_waiting,
    };
    let swept = match ports.metadata.sweep_chunk_leases(now, &policy).await {
        Ok(swept) => swept,
        Err(e) => {
            tracing::warn!(error = %e, "chunk lease sweep failed");
            return LeaseReport::default();
        }
    };
    let mut report = LeaseReport {
        extended: swept.extended,
        ..LeaseReport::default()
    };
    if swept.extended > 0 {
        tracing::debug!(
            chunks = swept.extended,
            "chunk leases extended: their tasks wait in the queue"
        );
    }
    for chunk in &swept.failed {
        ::metrics::counter!(metrics::CHUNKS_FAILED, "reason" => "attempts").increment(1);
        tracing::error!(
            batch_id = %chunk.batch, chunk = chunk.span.index, attempts = chunk.attempt,
            "chunk given up: its executors stopped reporting; its unfinished lines fail"
        );
        if !report.given_up.contains(&chunk.batch) {
            report.given_up.push(chunk.batch.clone());
        }
    }
    let mut batches: HashMap<BatchId, Option<BatchRecord>> = HashMap::new();
    for chunk in &swept.redrive {
        if !batches.contains_key(&chunk.batch) {
            let batch = match ports.metadata.batch(&chunk.batch).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(batch_id = %chunk.batch, error = %e, "cannot re-drive a chunk now; its lease will expire again");
                    continue;
                }
            };
            batches.insert(chunk.batch.clone(), batch);
        }
        let Some(Some(batch)) = batches.get(&chunk.batch) else {
            continue;
        };
        match dispatch::publish_task(ports, batch, &chunk.span, chunk.attempt).await {
            Ok(()) => {
                report.redriven += 1;
                ::metrics::counter!(metrics::CHUNKS_REDRIVEN).increment(1);
                tracing::warn!(
                    batch_id = %chunk.batch, chunk = chunk.span.index, attempt = chunk.attempt,
                    "chunk lease expired without news; task published again"
                );
            }
            Err(e) => {
                tracing::warn!(batch_id = %chunk.batch, chunk = chunk.span.index, error = %e, "could not re-drive a chunk; its lease will expire again");
            }
        }
    }
    report
}
