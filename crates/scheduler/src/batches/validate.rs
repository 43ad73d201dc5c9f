//! Validation: reads a batch's input once, as a stream, checks every line, finds the model,
//! and cuts the file into chunks — in memory bounded by configuration (the longest line, a
//! 16-byte hash per `custom_id`, and the chunk list), never by the file's size.

use std::sync::Arc;

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
use tokio::sync::Semaphore;
use tracing::Instrument;

use super::BatchSettings;
use crate::{Ports, metrics};

/// Validates batches in the background, a bounded number at a time.
#[derive(Clone)]
pub struct Validator {
    ports: Ports,
    settings: Arc<BatchSettings>,
    routing: Arc<RoutingConfig>,
    permits: Arc<Semaphore>,
    /// Wakes the dispatcher when a batch becomes runnable.
    wake: Arc<tokio::sync::Notify>,
}

impl Validator {
    pub fn new(
        ports: Ports,
        settings: BatchSettings,
        routing: RoutingConfig,
        wake: Arc<tokio::sync::Notify>,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(settings.validation_concurrency.max(1)));
        Self {
            ports,
            settings: Arc::new(settings),
            routing: Arc::new(routing),
            permits,
            wake,
        }
    }

    /// Validates `batch` in a background task and records the outcome. If the input cannot
    /// be read (storage down), the batch stays `validating` and is retried at the next
    /// scheduler start — it never fails for an infrastructure fault.
    ///
    /// Runs in a `validate` span of the batch's trace.
    pub fn spawn(&self, batch: BatchRecord) {
        let me = self.clone();
        let span = tracing::info_span!("validate", batch_id = %batch.id, input_file_id = %batch.input_file_id);
        nightshift_telemetry::propagation::set_parent(&span, crate::pipeline::batch_trace(&batch));
        tokio::spawn(async move {
            let Ok(_permit) = me.permits.clone().acquire_owned().await else {
                return;
            };
            let outcome = match validate_input(&me.ports, &me.settings, &me.routing, &batch).await {
                Ok(outcome) => outcome,
                Err(e) => {
                    tracing::error!(batch_id = %batch.id, error = %e, "could not read the input; the batch stays validating");
                    return;
                }
            };
            match me
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
                            me.wake.notify_one();
                        }
                    }
                }
                Ok(None) => {
                    tracing::info!(batch_id = %batch.id, "batch left validating meanwhile (cancelled); outcome dropped");
                }
                Err(e) => {
                    tracing::error!(batch_id = %batch.id, error = %e, "could not record the validation outcome");
                }
            }
        }.instrument(span));
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
/// retried); every problem with the input itself is a `Failed` outcome.
pub async fn validate_input(
    ports: &Ports,
    settings: &BatchSettings,
    routing: &RoutingConfig,
    batch: &BatchRecord,
) -> Result<ValidationOutcome, String> {
    let Ok(file_id) = FileId::parse(&batch.input_file_id) else {
        return Ok(input_error(format!(
            "Input file {} does not exist.",
            batch.input_file_id
        )));
    };
    let file = ports
        .metadata
        .get_file(&batch.tenant_id, &file_id, now_unix())
        .await
        .map_err(|e| e.to_string())?;
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
        let body = ports
            .storage
            .get(&file.storage_key, None)
            .await
            .map_err(|e| e.to_string())?;
        let items = JsonlSplitter::new(settings.max_line_bytes).split_stream(body.stream);
        futures::pin_mut!(items);
        while let Some(item) = items.next().await {
            let item = item.map_err(|e| e.to_string())?;
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
