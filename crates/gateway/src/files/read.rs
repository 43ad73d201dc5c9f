//! `GET /v1/files`, `GET /v1/files/{id}`, `GET /v1/files/{id}/content` (streamed, with
//! `Range`) and `DELETE /v1/files/{id}`. Each goes through the scheduler's `Files` service for
//! the caller's tenant, so another tenant's file is a 404; only the download then reads object
//! storage.

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use nightshift_core::file::{FileDeleted, FileObject, FileRecord, Purpose};
use nightshift_core::page::{ListPage, Order, parse_limit};
use nightshift_core::{ApiError, ErrorKind};
use nightshift_proto::v1;
use nightshift_storage::{ByteRange, StorageError};

use super::RawQuery;
use crate::AppState;
use crate::auth::Tenant;
use crate::error::{HttpError, HttpResult};
use crate::metrics;

/// Most files `GET /v1/files` returns at once, and its default.
const MAX_LIST_LIMIT: u32 = 10_000;

fn query_error(e: QueryRejection) -> HttpError {
    ApiError::new(
        ErrorKind::InvalidRequest,
        format!("Invalid query string: {}", e.body_text()),
    )
    .into()
}

/// `GET /v1/files`.
#[utoipa::path(
    get,
    path = "/files",
    tag = "Files",
    operation_id = "listFiles",
    summary = "List the caller's files",
    params(
        ("purpose" = Option<Purpose>, Query, description = "Only files of this purpose."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 10000, description = "Page size, 1..=10000 (default 10000)."),
        ("order" = Option<Order>, Query, description = "By creation time: `asc` or `desc` (default)."),
        ("after" = Option<String>, Query, description = "A file id: the page starts after it (an unknown id gives an empty page)."),
    ),
    responses(
        (status = 200, description = "One page of files.", body = ListPage<FileObject>),
        (status = 400, description = "A bad `purpose`, `limit`, `order` or query string.", body = crate::openapi::ErrorResponse),
    ),
)]
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    query: Result<Query<RawQuery>, QueryRejection>,
) -> HttpResult<Json<ListPage<FileObject>>> {
    let Query(q) = query.map_err(query_error)?;
    let limit = parse_limit(
        q.get("limit").map(String::as_str),
        MAX_LIST_LIMIT,
        MAX_LIST_LIMIT,
    )?;
    let order = match q.get("order") {
        Some(o) => Order::parse(o)?,
        None => Order::Desc,
    };
    let purpose = match q.get("purpose").map(String::as_str) {
        None | Some("") => None,
        Some(p) => Some(Purpose::parse(p).ok_or_else(|| {
            ApiError::invalid_value("purpose", format!("Invalid value '{p}' for 'purpose'."))
        })?),
    };
    let after = q.get("after").filter(|a| !a.is_empty()).cloned();
    let resp = state
        .control
        .files()
        .list_files(v1::ListFilesRequest {
            tenant_id: tenant.id.to_string(),
            purpose: purpose.map(|p| p.as_str().to_owned()),
            limit,
            order: v1::Order::from(order).into(),
            after,
        })
        .await?
        .into_inner();
    let objects = resp
        .files
        .into_iter()
        .map(|f| FileRecord::try_from(f).map(|r| r.to_object()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(ListPage::new(objects, resp.has_more, |f| {
        f.id.clone()
    })))
}

async fn lookup(state: &AppState, tenant: &Tenant, id: &str) -> HttpResult<FileRecord> {
    let file = state
        .control
        .files()
        .get_file(v1::GetFileRequest {
            tenant_id: tenant.id.to_string(),
            id: id.to_owned(),
        })
        .await?
        .into_inner();
    Ok(FileRecord::try_from(file)?)
}

/// `GET /v1/files/{id}`.
#[utoipa::path(
    get,
    path = "/files/{id}",
    tag = "Files",
    operation_id = "retrieveFile",
    summary = "Retrieve a file's metadata",
    params(("id" = String, Path, description = "The file's id (`file-…`).")),
    responses(
        (status = 200, description = "The file.", body = FileObject),
        (status = 404, description = "No such file (or expired, or another tenant's).", body = crate::openapi::ErrorResponse),
    ),
)]
pub async fn retrieve(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> HttpResult<Json<FileObject>> {
    Ok(Json(lookup(&state, &tenant, &id).await?.to_object()))
}

/// `DELETE /v1/files/{id}`.
#[utoipa::path(
    delete,
    path = "/files/{id}",
    tag = "Files",
    operation_id = "deleteFile",
    summary = "Delete a file",
    description = "A batch already reading the file still reads it; its bytes go once every such \
                   batch has ended.",
    params(("id" = String, Path, description = "The file's id (`file-…`).")),
    responses(
        (status = 200, description = "The file is deleted.", body = FileDeleted),
        (status = 404, description = "No such file (or expired, or another tenant's).", body = crate::openapi::ErrorResponse),
    ),
)]
pub async fn delete(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> HttpResult<Json<FileDeleted>> {
    let resp = state
        .control
        .files()
        .delete_file(v1::DeleteFileRequest {
            tenant_id: tenant.id.to_string(),
            id,
        })
        .await?
        .into_inner();
    Ok(Json(FileDeleted {
        id: resp.id,
        object: "file",
        deleted: true,
    }))
}

/// Parses a single-range `Range` header. `None` for anything else (absent, malformed,
/// several ranges, another unit): RFC 9110 lets a server ignore such a header and send the
/// whole object.
pub fn parse_range(headers: &HeaderMap) -> Option<ByteRange> {
    let raw = headers.get(header::RANGE)?.to_str().ok()?.trim();
    let spec = raw.strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let (start, end) = (start.trim(), end.trim());
    match (start.is_empty(), end.is_empty()) {
        (true, false) => Some(ByteRange::Suffix(end.parse().ok()?)),
        (false, true) => Some(ByteRange::From(start.parse().ok()?)),
        (false, false) => {
            let (s, e): (u64, u64) = (start.parse().ok()?, end.parse().ok()?);
            (e >= s).then_some(ByteRange::Bounded {
                start: s,
                end: e.checked_add(1)?,
            })
        }
        (true, true) => None,
    }
}

/// `GET /v1/files/{id}/content`: the stored bytes, streamed, with `Range` support.
#[utoipa::path(
    get,
    path = "/files/{id}/content",
    tag = "Files",
    operation_id = "downloadFile",
    summary = "Download a file's bytes",
    params(
        ("id" = String, Path, description = "The file's id (`file-…`)."),
        ("Range" = Option<String>, Header, description = "One range: `bytes=a-b`, `bytes=a-` or `bytes=-n`; any other value is ignored."),
    ),
    responses(
        (status = 200, description = "The whole file.", content_type = "application/octet-stream", body = Vec<u8>,
         headers(("content-disposition" = String, description = "`attachment; filename=\"…\"`"))),
        (status = 206, description = "The requested range, with `Content-Range`.", content_type = "application/octet-stream", body = Vec<u8>,
         headers(("content-range" = String, description = "`bytes a-b/size`"))),
        (status = 404, description = "No such file (or expired, or another tenant's).", body = crate::openapi::ErrorResponse),
        (status = 416, description = "A range the file cannot satisfy, with `Content-Range: bytes */size`.", body = crate::openapi::ErrorResponse),
    ),
)]
pub async fn content(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> HttpResult<Response> {
    let file = lookup(&state, &tenant, &id).await?;
    let range = parse_range(&headers);
    let body = match state.storage.get(&file.storage_key, range).await {
        Ok(b) => b,
        Err(StorageError::InvalidRange { size, .. }) => {
            let mut resp = HttpError(ApiError::new(
                ErrorKind::RangeNotSatisfiable,
                format!("The requested range is not satisfiable for a file of {size} bytes."),
            ))
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(resp);
        }
        Err(StorageError::NotFound(_)) => {
            // Metadata says it exists but the bytes are gone (swept between the two reads).
            return Err(ApiError::no_such("File", &id).into());
        }
        Err(e) => return Err(e.into()),
    };
    let len = body.len();
    let partial = range.is_some();
    let content_range = format!(
        "bytes {}-{}/{}",
        body.start,
        body.end.saturating_sub(1),
        body.object_size
    );
    let stream = body.stream.map(|chunk: Result<Bytes, StorageError>| {
        chunk
            .inspect(|b| ::metrics::counter!(metrics::DOWNLOAD_BYTES).increment(b.len() as u64))
            .map_err(std::io::Error::other)
    });
    let mut builder = Response::builder()
        .status(if partial {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        })
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .header(header::ACCEPT_RANGES, "bytes");
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{}\"",
        file.filename.replace(['"', '\\', '\r', '\n'], "_")
    )) {
        builder = builder.header(header::CONTENT_DISPOSITION, v);
    }
    if partial {
        builder = builder.header(header::CONTENT_RANGE, content_range);
    }
    builder
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal(format!("building the response: {e}")).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str) -> Option<ByteRange> {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
        parse_range(&h)
    }

    #[test]
    fn parses_single_ranges_and_ignores_the_rest() {
        assert_eq!(
            range("bytes=0-99"),
            Some(ByteRange::Bounded { start: 0, end: 100 })
        );
        assert_eq!(range("bytes=100-"), Some(ByteRange::From(100)));
        assert_eq!(range("bytes=-5"), Some(ByteRange::Suffix(5)));
        assert_eq!(range("bytes=5-1"), None);
        assert_eq!(range("bytes=0-1,4-5"), None);
        assert_eq!(range("items=0-1"), None);
        assert_eq!(range("bytes=x-"), None);
        assert_eq!(range("bytes=-"), None);
        assert_eq!(parse_range(&HeaderMap::new()), None);
    }
}
