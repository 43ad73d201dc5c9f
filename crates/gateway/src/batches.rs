//! `/v1/batches`: create, retrieve, list, cancel.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use nightshift_core::batch::{
    BatchObject, BatchRecord, CompletionWindow, CreateBatch, CreateBatchBody, RequestCounts,
    check_metadata,
};
use nightshift_core::page::{ListPage, parse_limit};
use nightshift_core::{ApiError, ErrorKind};
use nightshift_proto::v1;

use crate::auth::Tenant;
use crate::error::{HttpError, HttpResult};
use crate::files::RawQuery;
use crate::{AppState, idempotency};

/// Parses a JSON request body; every failure is a 400 in OpenAI's words.
fn parse_body(body: Result<Bytes, BytesRejection>) -> HttpResult<CreateBatchBody> {
    let body = body.map_err(crate::error::body_rejection)?;
    serde_json::from_slice(&body).map_err(|e| {
        let text = e.to_string();
        // serde's "unknown field `x`, expected one of ..." → OpenAI's unrecognized argument.
        if let Some(rest) = text.strip_prefix("unknown field `")
            && let Some(name) = rest.split('`').next()
        {
            return HttpError(
                ApiError::new(
                    ErrorKind::InvalidRequest,
                    format!("Unrecognized request argument supplied: {name}"),
                )
                .with_param(name)
                .with_code("unknown_parameter"),
            );
        }
        HttpError(ApiError::new(
            ErrorKind::InvalidRequest,
            format!(
                "We could not parse the JSON body of your request. (HINT: This likely means you \
                 aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.) \
                 Detail: {text}"
            ),
        ))
    })
}

fn object(batch: v1::Batch) -> HttpResult<BatchObject> {
    Ok(BatchRecord::try_from(batch)?.to_object(None))
}

/// The Batch objects of `batches`, with live counts and usage for those still running (one
/// Redis round trip for all). Redis is only the live view: if it does not answer, the stored
/// numbers are shown rather than failing the read.
async fn with_live(state: &AppState, batches: Vec<v1::Batch>) -> HttpResult<Vec<BatchObject>> {
    let records = batches
        .into_iter()
        .map(BatchRecord::try_from)
        .collect::<Result<Vec<_>, _>>()?;
    let running: Vec<&str> = records
        .iter()
        .filter(|b| !b.status.is_terminal())
        .map(|b| b.id.as_str())
        .collect();
    let mut live = std::collections::HashMap::new();
    if !running.is_empty() {
        match state.live.counts_many(&running).await {
            Ok(counts) => {
                for (id, c) in running.iter().zip(counts) {
                    live.insert(id.to_string(), c);
                }
            }
            Err(e) => tracing::warn!(error = %e, "live counts unavailable; showing stored counts"),
        }
    }
    Ok(records
        .iter()
        .map(|b| {
            let counts = live.get(b.id.as_str()).map(|c| {
                (
                    RequestCounts {
                        total: b.request_counts.total,
                        completed: c.completed,
                        failed: c.failed,
                    },
                    c.usage,
                )
            });
            b.to_object(counts)
        })
        .collect())
}

