//! The Batches gRPC service.

use nightshift_core::BatchId;
use nightshift_core::batch::{BatchRecord, BatchStatus, RequestCounts};
use nightshift_core::idempotency::IdempotentKind;
use nightshift_core::time::{now_unix, now_unix_micros};
use nightshift_metadata::{CancelOutcome, Inserted};
use nightshift_proto::v1::{
    self, CancelBatchRequest, CreateBatchOnceRequest, CreateBatchRequest, GetBatchRequest,
    ListBatchesRequest, ListBatchesResponse, ListRetriesRequest, RetryBatchRequest,
    batches_server::Batches,
};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::Validator;
use crate::ids::{batch_id, caller_tenant, no_such};
use crate::pipeline::PipelineSettings;
use crate::{SchedulerError, SchedulerPorts, idempotency, metrics};

pub struct BatchesService {
    ports: SchedulerPorts,
    validator: Validator,
    pipeline: PipelineSettings,
}

impl BatchesService {
    pub fn new(ports: SchedulerPorts, validator: Validator, pipeline: PipelineSettings) -> Self {
        Self {
            ports,
            validator,
            pipeline,
        }
    }
}

#[tonic::async_trait]
impl Batches for BatchesService {
    async fn create_batch(
        &self,
        request: Request<CreateBatchRequest>,
    ) -> Result<Response<v1::Batch>, Status> {
        Ok(Response::new(
            self.create(request.into_inner(), None).await?,
        ))
    }

    async fn get_batch(
        &self,
        request: Request<GetBatchRequest>,
    ) -> Result<Response<v1::Batch>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.get(&req.tenant_id, &req.id).await?))
    }

    async fn list_batches(
        &self,
        request: Request<ListBatchesRequest>,
    ) -> Result<Response<ListBatchesResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner(), None).await?))
    }

    async fn cancel_batch(
        &self,
        request: Request<CancelBatchRequest>,
    ) -> Result<Response<v1::Batch>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.cancel(&req.tenant_id, &req.id).await?))
    }

    async fn retry_batch(
        &self,
        request: Request<RetryBatchRequest>,
    ) -> Result<Response<v1::Batch>, Status> {
        let batch =
            super::retry::create(&self.ports, &self.validator, request.into_inner()).await?;
        Ok(Response::new(batch))
    }

    async fn create_batch_once(
        &self,
        request: Request<CreateBatchOnceRequest>,
    ) -> Result<Response<v1::Batch>, Status> {
        let req = request.into_inner();
        let batch = req
            .batch
            .ok_or_else(|| SchedulerError::Malformed("CreateBatchOnce without a batch".into()))?;
        Ok(Response::new(
            self.create(batch, req.idempotency.as_ref()).await?,
        ))
    }

    async fn list_retries(
        &self,
        request: Request<ListRetriesRequest>,
    ) -> Result<Response<ListBatchesResponse>, Status> {
        let req = request.into_inner();
        let page = self
            .list(
                ListBatchesRequest {
                    tenant_id: req.tenant_id,
                    limit: req.limit,
                    after: req.after,
                },
                Some(&req.retry_of),
            )
            .await?;
        Ok(Response::new(page))
    }
}

impl BatchesService {
    /// Stores the batch `validating` and spawns its validation.
    async fn create(
        &self,
        req: CreateBatchRequest,
        idempotency: Option<&v1::Idempotency>,
    ) -> Result<v1::Batch, SchedulerError> {
        self.validator.check_endpoint(&req.endpoint)?;
        let id = BatchId::generate();
        // The batch's trace: every later step of its life (validation, chunks, results,
        // finalization) is parented on this span, remembered in the record.
        let span = tracing::info_span!("create_batch", batch_id = %id, tenant_id = %req.tenant_id);
        async {
            let created_at_us = now_unix_micros();
            let batch = BatchRecord {
                id,
                tenant_id: caller_tenant(&req.tenant_id)?,
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
            let claim = idempotency::claim(
                idempotency,
                IdempotentKind::Batch,
                batch.created_at(),
            );
            let inserted = self
                .ports
                .metadata
                .insert_batch_once(&batch, None, claim.as_ref(), self.validator.quotas())
                .await?;
            if let (Inserted::Replayed(earlier), Some(claim)) = (&inserted, &claim) {
                // Another request with this key (a retry, or a racing twin) made the batch.
                let id = idempotency::replayed(earlier, claim)?;
                return self.get(batch.tenant_id.as_str(), id).await;
            }
            ::metrics::counter!(metrics::BATCH_TRANSITIONS, "to" => "validating").increment(1);
            tracing::info!(
                batch_id = %batch.id, tenant_id = %batch.tenant_id, input_file_id = %batch.input_file_id,
                endpoint = %batch.endpoint, "batch created"
            );
            self.validator.spawn(batch.clone());
            Ok(v1::Batch::from(&batch))
        }
        .instrument(span)
        .await
    }

    async fn get(&self, tenant_id: &str, id: &str) -> Result<v1::Batch, SchedulerError> {
        let batch = self
            .ports
            .metadata
            .get_batch(&caller_tenant(tenant_id)?, &batch_id(id)?)
            .await?
            .ok_or_else(|| no_such("Batch", id))?;
        Ok(v1::Batch::from(&batch))
    }

    /// A page of the tenant's batches, or of the retries of `retry_of`.
    async fn list(
        &self,
        req: ListBatchesRequest,
        retry_of: Option<&str>,
    ) -> Result<ListBatchesResponse, SchedulerError> {
        let tenant = caller_tenant(&req.tenant_id)?;
        // An `after` that cannot be one of our ids names no batch: an empty page.
        let after = match req.after.as_deref().map(BatchId::parse).transpose() {
            Ok(after) => after,
            Err(_) => {
                return Ok(ListBatchesResponse {
                    batches: vec![],
                    has_more: false,
                });
            }
        };
        let limit = req.limit.clamp(1, 100);
        let page = match retry_of {
            // `?retry_of=`: the retries of one batch (one that cannot be ours has none)
            Some(parent) => match BatchId::parse(parent) {
                Ok(parent) => {
                    self.ports
                        .metadata
                        .list_retries(&tenant, &parent, limit, after.as_ref())
                        .await?
                }
                Err(_) => nightshift_metadata::BatchPage {
                    batches: vec![],
                    has_more: false,
                },
            },
            None => {
                self.ports
                    .metadata
                    .list_batches(&tenant, limit, after.as_ref())
                    .await?
            }
        };
        // Cut to fit one gRPC message: 100 failed batches with 1,000 errors each do not.
        let (batches, has_more) = crate::page::fit(
            page.batches.iter().map(v1::Batch::from).collect(),
            page.has_more,
            crate::page::LIST_BUDGET_BYTES,
        );
        Ok(ListBatchesResponse { batches, has_more })
    }

    /// Cancels a `validating` or `in_progress` batch (it becomes `cancelling`, executors are
    /// told, and it is finalized as soon as nothing is in flight). Cancelling a batch already
    /// cancelling or finalizing changes nothing; a terminal one is a conflict.
    async fn cancel(&self, tenant_id: &str, id: &str) -> Result<v1::Batch, SchedulerError> {
        let outcome = self
            .ports
            .metadata
            .cancel_batch(&caller_tenant(tenant_id)?, &batch_id(id)?, now_unix())
            .await?
            .ok_or_else(|| no_such("Batch", id))?;
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
                return Err(SchedulerError::Conflict(format!(
                    "Cannot cancel a batch with status '{}'.",
                    b.status
                )));
            }
        };
        Ok(v1::Batch::from(&batch))
    }
}
