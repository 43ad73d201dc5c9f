//! The Files gRPC service. Bytes are already in object storage when a file is registered; the
//! scheduler records it, answers lookups scoped to the caller's tenant, and deletes. A deleted
//! file disappears from the API at once; its bytes go at once too, unless an unfinished batch
//! reads it (they then stay until every such batch is terminal: the sweeper reclaims them).

use nightshift_core::file::{FileRecord, Purpose};
use nightshift_core::idempotency::IdempotentKind;
use nightshift_core::page::Order;
use nightshift_core::time::{now_unix, now_unix_micros};
use nightshift_core::{FileId, TenantId};
use nightshift_metadata::{FileQuery, Inserted, Quotas};
use nightshift_proto::v1::{
    self, DeleteFileRequest, DeleteFileResponse, GetFileRequest, IdempotencyKeyRecord,
    ListFilesRequest, ListFilesResponse, LookupIdempotencyKeyRequest, RegisterFileOnceRequest,
    RegisterFileRequest, files_server::Files,
};
use tonic::{Request, Response, Status};

use crate::ids::{caller_tenant, file_id, no_such};
use crate::{SchedulerError, SchedulerPorts, idempotency, metrics};

pub struct FilesService {
    ports: SchedulerPorts,
    /// The default quotas (`[scheduler.quotas]`): an upload is checked against
    /// `max_stored_bytes`.
    quotas: Quotas,
}

impl FilesService {
    pub fn new(ports: SchedulerPorts, quotas: Quotas) -> Self {
        Self { ports, quotas }
    }
}

fn purpose(raw: &str) -> Result<Purpose, SchedulerError> {
    Purpose::parse(raw).ok_or(SchedulerError::InvalidValue {
        param: "purpose",
        message: "unknown purpose",
    })
}

#[tonic::async_trait]
impl Files for FilesService {
    async fn register_file(
        &self,
        request: Request<RegisterFileRequest>,
    ) -> Result<Response<v1::File>, Status> {
        Ok(Response::new(
            self.register(request.into_inner(), None).await?,
        ))
    }

    async fn get_file(
        &self,
        request: Request<GetFileRequest>,
    ) -> Result<Response<v1::File>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.get(&req.tenant_id, &req.id).await?))
    }

    async fn list_files(
        &self,
        request: Request<ListFilesRequest>,
    ) -> Result<Response<ListFilesResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn delete_file(
        &self,
        request: Request<DeleteFileRequest>,
    ) -> Result<Response<DeleteFileResponse>, Status> {
        let req = request.into_inner();
        self.delete(&req.tenant_id, &req.id).await?;
        Ok(Response::new(DeleteFileResponse { id: req.id }))
    }

    async fn register_file_once(
        &self,
        request: Request<RegisterFileOnceRequest>,
    ) -> Result<Response<v1::File>, Status> {
        let req = request.into_inner();
        let file = req
            .file
            .ok_or_else(|| SchedulerError::Malformed("RegisterFileOnce without a file".into()))?;
        Ok(Response::new(
            self.register(file, req.idempotency.as_ref()).await?,
        ))
    }

    async fn lookup_idempotency_key(
        &self,
        request: Request<LookupIdempotencyKeyRequest>,
    ) -> Result<Response<IdempotencyKeyRecord>, Status> {
        Ok(Response::new(self.lookup_key(request.into_inner()).await?))
    }
}

impl FilesService {
    async fn register(
        &self,
        req: RegisterFileRequest,
        idempotency: Option<&v1::Idempotency>,
    ) -> Result<v1::File, SchedulerError> {
        let purpose = purpose(&req.purpose)?;
        let created_at_us = now_unix_micros();
        let created_at = created_at_us.div_euclid(1_000_000);
        let ttl = req.expires_after_seconds.or(purpose.default_ttl_secs());
        let record = FileRecord {
            id: FileId::parse(&req.id)
                .map_err(|_| SchedulerError::Malformed("invalid file id from caller".into()))?,
            tenant_id: caller_tenant(&req.tenant_id)?,
            bytes: req.bytes,
            created_at,
            created_at_us,
            expires_at: ttl.map(|s| created_at + s),
            filename: req.filename,
            purpose,
            storage_key: req.storage_key,
        };
        let claim = idempotency::claim(idempotency, IdempotentKind::File, created_at);
        let inserted = self
            .ports
            .metadata
            .insert_file_once(&record, claim.as_ref(), &self.quotas)
            .await?;
        if let (Inserted::Replayed(earlier), Some(claim)) = (&inserted, &claim) {
            // Another request with this key (a retry, or a racing twin) made the file first.
            let id = idempotency::replayed(earlier, claim)?;
            return self
                .created_earlier(&record.tenant_id, id, earlier.created_at)
                .await;
        }
        ::metrics::counter!(metrics::FILES_REGISTERED, "purpose" => purpose.as_str()).increment(1);
        tracing::info!(
            file_id = %record.id, tenant_id = %record.tenant_id, bytes = record.bytes,
            purpose = %purpose, "file registered"
        );
        Ok(v1::File::from(&record))
    }

