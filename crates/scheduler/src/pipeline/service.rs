//! The Pipeline gRPC service: what the finalizer asks of the control plane — the plan of a
//! batch to finalize (with each chunk's failure, if it was given up), the finalization lease
//! (one finalizer at a time per batch), and the commit of its terminal state.

use nightshift_core::file::FileRecord;
use nightshift_core::results::Usage;
use nightshift_core::time::now_unix;
use nightshift_core::{ApiError, BatchId, FileId};
use nightshift_metadata::{BatchCommit, ProducedFile};
use nightshift_proto::status::status_from_api_error;
use nightshift_proto::v1::{
    self, CommitBatchRequest, FinalizePlan, GetFinalizePlanRequest, pipeline_server::Pipeline,
};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::{Ports, metrics};

pub struct PipelineService {
    ports: Ports,
}

impl PipelineService {
    pub fn new(ports: Ports) -> Self {
        Self { ports }
    }
}

fn err(e: ApiError) -> Status {
    status_from_api_error(&e)
}

fn store_err(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "metadata store failed");
    err(ApiError::unavailable("The metadata store is unavailable."))
}

fn batch_id(raw: &str) -> Result<BatchId, Status> {
    BatchId::parse(raw).map_err(|_| err(ApiError::no_such("Batch", raw)))
}

fn produced(f: Option<v1::ProducedFile>) -> Result<Option<ProducedFile>, Status> {
    f.map(|f| {
        Ok(ProducedFile {
            id: FileId::parse(&f.id)
                .map_err(|_| err(ApiError::invalid_value("file", "invalid file id")))?,
            bytes: f.bytes,
        })
    })
    .transpose()
}

#[tonic::async_trait]
impl Pipeline for PipelineService {
    async fn get_finalize_plan(
        &self,
        request: Request<GetFinalizePlanRequest>,
    ) -> Result<Response<FinalizePlan>, Status> {
        let id = batch_id(&request.into_inner().batch_id)?;
        let batch = self
            .ports
            .metadata
            .batch(&id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| err(ApiError::no_such("Batch", id.as_str())))?;
        let ending = self.ports.metadata.ending(&id).await.map_err(store_err)?;
        let chunks = self
            .ports
            .metadata
            .chunk_states(&id)
            .await
            .map_err(store_err)?;
        let input_key = FileId::parse(&batch.input_file_id)
            .map(|f| FileRecord::storage_key_for(&f))
            .unwrap_or_default();
        Ok(Response::new(FinalizePlan {
            batch: Some(v1::Batch::from(&batch)),
            input_storage_key: input_key,
            chunks: chunks
                .into_iter()
                .map(|c| v1::Chunk {
                    index: c.span.index,
                    byte_start: c.span.byte_start,
                    byte_end: c.span.byte_end,
                    first_line: c.span.first_line,
                    line_count: c.span.line_count,
                    done: c.done,
                    failure: c.failure,
                })
                .collect(),
            // a terminal batch has no ending to apply: the finalizer only cleans up
            ending: ending.map(|e| e.as_str().to_owned()).unwrap_or_default(),
        }))
    }

    async fn commit_batch(
        &self,
        request: Request<CommitBatchRequest>,
    ) -> Result<Response<v1::Batch>, Status> {
        let req = request.into_inner();
        let id = batch_id(&req.batch_id)?;
        let commit = BatchCommit {
            batch: id.clone(),
            output_file: produced(req.output_file)?,
            error_file: produced(req.error_file)?,
            completed: req.completed,
            failed: req.failed,
            usage: req.usage.as_ref().map(Usage::from).unwrap_or_default(),
        };
        let span = tracing::info_span!(
            "commit_batch",
            batch_id = %id,
            completed = commit.completed,
            failed = commit.failed
        );
        let batch = self
            .ports
            .metadata
            .commit_batch(&commit, now_unix())
            .instrument(span)
            .await
            .map_err(store_err)?
            .ok_or_else(|| err(ApiError::no_such("Batch", id.as_str())))?;
        ::metrics::counter!(metrics::BATCH_TRANSITIONS, "to" => batch.status.as_str()).increment(1);
        tracing::info!(
            batch_id = %batch.id, status = %batch.status, completed = commit.completed,
            failed = commit.failed, "batch ended"
        );
        Ok(Response::new(v1::Batch::from(&batch)))
    }

    async fn lease_finalization(
        &self,
        request: Request<v1::LeaseFinalizationRequest>,
    ) -> Result<Response<v1::LeaseFinalizationResponse>, Status> {
        let req = request.into_inner();
        let id = batch_id(&req.batch_id)?;
        if req.holder.is_empty() {
            return Err(err(ApiError::invalid_value(
                "holder",
                "a lease needs a holder",
            )));
        }
        if req.release {
            self.ports
                .metadata
                .release_finalization(&id, &req.holder)
                .await
                .map_err(store_err)?;
            return Ok(Response::new(v1::LeaseFinalizationResponse {
                granted: false,
                expires_at: 0,
                holder: String::new(),
            }));
        }
        if req.ttl_seconds == 0 {
            return Err(err(ApiError::invalid_value(
                "ttl_seconds",
                "a lease lasts at least one second",
            )));
        }
        let lease = self
            .ports
            .metadata
            .lease_finalization(&id, &req.holder, now_unix(), i64::from(req.ttl_seconds))
            .await
            .map_err(store_err)?;
        if !lease.granted {
            tracing::info!(
                batch_id = %id, holder = %req.holder, held_by = ?lease.holder,
                "finalization lease not granted"
            );
        }
        Ok(Response::new(v1::LeaseFinalizationResponse {
            granted: lease.granted,
            expires_at: lease.expires_at.unwrap_or_default(),
            holder: lease.holder.unwrap_or_default(),
        }))
    }
}
