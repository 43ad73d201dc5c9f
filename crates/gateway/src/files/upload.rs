//! `POST /v1/files`: the multipart form is read field by field; the file part streams to
//! object storage while a sniffer checks that a batch input is JSONL, and the object is
//! registered with the scheduler only once every field is known to be good. Whatever way the
//! request ends early, no orphaned object stays behind.

use std::sync::Arc;

use axum::Json;
use axum::extract::multipart::{Field, MultipartError, MultipartRejection};
use axum::extract::{Multipart, State};
use axum::http::{HeaderMap, header};
use nightshift_core::file::{ExpiresAfter, FileObject, FileRecord, Purpose};
use nightshift_core::idempotency::{IdempotentKind, RequestHash, key_reused};
use nightshift_core::sniff::{SniffError, Sniffer};
use nightshift_core::{ApiError, ErrorKind, FileId, quota};
use nightshift_proto::v1;
use nightshift_storage::{ObjectStore, ObjectUpload};

use crate::AppState;
use crate::auth::Tenant;
use crate::error::{HttpError, HttpResult};
use crate::idempotency;
use crate::metrics;

/// Largest accepted non-file form field (`purpose`, `expires_after[...]`).
const MAX_FIELD_BYTES: usize = 64 * 1024;

fn bad_multipart(e: MultipartError) -> HttpError {
    ApiError::new(
        ErrorKind::InvalidRequest,
        format!("Could not parse the multipart form: {}", e.body_text()),
    )
    .into()
}

fn file_error(message: impl Into<String>, code: &str) -> HttpError {
    ApiError::new(ErrorKind::InvalidRequest, message)
        .with_param("file")
        .with_code(code)
        .into()
}

fn reject(reason: &'static str, err: HttpError) -> HttpError {
    ::metrics::counter!(metrics::UPLOADS_REJECTED, "reason" => reason).increment(1);
    err
}

/// Deletes an object unless disarmed: whatever way an upload ends early (an error, the client
/// hanging up and the handler being dropped), no orphaned object stays behind.
struct ObjectGuard {
    storage: Arc<dyn ObjectStore>,
    key: Option<String>,
}

impl ObjectGuard {
    fn disarm(mut self) {
        self.key = None;
    }

    async fn delete_now(mut self) {
        if let Some(key) = self.key.take()
            && let Err(e) = self.storage.delete(&key).await
        {
            tracing::warn!(key = %key, error = %e, "could not delete a rejected upload");
        }
    }
}

impl Drop for ObjectGuard {
    fn drop(&mut self) {
        if let (Some(key), Ok(rt)) = (self.key.take(), tokio::runtime::Handle::try_current()) {
            let storage = self.storage.clone();
            rt.spawn(async move {
                if let Err(e) = storage.delete(&key).await {
                    tracing::warn!(key = %key, error = %e, "could not delete an abandoned upload");
                }
            });
        }
    }
}

async fn small_field(mut field: Field<'_>) -> HttpResult<String> {
    let name = field.name().unwrap_or_default().to_owned();
    let mut buf = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(bad_multipart)? {
        if buf.len() + chunk.len() > MAX_FIELD_BYTES {
            return Err(ApiError::invalid_value(&name, format!("'{name}' is too long.")).into());
        }
        buf.extend_from_slice(&chunk);
    }
    String::from_utf8(buf)
        .map(|s| s.trim().to_owned())
        .map_err(|_| ApiError::invalid_value(&name, format!("'{name}' is not UTF-8.")).into())
}

/// The file part after it has been streamed to storage.
struct Stored {
    id: FileId,
    key: String,
    filename: String,
    bytes: u64,
    guard: ObjectGuard,
    /// The JSONL check's verdict, when it ran (purpose not known to be other than `batch`).
    sniff: Option<Result<(), SniffError>>,
    /// SHA-256 of the bytes (an `Idempotency-Key` request's fingerprint covers them).
    content_hash: String,
}

/// Room left under the tenant's `max_stored_bytes` when the upload began.
#[derive(Debug, Clone, Copy)]
struct StorageRoom {
    held: u64,
    limit: u64,
}

