//! The Batches gRPC service.

use nightshift_core::batch::{BatchRecord, BatchStatus, RequestCounts};
use nightshift_core::time::{now_unix, now_unix_micros};
use nightshift_core::{ApiError, BatchId, ErrorKind, TenantId};
use nightshift_metadata::{CancelOutcome, MetadataError};
use nightshift_proto::status::status_from_api_error;
use nightshift_proto::v1::{
    self, CancelBatchRequest, CreateBatchRequest, GetBatchRequest, ListBatchesRequest,
    ListBatchesResponse, batches_server::Batches,
};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::Validator;
use crate::pipeline::PipelineSettings;
use crate::{Ports, metrics};

pub struct BatchesService {
    ports: Ports,
    validator: Validator,
    pipeline: PipelineSettings,
}

impl BatchesService {
    pub fn new(ports: Ports, validator: Validator, pipeline: PipelineSettings) -> Self {
        Self {
            ports,
            validator,
            pipeline,
        }
    }
}

fn err(e: ApiError) -> Status {
    status_from_api_error(&e)
}

fn store_err(e: MetadataError) -> Status {
    tracing::error!(error = %e, "metadata store failed");
    err(ApiError::unavailable("The metadata store is unavailable."))
}

fn tenant(raw: &str) -> Result<TenantId, Status> {
    TenantId::parse(raw).map_err(|_| err(ApiError::internal("invalid tenant id from caller")))
}

/// A client-supplied batch id: one that cannot be ours is simply not found.
fn batch_id(raw: &str) -> Result<BatchId, Status> {
    BatchId::parse(raw).map_err(|_| err(ApiError::no_such("Batch", raw)))
}

#[tonic::async_trait]
impl Batches for BatchesService {
    async fn create_batch(
        &self,
        request: Request<CreateBatchRequest>,
    ) -> Result<Response<v1::Batch>, Status> {
        let req = request.into_inner();
        let id = BatchId::generate();
        // The batch's trace: every later step of its life (validation, chunks, results,
        // finalization) is parented on this span, remembered in the record.
        let span = tracing::info_span!("create_batch", batch_id = %id, tenant_id = %req.tenant_id);
        async {
            let created_at_us = now_unix_micros();
            let batch = BatchRecord {
                id,
                tenant_id: tenant(&req.tenant_id)?,
                endpoint: req.endpoint,
                input_file_id: req.input_file_id,
                completion_window: req.completion_window,
                status: BatchStatus::Validating,
                model: None,
                errors: vec![],
                metadata: req.has_metadata.then(|| req.metadata.into_iter().collect()),
                output_expires_after_secs: req.output_expires_after_seconds,
                output_file_id: None,
                error_file_id: None,
                created_at_us,
                in_progress_at: None,
                expires_at: created_at_us.div_euclid(1_000_000) + req.completion_window_seconds,
                finalizing_at: None,
                completed_at: None,
                failed_at: None,
                expired_at: None,
                cancelling_at: None,
                cancelled_at: None,
                request_counts: RequestCounts::default(),
                usage: Default::default(),
                traceparent: nightshift_telemetry::propagation::traceparent(
                    &tracing::Span::current(),
                ),
            };
            self.ports
                .metadata
                .insert_batch(&batch)
                .await
                .map_err(store_err)?;
            ::metrics::counter!(metrics::BATCH_TRANSITIONS, "to" => "validating").increment(1);
            tracing::info!(
                batch_id = %batch.id, tenant_id = %batch.tenant_id, input_file_id = %batch.input_file_id,
                endpoint = %batch.endpoint, "batch created"
            );
            self.validator.spawn(batch.clone());
            Ok(Response::new(v1::Batch::from(&batch)))
        }
        .instrument(span)
        .await
    }

    async fn get_batch(
        &self,
        request: Request<GetBatchRequest>,
    ) -> Result<Response<v1::Batch>, Status> {
        let req = request.into_inner();
        let batch = self
            .ports
            .metadata
            .get_batch(&tenant(&req.tenant_id)?, &batch_id(&req.id)?)
            .await
            .map_err(store_err)?
            .ok_or_else(|| err(ApiError::no_such("Batch", &req.id)))?;
        Ok(Response::new(v1::Batch::from(&batch)))
    }

    async fn list_batches(
        &self,
        request: Request<ListBatchesRequest>,
    ) -> Result<Response<ListBatchesResponse>, Status> {
        let req = request.into_inner();
        let tenant = tenant(&req.tenant_id)?;
        // An `after` that cannot be one of our ids names no batch: an empty page.
        let after = match req.after.as_deref() {
            None => None,
            Some(raw) => match BatchId::parse(raw) {
                Ok(id) => Some(id),
                Err(_) => {
                    return Ok(Response::new(ListBatchesResponse {
                        batches: vec![],
                        has_more: false,
                    }));
                }
            },
        };
        let page = self
            .ports
            .metadata
            .list_batches(&tenant, req.limit.clamp(1, 100), after.as_ref())
            .await
            .map_err(store_err)?;
        Ok(Response::new(ListBatchesResponse {
            batches: page.batches.iter().map(v1::Batch::from).collect(),
            has_more: page.has_more,
        }))
    }

    async fn cancel_batch(
        &self,
        request: Request<CancelBatchRequest>,
    ) -> Result<Response<v1::Batch>, Status> {
        let req = request.into_inner();
        let outcome = self
            .ports
            .metadata
            .cancel_batch(&tenant(&req.tenant_id)?, &batch_id(&req.id)?, now_unix())
            .await
            .map_err(store_err)?
            .ok_or_else(|| err(ApiError::no_such("Batch", &req.id)))?;
        let batch = match outcome {
            CancelOutcome::Cancelling(b) => {
                ::metrics::counter!(metrics::BATCH_TRANSITIONS, "to" => "cancelling").increment(1);
                tracing::info!(batch_id = %b.id, "batch cancelling");
                // Executors stop starting this batch's requests when they see the flag.
                if let Err(e) = self.ports.state.set_cancelled(b.id.as_str()).await {
                    tracing::warn!(batch_id = %b.id, error = %e, "could not raise the cancel flag; executors will finish their chunks");
                }
                // Nothing in flight (validating, or no chunk handed out yet): end it now.
                // Otherwise (or if this fails) the pipeline sweeps ask again until it ends.
                if let Err(e) = crate::pipeline::finalize_if_ready(
                    &self.ports,
                    &self.pipeline,
                    &b.id,
                    now_unix(),
                )
                .await
                {
                    tracing::warn!(batch_id = %b.id, error = %e, "finalization of the cancelled batch deferred");
                }
                b
            }
            CancelOutcome::AlreadyCancelled(b) => b,
            // Its ending is decided: it ends as it would have, and the cancel says so.
            CancelOutcome::Finalizing(b) => {
                tracing::info!(batch_id = %b.id, "cancel of a batch already finalizing: nothing to cancel");
                b
            }
            CancelOutcome::Terminal(b) => {
                return Err(err(ApiError::new(
                    ErrorKind::Conflict,
                    format!("Cannot cancel a batch with status '{}'.", b.status),
                )
                .not_retryable()));
            }
        };
        Ok(Response::new(v1::Batch::from(&batch)))
    }
}