    /// The file an earlier request with an `Idempotency-Key` created at `at`, as it was then
    /// (deleted or expired since or not); not found once its record is purged.
    async fn created_earlier(
        &self,
        tenant: &TenantId,
        id: &str,
        at: i64,
    ) -> Result<v1::File, SchedulerError> {
        let file = self
            .ports
            .metadata
            .file_as_of(tenant, &file_id(id)?, at)
            .await?
            .ok_or_else(|| no_such("File", id))?;
        Ok(v1::File::from(&file))
    }

    /// `LookupIdempotencyKey`: the tenant's live key and, for an upload, its file.
    async fn lookup_key(
        &self,
        req: LookupIdempotencyKeyRequest,
    ) -> Result<IdempotencyKeyRecord, SchedulerError> {
        let tenant = caller_tenant(&req.tenant_id)?;
        let Some(rec) = self
            .ports
            .metadata
            .idempotency_record(&tenant, &req.key, now_unix())
            .await?
        else {
            return Ok(IdempotencyKeyRecord::default());
        };
        let file = match rec.kind {
            IdempotentKind::File => match self
                .created_earlier(&tenant, &rec.object_id, rec.created_at)
                .await
            {
                Ok(f) => Some(f),
                Err(SchedulerError::NotFound { .. }) => None,
                Err(e) => return Err(e),
            },
            IdempotentKind::Batch => None,
        };
        Ok(IdempotencyKeyRecord {
            found: true,
            kind: rec.kind.as_str().to_owned(),
            request_hash: rec.request_hash,
            object_id: rec.object_id,
            file,
        })
    }

    async fn get(&self, tenant_id: &str, id: &str) -> Result<v1::File, SchedulerError> {
        let file = self
            .ports
            .metadata
            .get_file(&caller_tenant(tenant_id)?, &file_id(id)?, now_unix())
            .await?
            .ok_or_else(|| no_such("File", id))?;
        Ok(v1::File::from(&file))
    }

    async fn list(&self, req: ListFilesRequest) -> Result<ListFilesResponse, SchedulerError> {
        let tenant = caller_tenant(&req.tenant_id)?;
        let purpose = req.purpose.as_deref().map(purpose).transpose()?;
        // An `after` that cannot be one of our ids names no file: an empty page.
        let after = match req.after.as_deref().map(FileId::parse).transpose() {
            Ok(after) => after,
            Err(_) => {
                return Ok(ListFilesResponse {
                    files: vec![],
                    has_more: false,
                });
            }
        };
        let query = FileQuery {
            purpose,
            limit: req.limit.clamp(1, 10_000),
            order: Order::from(req.order()),
            after,
        };
        let page = self
            .ports
            .metadata
            .list_files(&tenant, &query, now_unix())
            .await?;
        // Cut to fit one gRPC message: 10,000 files with long names do not.
        let (files, has_more) = crate::page::fit(
            page.files.iter().map(v1::File::from).collect(),
            page.has_more,
            crate::page::LIST_BUDGET_BYTES,
        );
        Ok(ListFilesResponse { files, has_more })
    }

    /// Hides the file at once; its bytes go now, or at the next sweep if storage fails —
    /// unless an unfinished batch reads it: then they stay until every such batch is
    /// terminal (the sweeper skips them until then).
    async fn delete(&self, tenant_id: &str, id: &str) -> Result<(), SchedulerError> {
        let file = self
            .ports
            .metadata
            .delete_file(&caller_tenant(tenant_id)?, &file_id(id)?, now_unix())
            .await?
            .ok_or_else(|| no_such("File", id))?;
        ::metrics::counter!(metrics::FILES_DELETED).increment(1);
        tracing::info!(file_id = %file.id, tenant_id = %file.tenant_id, "file deleted");
        match self.ports.metadata.input_in_use(&file.id).await {
            Ok(false) => {}
            Ok(true) => {
                tracing::info!(file_id = %file.id, "the input of an unfinished batch: its bytes stay until the batch ends");
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(file_id = %file.id, error = %e, "byte deletion deferred to the sweeper");
                return Ok(());
            }
        }
        match self.ports.storage.delete(&file.storage_key).await {
            Ok(()) => {
                if let Err(e) = self.ports.metadata.purge_file(&file.id).await {
                    tracing::warn!(file_id = %file.id, error = %e, "purge deferred to the sweeper");
                }
            }
            Err(e) => {
                tracing::warn!(file_id = %file.id, error = %e, "byte deletion deferred to the sweeper");
            }
        }
        Ok(())
    }
}