impl StorageRoom {
    /// The room left, from the scheduler; `None` when the tenant's storage is unlimited.
    async fn of(state: &AppState, tenant: &Tenant) -> HttpResult<Option<Self>> {
        let quotas = state
            .control
            .tenants()
            .get_tenant_quotas(v1::GetTenantQuotasRequest {
                tenant_id: tenant.id.to_string(),
            })
            .await?
            .into_inner();
        let limit = quotas.effective.map_or(0, |q| q.max_stored_bytes);
        let held = quotas.usage.map_or(0, |q| q.max_stored_bytes);
        Ok((limit > 0).then_some(Self { held, limit }))
    }

    /// Refuses an upload that has reached `size` bytes if they do not fit.
    fn admit(self, size: u64) -> HttpResult<()> {
        if self.held.saturating_add(size) > self.limit {
            return Err(reject(
                "storage_quota",
                quota::storage_quota_exceeded(size, self.held, self.limit).into(),
            ));
        }
        Ok(())
    }
}

/// Streams the file part to storage, checking and hashing it; with `hash_only` (a request
/// whose `Idempotency-Key` is already live) nothing is stored: the bytes are only hashed, to
/// compare the request with the earlier one. An upload that outgrows the tenant's storage
/// `room` is cut there, and what was written of it is aborted.
async fn stream_file_part(
    state: &AppState,
    mut field: Field<'_>,
    known_purpose: Option<Purpose>,
    hash_only: bool,
    room: Option<StorageRoom>,
) -> HttpResult<Stored> {
    let filename = field
        .file_name()
        .filter(|n| !n.is_empty())
        .unwrap_or("file")
        .to_owned();
    // Bounded before a byte is stored: the name is kept, logged and sent back in headers.
    nightshift_core::file::check_filename(&filename)?;
    let id = FileId::generate();
    let key = FileRecord::storage_key_for(&id);
    let max = state.config.max_upload_bytes;
    // When the purpose came first and is not `batch`, there is nothing to sniff.
    let mut sniffer = (!hash_only
        && (known_purpose.is_none() || known_purpose == Some(Purpose::Batch)))
    .then(Sniffer::new);
    let mut verdict: Option<Result<(), SniffError>> = None;
    let mut upload: Option<Box<dyn ObjectUpload>> = if hash_only {
        None
    } else {
        Some(state.storage.upload(&key).await?)
    };
    let mut content = RequestHash::new("file");
    let mut size: u64 = 0;

    let streamed: HttpResult<()> = async {
        while let Some(chunk) = field.chunk().await.map_err(bad_multipart)? {
            size += chunk.len() as u64;
            if size > max {
                return Err(reject(
                    "too_large",
                    file_error(
                        format!("File is too large: the limit is {max} bytes."),
                        "file_too_large",
                    ),
                ));
            }
            if let Some(room) = room {
                room.admit(size)?;
            }
            if let Some(s) = sniffer.as_mut()
                && let Err(e) = s.push(&chunk)
            {
                verdict = Some(Err(e));
                sniffer = None;
                // A batch input that is certainly not JSONL: stop reading at once.
                if known_purpose == Some(Purpose::Batch) {
                    break;
                }
            }
            content.stream(&chunk);
            if let Some(upload) = upload.as_mut() {
                upload.write(chunk).await?;
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = streamed {
        if let Some(upload) = upload
            && let Err(abort) = upload.abort().await
        {
            tracing::warn!(key = %key, error = %abort, "could not abort upload");
        }
        return Err(e);
    }
    if let Some(s) = sniffer {
        verdict = Some(s.finish());
    }
    if size == 0 {
        if let Some(upload) = upload {
            let _ = upload.abort().await;
        }
        return Err(reject("empty", file_error("File is empty.", "empty_file")));
    }
    content.end_stream(size);
    let guard = ObjectGuard {
        storage: state.storage.clone(),
        key: upload.is_some().then(|| key.clone()),
    };
    if let Some(upload) = upload {
        upload.finish().await?;
    }
    Ok(Stored {
        id,
        key,
        filename,
        bytes: size,
        guard,
        sniff: verdict,
        content_hash: content.finish(),
    })
}

/// `POST /v1/files`.
#[utoipa::path(
    post,
    path = "/files",
    tag = "Files",
    operation_id = "createFile",
    summary = "Upload a file",
    description = "The file streams to object storage as it arrives. A `batch` file must be JSONL \
                   (its lines are checked when a batch reads it).",
    request_body(content = crate::openapi::FileUpload, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The stored file.", body = FileObject),
        (status = 400, description = "A missing or bad field; a file that is empty, too large or (for `batch`) not JSONL; a malformed `Idempotency-Key`; a file past the tenant's stored-bytes quota (code `storage_quota_exceeded`).", body = crate::openapi::ErrorResponse),
        (status = 429, description = "The tenant has too many uploads (or bytes) in progress; `retry-after` says when to retry.", body = crate::openapi::ErrorResponse),
        (status = 409, description = "The `Idempotency-Key` was used in the last 24 hours with another request (code `idempotency_key_reused`).", body = crate::openapi::ErrorResponse),
    ),
    params(crate::openapi::IdempotencyKeyHeader),
)]
pub async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    axum::Extension(limits): axum::Extension<Arc<crate::limits::UploadLimits>>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> HttpResult<Json<FileObject>> {
    // Refuse a body that announces itself too large before reading any of it.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > state.config.max_upload_bytes + MAX_FIELD_BYTES as u64) {
        return Err(reject(
            "too_large",
            file_error(
                format!(
                    "File is too large: the limit is {} bytes.",
                    state.config.max_upload_bytes
                ),
                "file_too_large",
            ),
        ));
    }
    let idempotency_key = idempotency::key(&headers)?;
    // A live key: the earlier request's file, if this request is the same one. Its bytes are
    // hashed to compare, never stored again.
    let earlier = match &idempotency_key {
        Some(key) => {
            let found = state
                .control
                .files()
                .lookup_idempotency_key(v1::LookupIdempotencyKeyRequest {
                    tenant_id: tenant.id.to_string(),
                    key: key.clone(),
                })
                .await?
                .into_inner();
            if found.found && found.kind != IdempotentKind::File.as_str() {
                return Err(key_reused().into());
            }
            found.found.then_some(found)
        }
        None => None,
    };
    // Per-tenant bound on uploads in progress, before a byte of the body is read.
    let _slot = limits.admit(
        &tenant.id,
        declared.unwrap_or(state.config.max_upload_bytes),
    )?;
    // The tenant's storage quota, before a byte is stored: a tenant already at its limit is
    // refused at once; the upload is cut as soon as it outgrows the room left. The scheduler
    // checks again, exactly, when it registers the file (other uploads may have landed
    // meanwhile): this early check only spares storing bytes that cannot be kept. A replay
    // of a live `Idempotency-Key` stores nothing and is never refused.
    let room = match earlier {
        Some(_) => None,
        None => StorageRoom::of(&state, &tenant).await?,
    };
    if let Some(room) = room {
        room.admit(1)?;
    }
    let mut multipart = multipart.map_err(|e| {
        HttpError(ApiError::new(
            ErrorKind::InvalidRequest,
            format!(
                "Expected a multipart/form-data body with a 'file' and a 'purpose': {}",
                e.body_text()
            ),
        ))
    })?;

    let mut purpose_raw: Option<String> = None;
    let mut anchor: Option<String> = None;
    let mut seconds: Option<String> = None;
    let mut stored: Option<Stored> = None;

    let result: HttpResult<()> = async {
        while let Some(field) = multipart.next_field().await.map_err(bad_multipart)? {
            match field.name().unwrap_or_default() {
                "file" => {
                    if stored.is_some() {
                        return Err(ApiError::invalid_value(
                            "file",
                            "Only one 'file' may be uploaded per request.",
                        )
                        .into());
                    }
                    let known = match purpose_raw.as_deref() {
                        Some(p) => Some(Purpose::parse_uploadable(p)?),
                        None => None,
                    };
                    stored = Some(
                        stream_file_part(&state, field, known, earlier.is_some(), room).await?,
                    );
                }
                "purpose" => purpose_raw = Some(small_field(field).await?),
                "expires_after[anchor]" => anchor = Some(small_field(field).await?),
                "expires_after[seconds]" => seconds = Some(small_field(field).await?),
                // Unknown fields are read and ignored, within the small-field bound.
                _ => {
                    small_field(field).await?;
                }
            }
        }
        Ok(())
    }
    .await;

    let outcome = async {
        result?;
        let purpose_raw = purpose_raw.ok_or_else(|| ApiError::missing("purpose"))?;
        let purpose = Purpose::parse_uploadable(&purpose_raw)?;
        let expires = ExpiresAfter::parse("expires_after", anchor.as_deref(), seconds.as_deref())?;
        let file = stored.as_ref().ok_or_else(|| ApiError::missing("file"))?;
        if purpose == Purpose::Batch
            && let Some(Err(e)) = &file.sniff
        {
            let code = match e {
                SniffError::Empty => "empty_file",
                _ => "invalid_file_format",
            };
            return Err(reject(
                "not_jsonl",
                file_error(format!("Invalid file format for Batch API. {e}"), code),
            ));
        }
        Ok::<_, HttpError>((purpose, expires))
    }
    .await;

    let (purpose, expires) = match outcome {
        Ok(v) => v,
        Err(e) => {
            if let Some(s) = stored {
                s.guard.delete_now().await;
            }
            return Err(e);
        }
    };
    let Some(file) = stored else {
        return Err(ApiError::missing("file").into());
    };
    let fingerprint = idempotency_key.as_ref().map(|_| {
        let mut hash = RequestHash::new("POST /v1/files");
        hash.field(purpose.as_str().as_bytes());
        hash.field(file.filename.as_bytes());
        hash.field(anchor.as_deref().unwrap_or_default().as_bytes());
        hash.field(seconds.as_deref().unwrap_or_default().as_bytes());
        hash.field(file.content_hash.as_bytes());
        hash.finish()
    });
    if let (Some(earlier), Some(fingerprint)) = (earlier, &fingerprint) {
        if &earlier.request_hash != fingerprint {
            return Err(key_reused().into());
        }
        let replayed = earlier
            .file
            .ok_or_else(|| ApiError::no_such("File", &earlier.object_id))?;
        return Ok(Json(FileRecord::try_from(replayed)?.to_object()));
    }
    let register = v1::RegisterFileRequest {
        tenant_id: tenant.id.to_string(),
        id: file.id.to_string(),
        bytes: file.bytes,
        filename: file.filename.clone(),
        purpose: purpose.as_str().to_owned(),
        storage_key: file.key.clone(),
        expires_after_seconds: expires.map(|e| e.seconds),
    };
    let registered = match (idempotency_key, fingerprint) {
        (Some(key), Some(fingerprint)) => {
            state
                .control
                .files()
                .register_file_once(v1::RegisterFileOnceRequest {
                    file: Some(register),
                    idempotency: Some(idempotency::claim(key, fingerprint)),
                })
                .await
        }
        _ => state.control.files().register_file(register).await,
    };
    let registered = match registered {
        Ok(r) => r.into_inner(),
        Err(status) => {
            file.guard.delete_now().await;
            return Err(status.into());
        }
    };
    if registered.id != file.id.as_str() {
        // A twin request with the same key recorded its file first: that one is the answer,
        // and these bytes go.
        file.guard.delete_now().await;
        return Ok(Json(FileRecord::try_from(registered)?.to_object()));
    }
    file.guard.disarm();
    ::metrics::counter!(metrics::UPLOAD_BYTES).increment(file.bytes);
    let record = FileRecord::try_from(registered)?;
    tracing::info!(file_id = %record.id, bytes = record.bytes, purpose = %record.purpose, "file uploaded");
    Ok(Json(record.to_object()))
}
