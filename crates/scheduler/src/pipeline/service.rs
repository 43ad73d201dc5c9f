//! The Pipeline gRPC service: what the finalizer asks of the control plane — the plan of a
//! batch to finalize (with each chunk's failure, if it was given up), the finalization lease
//! (one finalizer at a time per batch), and the commit of its terminal state.

use nightshift_core::FileId;
use nightshift_core::file::FileRecord;
use nightshift_core::results::Usage;
use nightshift_core::time::now_unix;
use nightshift_metadata::{BatchCommit, ProducedFile};
use nightshift_proto::v1::{
    self, CommitBatchRequest, FinalizePlan, GetFinalizePlanRequest, pipeline_server::Pipeline,
};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::ids::{batch_id, no_such};
use crate::{SchedulerError, SchedulerPorts, metrics};

pub struct PipelineService {
    ports: SchedulerPorts,
}

impl PipelineService {
    pub fn new(ports: SchedulerPorts) -> Self {
        Self { ports }
    }
}

fn produced(f: Option<v1::ProducedFile>) -> Result<Option<ProducedFile>, SchedulerError> {
    f.map(|f| {
        Ok(ProducedFile {
            id: FileId::parse(&f.id).map_err(|_| SchedulerError::InvalidValue {
                param: "file",
                message: "invalid file id",
            })?,
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
        Ok(Response::new(
            self.plan(&request.into_inner().batch_id).await?,
        ))
    }

    async fn commit_batch(
        &self,
        request: Request<CommitBatchRequest>,
    ) -> Result<Response<v1::Batch>, Status> {
        Ok(Response::new(self.commit(request.into_inner()).await?))
    }

    async fn lease_finalization(
        &self,
        request: Request<v1::LeaseFinalizationRequest>,
    ) -> Result<Response<v1::LeaseFinalizationResponse>, Status> {
        Ok(Response::new(self.lease(request.into_inner()).await?))
    }
}

impl PipelineService {
    /// What the finalizer needs to end the batch: the batch, its input, its chunks (with
    /// each one's failure if it was given up) and the ending to apply.
    async fn plan(&self, raw_id: &str) -> Result<FinalizePlan, SchedulerError> {
        let id = batch_id(raw_id)?;
        let batch = self
            .ports
            .metadata
            .batch(&id)
            .await?
            .ok_or_else(|| no_such("Batch", id.as_str()))?;
        let ending = self.ports.metadata.ending(&id).await?;
        let chunks = self.ports.metadata.chunk_states(&id).await?;
        let input_key = FileId::parse(&batch.input_file_id)
            .map(|f| FileRecord::storage_key_for(&f))
            .unwrap_or_default();
        Ok(FinalizePlan {
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
                    part: c.part.as_ref().map(v1::PartTally::from),
                })
                .collect(),
            // a terminal batch has no ending to apply: the finalizer only cleans up
            ending: ending.map(|e| e.as_str().to_owned()).unwrap_or_default(),
        })
    }

    /// Records the batch's terminal state and its output and error files.
    async fn commit(&self, req: CommitBatchRequest) -> Result<v1::Batch, SchedulerError> {
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
            .await?
            .ok_or_else(|| no_such("Batch", id.as_str()))?;
        ::metrics::counter!(metrics::BATCH_TRANSITIONS, "to" => batch.status.as_str()).increment(1);
        tracing::info!(
            batch_id = %batch.id, status = %batch.status, completed = commit.completed,
            failed = commit.failed, "batch ended"
        );
        Ok(v1::Batch::from(&batch))
    }

    /// Takes, renews or (with `release`) gives back the batch's finalization lease.
    async fn lease(
        &self,
        req: v1::LeaseFinalizationRequest,
    ) -> Result<v1::LeaseFinalizationResponse, SchedulerError> {
        let id = batch_id(&req.batch_id)?;
        if req.holder.is_empty() {
            return Err(SchedulerError::InvalidValue {
                param: "holder",
                message: "a lease needs a holder",
            });
        }
        if req.release {
            self.ports
                .metadata
                .release_finalization(&id, &req.holder)
                .await?;
            return Ok(v1::LeaseFinalizationResponse {
                granted: false,
                expires_at: 0,
                holder: String::new(),
            });
        }
        if req.ttl_seconds == 0 {
            return Err(SchedulerError::InvalidValue {
                param: "ttl_seconds",
                message: "a lease lasts at least one second",
            });
        }
        let lease = self
            .ports
            .metadata
            .lease_finalization(&id, &req.holder, now_unix(), i64::from(req.ttl_seconds))
            .await?;
        if !lease.granted {
            tracing::info!(
                batch_id = %id, holder = %req.holder, held_by = ?lease.holder,
                "finalization lease not granted"
            );
        }
        Ok(v1::LeaseFinalizationResponse {
            granted: lease.granted,
            expires_at: lease.expires_at.unwrap_or_default(),
            holder: lease.holder.unwrap_or_default(),
        })
    }
}
