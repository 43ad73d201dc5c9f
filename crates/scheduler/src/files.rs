//! The Files gRPC service. Bytes are already in object storage when a file is registered; the
//! scheduler records it, answers lookups scoped to the caller's tenant, and deletes. A deleted
//! file disappears from the API at once; its bytes go at once too, unless an unfinished batch
//! reads it (they then stay until every such batch is terminal: the sweeper reclaims them).

use nightshift_core::file::{FileRecord, Purpose};
use nightshift_core::page::Order;
use nightshift_core::time::{now_unix, now_unix_micros};
use nightshift_core::{ApiError, FileId, TenantId};
use nightshift_metadata::{FileQuery, MetadataError};
use nightshift_proto::status::status_from_api_error;
use nightshift_proto::v1::{
    self, DeleteFileRequest, DeleteFileResponse, GetFileRequest, ListFilesRequest,
    ListFilesResponse, RegisterFileRequest, files_server::Files,
};
use tonic::{Request, Response, Status};

use crate::{Ports, metrics};

pub struct FilesService {
    ports: Ports,
}

impl FilesService {
    pub fn new(ports: Ports) -> Self {
        Self { ports }
    }
}

fn err(e: ApiError) -> Status {
    status_from_api_error(&e)
}

fn store_err(e: MetadataError) -> Status {
    match e {
        MetadataError::Conflict(m) => err(ApiError::new(
            nightshift_core::ErrorKind::Conflict,
            format!("conflict: {m}"),
        )),
        MetadataError::Backend(m) => {
            tracing::error!(error = %m, "metadata store failed");
            err(ApiError::unavailable("The metadata store is unavailable."))
        }
    }
}

fn tenant(raw: &str) -> Result<TenantId, Status> {
    TenantId::parse(raw).map_err(|_| err(ApiError::internal("invalid tenant id from caller")))
}

/// A client-supplied file id: anything that is not one of ours is simply not found.
fn file_id(raw: &str) -> Result<FileId, Status> {
    FileId::parse(raw).map_err(|_| err(ApiError::no_such("File", raw)))
}

#[tonic::async_trait]
impl Files for FilesService {
    async fn register_file(
        &self,
        request: Request<RegisterFileRequest>,
    ) -> Result<Response<v1::File>, Status> {
        let req = request.into_inner();
        let purpose = Purpose::parse(&req.purpose)
            .ok_or_else(|| err(ApiError::invalid_value("purpose", "unknown purpose")))?;
        let created_at_us = now_unix_micros();
        let created_at = created_at_us.div_euclid(1_000_000);
        let ttl = req.expires_after_seconds.or(purpose.default_ttl_secs());
        let record = FileRecord {
            id: FileId::parse(&req.id)
                .map_err(|_| err(ApiError::internal("invalid file id from caller")))?,
            tenant_id: tenant(&req.tenant_id)?,
            bytes: req.bytes,
            created_at,
            created_at_us,
            expires_at: ttl.map(|s| created_at + s),
            filename: req.filename,
            purpose,
            storage_key: req.storage_key,
        };
        self.ports
            .metadata
            .insert_file(&record)
            .await
            .map_err(store_err)?;
        ::metrics::counter!(metrics::FILES_REGISTERED, "purpose" => purpose.as_str()).increment(1);
        tracing::info!(
            file_id = %record.id, tenant_id = %record.tenant_id, bytes = record.bytes,
            purpose = %purpose, "file registered"
        );
        Ok(Response::new(v1::File::from(&record)))
    }

    async fn get_file(
        &self,
        request: Request<GetFileRequest>,
    ) -> Result<Response<v1::File>, Status> {
        let req = request.into_inner();
        let tenant = tenant(&req.tenant_id)?;
        let id = file_id(&req.id)?;
        let file = self
            .ports
            .metadata
            .get_file(&tenant, &id, now_unix())
            .await
            .map_err(store_err)?
            .ok_or_else(|| err(ApiError::no_such("File", &req.id)))?;
        Ok(Response::new(v1::File::from(&file)))
    }

    async fn list_files(
        &self,
        request: Request<ListFilesRequest>,
    ) -> Result<Response<ListFilesResponse>, Status> {
        let req = request.into_inner();
        let tenant = tenant(&req.tenant_id)?;
        let purpose = match req.purpose.as_deref() {
            None => None,
            Some(p) => Some(
                Purpose::parse(p)
                    .ok_or_else(|| err(ApiError::invalid_value("purpose", "unknown purpose")))?,
            ),
        };
        // An `after` that cannot be one of our ids names no file: an empty page.
        let after = match req.after.as_deref() {
            None => None,
            Some(raw) => match FileId::parse(raw) {
                Ok(id) => Some(id),
                Err(_) => {
                    return Ok(Response::new(ListFilesResponse {
                        files: vec![],
                        has_more: false,
                    }));
                }
            },
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
            .await
            .map_err(store_err)?;
        Ok(Response::new(ListFilesResponse {
            files: page.files.iter().map(v1::File::from).collect(),
            has_more: page.has_more,
        }))
    }

    async fn delete_file(
        &self,
        request: Request<DeleteFileRequest>,
    ) -> Result<Response<DeleteFileResponse>, Status> {
        let req = request.into_inner();
        let tenant = tenant(&req.tenant_id)?;
        let id = file_id(&req.id)?;
        let file = self
            .ports
            .metadata
            .delete_file(&tenant, &id, now_unix())
            .await
            .map_err(store_err)?
            .ok_or_else(|| err(ApiError::no_such("File", &req.id)))?;
        ::metrics::counter!(metrics::FILES_DELETED).increment(1);
        tracing::info!(file_id = %file.id, tenant_id = %file.tenant_id, "file deleted");
        // The file is hidden. Its bytes go now, or at the next sweep if storage fails — unless
        // an unfinished batch reads it: then they stay until every such batch is terminal
        // (the sweeper skips them until then).
        match self.ports.metadata.input_in_use(&file.id).await {
            Ok(false) => {}
            Ok(true) => {
                tracing::info!(file_id = %file.id, "the input of an unfinished batch: its bytes stay until the batch ends");
                return Ok(Response::new(DeleteFileResponse { id: req.id }));
            }
            Err(e) => {
                tracing::warn!(file_id = %file.id, error = %e, "byte deletion deferred to the sweeper");
                return Ok(Response::new(DeleteFileResponse { id: req.id }));
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
        Ok(Response::new(DeleteFileResponse { id: req.id }))
    }
}
