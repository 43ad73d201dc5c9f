//! Validation: reads a batch's input once, as a stream, checks every line, finds the model,
//! and cuts the file into chunks — in memory bounded by configuration (the longest line, a
//! 16-byte hash per `custom_id`, and the chunk list), never by the file's size.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use nightshift_core::FileId;
use nightshift_core::batch::{BatchRecord, BatchStatus};
use nightshift_core::chunking::ChunkPlanner;
use nightshift_core::file::Purpose;
use nightshift_core::jsonl::{JsonlItem, JsonlSplitter};
use nightshift_core::routing::RoutingConfig;
use nightshift_core::time::now_unix;
use nightshift_core::validation::{BatchError, LineValidator, ValidationLimits};
use nightshift_metadata::ValidationOutcome;
use nightshift_storage::StorageError;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::BatchSettings;
use crate::{SchedulerError, SchedulerPorts, metrics};

/// Validates batches in the background, a bounded number at a time.
#[derive(Clone)]
pub struct Validator {
    ports: SchedulerPorts,
    settings: Arc<BatchSettings>,
    routing: Arc<RoutingConfig>,
    permits: Arc<Semaphore>,
    /// Wakes the dispatcher when a batch becomes runnable.
    wake: Arc<tokio::sync::Notify>,
    /// Cancelled when the scheduler stops: validations waiting to retry give up.
    stop: CancellationToken,
}

/// The first wait before a validation that hit an infrastructure fault is retried.
pub const VALIDATION_RETRY_BASE: Duration = Duration::from_secs(1);

impl Validator {
    pub fn new(
        ports: SchedulerPorts,
        settings: BatchSettings,
        routing: RoutingConfig,
        wake: Arc<tokio::sync::Notify>,
        stop: CancellationToken,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(settings.validation_concurrency.max(1)));
        Self {
            ports,
            settings: Arc::new(settings),
            routing: Arc::new(routing),
            permits,
            wake,
            stop,
        }
    }

    /// Validates `batch` in a background task and records the outcome. An infrastructure
    /// fault (S3 or the metadata store unreachable) never fails the batch: the read, or the
    /// recording of the outcome, is retried after a backoff starting at
    /// [`VALIDATION_RETRY_BASE`] and doubling up to `validation_retry_max`, while the batch
    /// is still `validating` and before its deadline (past it, the expiry sweep ends it
    /// `expired`) and until the scheduler stops (a restart validates it again).
    ///
    /// Runs in a `validate` span of the batch's trace.
    pub fn spawn(&self, batch: BatchRecord) {
        let me = self.clone();
        let span = tracing::info_span!("validate", batch_id = %batch.id, input_file_id = %batch.input_file_id);
        nightshift_telemetry::propagation::set_parent(&span, crate::pipeline::batch_trace(&batch));
        tokio::spawn(async move { me.run(batch).await }.instrument(span));
    }

    async fn run(&self, batch: BatchRecord) {
        let mut backoff = VALIDATION_RETRY_BASE;
        let outcome = loop {
            let attempt = {
                // The permit is held while reading only, not while waiting to retry.
                let Ok(_permit) = self.permits.clone().acquire_owned().await else {
                    return;
                };
                validate_input(&self.ports, &self.settings, &self.routing, &batch).await
            };
            match attempt {
                Ok(outcome) => break outcome,
                Err(e) => {
                    ::metrics::counter!(metrics::VALIDATION_RETRIES).increment(1);
                    tracing::warn!(batch_id = %batch.id, error = %e, retry_in = ?backoff, "could not read the input; the batch stays validating and is retried");
                    if !self.wait_to_retry(&batch, &mut backoff).await {
                        return;
                    }
                }
            }
        };
        loop {
            match self
                .ports
                .metadata
                .finish_validation(&batch.id, &outcome, now_unix())
                .await
            {
                Ok(Some(done)) => {
                    let status = done.status.as_str();
                    ::metrics::counter!(metrics::BATCH_TRANSITIONS, "to" => status).increment(1);
                    match &outcome {
                        ValidationOutcome::Failed { errors } => {
                            for e in errors {
                                ::metrics::counter!(metrics::VALIDATION_ERRORS, "code" => e.code.clone()).increment(1);
                            }
                            tracing::info!(batch_id = %done.id, errors = errors.len(), "batch failed validation");
                        }
                        ValidationOutcome::Ready {
                            total,
                            chunks,
                            model,
                        } => {
                            tracing::info!(batch_id = %done.id, total, chunks = chunks.len(), model = %model, "batch validated");
                            self.wake.notify_one();
                        }
                    }
                    return;
                }
                Ok(None) => {
                    tracing::info!(batch_id = %batch.id, "batch left validating meanwhile (cancelled or expired); outcome dropped");
                    return;
                }
                Err(e) => {
                    ::metrics::counter!(metrics::VALIDATION_RETRIES).increment(1);
                    tracing::warn!(batch_id = %batch.id, error = %e, retry_in = ?backoff, "could not record the validation outcome; retrying");
                    if !self.wait_to_retry(&batch, &mut backoff).await {
                        return;
                    }
                }
            }
        }
    }

    /// Waits `backoff` (never past the batch's deadline), then doubles it up to the cap.
    /// `false` when retrying is pointless: the deadline has passed (the expiry sweep ends the
    /// batch), it is no longer `validating` (cancelled, expired), or the scheduler stops.
    async fn wait_to_retry(&self, batch: &BatchRecord, backoff: &mut Duration) -> bool {
        let left = batch.expires_at.saturating_sub(now_unix());
        if left <= 0 {
            tracing::warn!(batch_id = %batch.id, "validation gave up at the batch's deadline; it expires");
            return false;
        }
        let wait = (*backoff).min(Duration::from_secs(left.unsigned_abs()));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            () = self.stop.cancelled() => return false,
        }
        *backoff = (*backoff * 2).min(
            self.settings
                .validation_retry_max
                .max(VALIDATION_RETRY_BASE),
        );
        match self.ports.metadata.batch(&batch.id).await {
            Ok(Some(b)) => b.status == BatchStatus::Validating,
            Ok(None) => false,
            // the store is down: try again (the next attempt finds out)
            Err(e) => {
                tracing::debug!(batch_id = %batch.id, error = %e, "cannot check the batch's status before retrying");
                true
            }
        }
    }

    /// Re-validates every batch left `validating` (after a restart).
    pub async fn recover(&self) -> Result<usize, nightshift_metadata::MetadataError> {
        let pending = self
            .ports
            .metadata
            .batches_with_status(&[BatchStatus::Validating])
            .await?;
        let n = pending.len();
        for b in pending {
            self.spawn(b);
        }
        Ok(n)
    }
}