/// `POST /v1/batches`.
#[utoipa::path(
    post,
    path = "/batches",
    tag = "Batches",
    operation_id = "createBatch",
    summary = "Create a batch from an uploaded JSONL file",
    description = "The batch is created `validating`; everything about the input file itself \
                   is checked asynchronously (a bad input makes the batch `failed` with `errors`).",
    request_body(content = crate::openapi::CreateBatchRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The new batch.", body = BatchObject),
        (status = 400, description = "A missing, unknown or invalid field; a body that is not JSON; a malformed `Idempotency-Key`.", body = crate::openapi::ErrorResponse),
        (status = 429, description = "The tenant has its most batches in progress (code `active_batch_limit_exceeded`, `x-should-retry: false`).", body = crate::openapi::ErrorResponse),
        (status = 409, description = "The `Idempotency-Key` was used in the last 24 hours with another request (code `idempotency_key_reused`).", body = crate::openapi::ErrorResponse),
        (status = 413, description = "A body over `gateway.max_json_body_bytes`.", body = crate::openapi::ErrorResponse),
    ),
    params(crate::openapi::IdempotencyKeyHeader),
)]
pub async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> HttpResult<Json<BatchObject>> {
    let key = idempotency::key(&headers)?;
    let body = body.map_err(crate::error::body_rejection)?;
    let fingerprint = key
        .as_ref()
        .map(|_| idempotency::json_request_hash("POST /v1/batches", &body));
    let params = CreateBatch::check(parse_body(Ok(body))?, &state.config.completion_windows)?;
    let has_metadata = params.metadata.is_some();
    let request = v1::CreateBatchRequest {
        tenant_id: tenant.id.to_string(),
        input_file_id: params.input_file_id,
        endpoint: params.endpoint,
        completion_window: params.completion_window.raw,
        completion_window_seconds: params.completion_window.seconds,
        metadata: params.metadata.unwrap_or_default().into_iter().collect(),
        has_metadata,
        output_expires_after_seconds: params.output_expires_after_secs,
    };
    let batch = match (key, fingerprint) {
        (Some(key), Some(fingerprint)) => {
            state
                .control
                .batches()
                .create_batch_once(v1::CreateBatchOnceRequest {
                    batch: Some(request),
                    idempotency: Some(idempotency::claim(key, fingerprint)),
                })
                .await?
        }
        _ => state.control.batches().create_batch(request).await?,
    }
    .into_inner();
    // The request's span is the root of the batch's trace: say which batch it is.
    tracing::Span::current().record("batch_id", batch.id.as_str());
    Ok(Json(object(batch)?))
}

/// `GET /v1/batches/{id}`.
#[utoipa::path(
    get,
    path = "/batches/{id}",
    tag = "Batches",
    operation_id = "retrieveBatch",
    summary = "Retrieve a batch, with live counts and usage while it runs",
    params(("id" = String, Path, description = "The batch's id (`batch_…`).")),
    responses(
        (status = 200, description = "The batch.", body = BatchObject),
        (status = 404, description = "No such batch, or another tenant's.", body = crate::openapi::ErrorResponse),
    ),
)]
pub async fn retrieve(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> HttpResult<Json<BatchObject>> {
    let batch = state
        .control
        .batches()
        .get_batch(v1::GetBatchRequest {
            tenant_id: tenant.id.to_string(),
            id,
        })
        .await?
        .into_inner();
    let mut objects = with_live(&state, vec![batch]).await?;
    objects
        .pop()
        .map(Json)
        .ok_or_else(|| HttpError(ApiError::internal("empty batch lookup")))
}

/// `GET /v1/batches`: newest first, `limit` 1..=100 (default 20), exclusive `after`.
#[utoipa::path(
    get,
    path = "/batches",
    tag = "Batches",
    operation_id = "listBatches",
    summary = "List the caller's batches, newest first",
    params(
        ("after" = Option<String>, Query, description = "A batch id: the page starts after it (an unknown id gives an empty page)."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "Page size, 1..=100 (default 20)."),
        ("retry_of" = Option<String>, Query, description = "Extension: only the batches created by `POST /v1/batches/{retry_of}/retry` (docs/api.md)."),
    ),
    responses(
        (status = 200, description = "One page of batches.", body = ListPage<BatchObject>),
        (status = 400, description = "A bad `limit` or query string.", body = crate::openapi::ErrorResponse),
    ),
)]
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    query: Result<Query<RawQuery>, QueryRejection>,
) -> HttpResult<Json<ListPage<BatchObject>>> {
    let Query(q) = query.map_err(|e| {
        HttpError(ApiError::new(
            ErrorKind::InvalidRequest,
            format!("Invalid query string: {}", e.body_text()),
        ))
    })?;
    let limit = parse_limit(q.get("limit").map(String::as_str), 20, 100)?;
    let after = q.get("after").filter(|a| !a.is_empty()).cloned();
    let resp = match q.get("retry_of").filter(|r| !r.is_empty()) {
        // the extension: the retries of one batch
        Some(parent) => {
            state
                .control
                .batches()
                .list_retries(v1::ListRetriesRequest {
                    tenant_id: tenant.id.to_string(),
                    retry_of: parent.clone(),
                    limit,
                    after,
                })
                .await?
        }
        None => {
            state
                .control
                .batches()
                .list_batches(v1::ListBatchesRequest {
                    tenant_id: tenant.id.to_string(),
                    limit,
                    after,
                })
                .await?
        }
    }
    .into_inner();
    let data = with_live(&state, resp.batches).await?;
    Ok(Json(ListPage::new(data, resp.has_more, |b| b.id.clone())))
}

