//! Fair, paced dispatch of chunk tasks.
//!
//! For each model, at most `max_in_flight_chunks_per_model` chunks are handed out and not yet
//! done, and at most `max_queued_chunks_per_model` of them not yet started by an executor (a
//! bounded lookahead: tasks in the queue are served first in, first out, so a slot given
//! fairly must not wait behind a long queue).
//! done. Each free slot of a model goes to the tenant that has been served the fewest request
//! lines on that model, and within a tenant to the batch with the earliest deadline
//! ([`fairness`]: a tenant that becomes active on a model starts at the current minimum
//! there, so a 10-line batch created behind a 200,000-line batch of another tenant is served
//! within one chunk of it). The accounts are loaded from the metadata store before the first
//! round and saved after every round that changed them, so a restarted scheduler goes on
//! where the last one stopped.
//!
//! A chunk is claimed (leased, attempt counted) before its task is published. If the publish
//! fails, the chunk is released at once (a fast path); if even that fails, its lease expires
//! and the lease sweep publishes the task again: no chunk stays dispatched without a lease.
//!
//! [`fairness`]: super::fairness

use std::sync::Arc;

use nightshift_core::FileId;
use nightshift_core::batch::BatchRecord;
use nightshift_core::chunking::ChunkSpan;
use nightshift_core::file::FileRecord;
use nightshift_core::time::now_unix;
use nightshift_metadata::{DispatchAccount, DispatchCandidate};
use nightshift_proto::v1::ChunkTask;
use nightshift_queue::QueueKind;
use nightshift_telemetry::propagation;
use prost::Message;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::fairness::{self, Fairness};
use super::{PipelineSettings, SCHEMA_VERSION, batch_trace};
use crate::{SchedulerError, SchedulerPorts, metrics};

/// The dispatcher and its fairness state.
pub struct Dispatcher {
    ports: SchedulerPorts,
    settings: PipelineSettings,
    /// Lines handed out per model and tenant: who gets the next free slot.
    fairness: Fairness,
    /// The accounts as the metadata store last had them; `None` until loaded from it (before
    /// the first round).
    saved: Option<Vec<DispatchAccount>>,
}

impl Dispatcher {
    pub fn new(ports: SchedulerPorts, settings: PipelineSettings) -> Self {
        Self {
            ports,
            settings,
            fairness: Fairness::default(),
            saved: None,
        }
    }