fn input_error(message: String) -> ValidationOutcome {
    ValidationOutcome::Failed {
        errors: vec![BatchError {
            code: "invalid_request".into(),
            line: None,
            message,
            param: Some("input_file_id".into()),
        }],
    }
}

/// Validates a batch's input. `Err` only for infrastructure faults (the batch should be
/// retried); every problem with the input itself is a `Failed` outcome — a file whose bytes
/// are missing from object storage included.
pub async fn validate_input(
    ports: &SchedulerPorts,
    settings: &BatchSettings,
    routing: &RoutingConfig,
    batch: &BatchRecord,
) -> Result<ValidationOutcome, SchedulerError> {
    let Ok(file_id) = FileId::parse(&batch.input_file_id) else {
        return Ok(input_error(format!(
            "Input file {} does not exist.",
            batch.input_file_id
        )));
    };
    // The file as it was when the batch was created: deleting or expiring it since hides it
    // from the API, not from the batch.
    let file = ports
        .metadata
        .file_as_of(&batch.tenant_id, &file_id, batch.created_at())
        .await?;
    let Some(file) = file else {
        return Ok(input_error(format!(
            "Input file {} does not exist.",
            batch.input_file_id
        )));
    };
    if file.purpose != Purpose::Batch {
        return Ok(input_error(format!(
            "Input file {} has purpose '{}'; batch inputs must be uploaded with purpose 'batch'.",
            file.id, file.purpose
        )));
    }
    let limits = ValidationLimits {
        max_lines: settings.max_lines,
        max_errors: settings.max_errors,
        max_line_bytes: settings.max_line_bytes,
        max_file_bytes: settings.max_file_bytes,
    };
    let mut validator = LineValidator::new(&batch.endpoint, limits);
    let mut planner = ChunkPlanner::new(settings.chunk_max_lines, settings.chunk_max_bytes);
    let mut chunks = Vec::new();
    // A file over the size limit is not read at all: the report says file_too_large.
    if file.bytes <= settings.max_file_bytes {
        let body = match ports.storage.get(&file.storage_key, None).await {
            Ok(body) => body,
            Err(StorageError::NotFound(_)) => {
                return Ok(input_error(format!(
                    "Input file {} does not exist.",
                    batch.input_file_id
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let items = JsonlSplitter::new(settings.max_line_bytes).split_stream(body.stream);
        futures::pin_mut!(items);
        while let Some(item) = items.next().await {
            let item = item?;
            validator.push_item(&item);
            // Chunks are only kept while the input still looks valid; a failing batch
            // needs none, and this bounds their memory to valid inputs' (≤ max_lines).
            if let JsonlItem::Line(line) = &item
                && !validator.is_over_line_limit()
                && let Some(span) = planner.push(line)
            {
                chunks.push(span);
            }
        }
    }
    if let Some(span) = planner.finish() {
        chunks.push(span);
    }
    let report = validator.finish(file.bytes, |model| routing.serves(model));
    if !report.ok() {
        return Ok(ValidationOutcome::Failed {
            errors: report.errors,
        });
    }
    let Some(model) = report.model else {
        // ok() implies a model was found in a non-empty file; be safe anyway.
        return Ok(input_error("No model found in the input file.".into()));
    };
    Ok(ValidationOutcome::Ready {
        model,
        total: report.total_lines,
        chunks,
    })
}