/// `POST /v1/batches/{id}/cancel`.
#[utoipa::path(
    post,
    path = "/batches/{id}/cancel",
    tag = "Batches",
    operation_id = "cancelBatch",
    summary = "Cancel a batch",
    description = "A `validating` or `in_progress` batch becomes `cancelling`; one already \
                   `cancelling`, `cancelled` or `finalizing` is returned as it is.",
    params(("id" = String, Path, description = "The batch's id (`batch_…`).")),
    responses(
        (status = 200, description = "The batch, `cancelling` or as it was.", body = BatchObject),
        (status = 404, description = "No such batch, or another tenant's.", body = crate::openapi::ErrorResponse),
        (status = 409, description = "The batch is `completed`, `failed` or `expired` (sent with `x-should-retry: false`).", body = crate::openapi::ErrorResponse),
    ),
)]
pub async fn cancel(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> HttpResult<Json<BatchObject>> {
    let batch = state
        .control
        .batches()
        .cancel_batch(v1::CancelBatchRequest {
            tenant_id: tenant.id.to_string(),
            id,
        })
        .await?
        .into_inner();
    Ok(Json(object(batch)?))
}

/// The JSON body of `POST /v1/batches/{id}/retry` (every field optional; docs/api.md, "Retry
/// failed lines").
#[derive(Debug, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryBatchBody {
    /// Retry only failed lines with one of these codes: an error line's `error.code`
    /// (`batch_expired`, `batch_cancelled`, `request_timeout`, `upstream_unreachable`,
    /// `chunk_failed`...) or the `code` of the upstream's error object in a non-2xx response
    /// (`rate_limit_exceeded`...).
    pub error_codes: Option<Vec<String>>,
    /// Retry only failed lines whose response has one of these HTTP statuses: a number
    /// (`429`) or a class (`"4xx"`, `"5xx"`).
    #[schema(value_type = Option<Vec<Object>>)]
    pub status_codes: Option<Vec<serde_json::Value>>,
    /// The new batch's completion window (default: the original's).
    pub completion_window: Option<String>,
    /// The new batch's metadata (default: the original's); `retry_of` is added either way.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
}

/// Most entries in `error_codes` or `status_codes`.
const MAX_FILTER_ENTRIES: usize = 64;