    /// Runs until `stop` is cancelled; `wake` makes it look for work at once.
    pub async fn run(mut self, wake: Arc<Notify>, stop: CancellationToken) {
        loop {
            if let Err(e) = self.round().await {
                tracing::warn!(error = %e, "dispatch round failed");
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(self.settings.dispatch_interval) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// One round: fills every model's free slots, then saves the fairness accounts if they
    /// changed (also when a fill failed part way: what was handed out counts). Returns how
    /// many chunks were handed out.
    pub async fn round(&mut self) -> Result<usize, SchedulerError> {
        if self.saved.is_none() {
            let accounts = self.ports.metadata.dispatch_accounts().await?;
            self.fairness = Fairness::from_accounts(accounts);
            self.saved = Some(self.fairness.accounts());
        }
        let candidates = self.ports.metadata.dispatch_candidates().await?;
        self.fairness.admit(&candidates);
        let mut handed_out = 0;
        let mut filled = Ok(());
        for (model, batches) in fairness::by_model(candidates) {
            match self.fill(&model, batches).await {
                Ok(n) => handed_out += n,
                Err(e) => {
                    filled = Err(e);
                    break;
                }
            }
        }
        self.save().await?;
        filled.map(|()| handed_out)
    }

    /// Saves the fairness accounts unless the store already has them.
    async fn save(&mut self) -> Result<(), SchedulerError> {
        let accounts = self.fairness.accounts();
        if self.saved.as_ref() == Some(&accounts) {
            return Ok(());
        }
        self.ports
            .metadata
            .save_dispatch_accounts(&accounts)
            .await?;
        self.saved = Some(accounts);
        Ok(())
    }

    /// Hands out `model`'s free slots to its `batches`, fairly. Returns how many chunks were
    /// handed out.
    async fn fill(
        &mut self,
        model: &str,
        mut batches: Vec<DispatchCandidate>,
    ) -> Result<usize, SchedulerError> {
        let mut free = fairness::free_slots(
            self.settings.max_in_flight_chunks_per_model,
            self.settings.max_queued_chunks_per_model,
            &batches,
        );
        let mut handed_out = 0;
        while free > 0 {
            let Some(pick) = self.fairness.pick(&batches) else {
                break;
            };
            let batch = &batches[pick].batch;
            let Some(span) = self.hand_out(batch).await? else {
                // its chunks were all taken meanwhile (another scheduler, a cancel)
                batches[pick].pending = 0;
                continue;
            };
            self.fairness
                .record(model, &batch.tenant_id, span.line_count);
            ::metrics::counter!(metrics::CHUNKS_DISPATCHED).increment(1);
            tracing::debug!(batch_id = %batch.id, chunk = span.index, model = %model, "chunk dispatched");
            batches[pick].pending -= 1;
            free -= 1;
            handed_out += 1;
        }
        Ok(handed_out)
    }

    /// Claims `batch`'s next pending chunk and publishes its task. `None` when it has no
    /// pending chunk left. A task that cannot be published puts its chunk back (it is handed
    /// out again next round; should that fail too, its lease expires and the lease sweep
    /// publishes it).
    async fn hand_out(&self, batch: &BatchRecord) -> Result<Option<ChunkSpan>, SchedulerError> {
        let claimed = self
            .ports
            .metadata
            .claim_next_chunk(&batch.id, now_unix(), self.settings.chunk_lease_secs())
            .await?;
        let Some(leased) = claimed else {
            return Ok(None);
        };
        let span = leased.span;
        if let Err(e) = publish_task(&self.ports, batch, &span, leased.attempt).await {
            if let Err(release) = self
                .ports
                .metadata
                .release_chunk(&batch.id, span.index)
                .await
            {
                tracing::warn!(
                    batch_id = %batch.id, chunk = span.index, error = %release,
                    "could not release a chunk whose task was not published; its lease will re-drive it"
                );
            }
            return Err(e);
        }
        Ok(Some(span))
    }
}

/// Publishes a chunk's task (dispatch number `attempt`) in a `dispatch_chunk` span of the
/// batch's trace; the task carries the span's context to the executor.
pub(crate) async fn publish_task(
    ports: &SchedulerPorts,
    batch: &BatchRecord,
    span: &ChunkSpan,
    attempt: u32,
) -> Result<(), SchedulerError> {
    let trace = tracing::info_span!(
        "dispatch_chunk",
        batch_id = %batch.id,
        chunk_index = span.index,
        line_count = span.line_count,
        attempt,
    );
    propagation::set_parent(&trace, batch_trace(batch));
    let input = FileId::parse(&batch.input_file_id).map_err(|e| {
        SchedulerError::Malformed(format!(
            "batch {} has an invalid input file id {:?}: {e}",
            batch.id, batch.input_file_id
        ))
    })?;
    let task = ChunkTask {
        schema_version: SCHEMA_VERSION,
        batch_id: batch.id.to_string(),
        tenant_id: batch.tenant_id.to_string(),
        chunk_index: span.index,
        input_storage_key: FileRecord::storage_key_for(&input),
        byte_start: span.byte_start,
        byte_end: span.byte_end,
        first_line: span.first_line,
        line_count: span.line_count,
        endpoint: batch.endpoint.clone(),
        model: batch.model.clone().unwrap_or_default(),
        deadline: batch.expires_at,
        attempt,
    };
    let headers = propagation::message_headers(&trace);
    ports
        .queue
        .publish(QueueKind::ChunkTasks, task.encode_to_vec().into(), headers)
        .instrument(trace)
        .await?;
    Ok(())
}