/// `POST /v1/batches/{id}/retry` (extension): a new batch of the failed lines of an ended
/// batch.
#[utoipa::path(
    post,
    path = "/batches/{id}/retry",
    tag = "Batches",
    operation_id = "retryBatch",
    summary = "Extension: retry the failed lines of an ended batch as a new batch",
    description = "Creates a batch (`validating`) with the same endpoint, window and metadata \
                   (plus `retry_of`) whose input file is built from the original input lines \
                   whose result failed (filtered by `error_codes` / `status_codes`, any match). \
                   The input is built in the background, then validated like any batch.",
    params(
        ("id" = String, Path, description = "The ended batch's id (`batch_…`)."),
        crate::openapi::IdempotencyKeyHeader,
    ),
    request_body(content = RetryBatchBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The new batch.", body = BatchObject),
        (status = 400, description = "A bad field; or the batch has no failed line (code `nothing_to_retry`).", body = crate::openapi::ErrorResponse),
        (status = 404, description = "No such batch, or another tenant's.", body = crate::openapi::ErrorResponse),
        (status = 409, description = "The batch has not ended; its input or result files are gone (code `retry_source_unavailable`); or the `Idempotency-Key` was used with another request.", body = crate::openapi::ErrorResponse),
        (status = 429, description = "The tenant has its most batches in progress (code `active_batch_limit_exceeded`, `x-should-retry: false`).", body = crate::openapi::ErrorResponse),
    ),
)]
pub async fn retry(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> HttpResult<Json<BatchObject>> {
    let key = idempotency::key(&headers)?;
    let body = body.map_err(crate::error::body_rejection)?;
    // An empty body is an empty filter: retry every failed line.
    let raw: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &body
    };
    let fingerprint = key
        .as_ref()
        .map(|_| idempotency::json_request_hash(&format!("POST /v1/batches/{id}/retry"), raw));
    let parsed: RetryBatchBody = parse_json(raw)?;
    let mut request = v1::RetryBatchRequest {
        tenant_id: tenant.id.to_string(),
        id,
        ..Default::default()
    };
    let error_codes = parsed.error_codes.unwrap_or_default();
    if error_codes.len() > MAX_FILTER_ENTRIES {
        return Err(ApiError::invalid_value(
            "error_codes",
            format!("At most {MAX_FILTER_ENTRIES} error codes."),
        )
        .into());
    }
    for code in &error_codes {
        if code.is_empty() || code.len() > 128 {
            return Err(ApiError::invalid_value(
                "error_codes",
                "Each error code is a non-empty string of at most 128 bytes.",
            )
            .into());
        }
    }
    request.error_codes = error_codes;
    let statuses = parsed.status_codes.unwrap_or_default();
    if statuses.len() > MAX_FILTER_ENTRIES {
        return Err(ApiError::invalid_value(
            "status_codes",
            format!("At most {MAX_FILTER_ENTRIES} status codes."),
        )
        .into());
    }
    for status in statuses {
        let bad = || {
            ApiError::invalid_value(
                "status_codes",
                format!(
                    "Invalid status {status}: expected an HTTP status (100..=599) or a class \
                     (\"4xx\", \"5xx\")."
                ),
            )
        };
        match &status {
            serde_json::Value::Number(n) => {
                let code = n
                    .as_u64()
                    .filter(|c| (100..=599).contains(c))
                    .ok_or_else(bad)?;
                request.status_codes.push(code as u32);
            }
            serde_json::Value::String(s) => {
                let class = match s.to_ascii_lowercase().as_str() {
                    "1xx" => 1,
                    "2xx" => 2,
                    "3xx" => 3,
                    "4xx" => 4,
                    "5xx" => 5,
                    digits => match digits.parse::<u32>() {
                        Ok(code) if (100..=599).contains(&code) => {
                            request.status_codes.push(code);
                            continue;
                        }
                        _ => return Err(bad().into()),
                    },
                };
                request.status_classes.push(class);
            }
            _ => return Err(bad().into()),
        }
    }
    if let Some(raw) = parsed.completion_window {
        let window = state
            .config
            .completion_windows
            .contains(&raw)
            .then(|| CompletionWindow::parse(&raw))
            .flatten()
            .ok_or_else(|| {
                ApiError::invalid_value(
                    "completion_window",
                    format!(
                        "Invalid value '{raw}' for 'completion_window': supported values are {}.",
                        state.config.completion_windows.join(", ")
                    ),
                )
            })?;
        request.completion_window = Some(window.raw);
        request.completion_window_seconds = window.seconds;
    }
    match parsed.metadata {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(map)) => {
            request.metadata = check_metadata(map)?.into_iter().collect();
            request.has_metadata = true;
        }
        Some(_) => {
            return Err(
                ApiError::invalid_value("metadata", "'metadata' must be an object.").into(),
            );
        }
    }
    request.idempotency = key
        .zip(fingerprint)
        .map(|(key, fingerprint)| idempotency::claim(key, fingerprint));
    let batch = state
        .control
        .batches()
        .retry_batch(request)
        .await?
        .into_inner();
    tracing::Span::current().record("batch_id", batch.id.as_str());
    Ok(Json(object(batch)?))
}

/// Parses a JSON body into `T`; every failure is a 400 in OpenAI's words (an unknown field
/// names itself).
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> HttpResult<T> {
    serde_json::from_slice(body).map_err(|e| {
        let text = e.to_string();
        if let Some(rest) = text.strip_prefix("unknown field `")
            && let Some(name) = rest.split('`').next()
        {
            return HttpError(
                ApiError::new(
                    ErrorKind::InvalidRequest,
                    format!("Unrecognized request argument supplied: {name}"),
                )
                .with_param(name)
                .with_code("unknown_parameter"),
            );
        }
        HttpError(ApiError::new(
            ErrorKind::InvalidRequest,
            format!("We could not parse the JSON body of your request. Detail: {text}"),
        ))
    })
}
