//! `/v1/batches`: create, retrieve, list, cancel.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use nightshift_core::batch::{
    BatchObject, BatchRecord, CreateBatch, CreateBatchBody, RequestCounts,
};
use nightshift_core::page::{ListPage, parse_limit};
use nightshift_core::{ApiError, ErrorKind};
use nightshift_proto::v1;

use crate::AppState;
use crate::auth::Tenant;
use crate::error::{HttpError, HttpResult};
use crate::files::RawQuery;

/// Parses a JSON request body; every failure is a 400 in OpenAI's words.
fn parse_body(body: Result<Bytes, BytesRejection>) -> HttpResult<CreateBatchBody> {
    let body = body.map_err(|e| {
        HttpError(ApiError::new(
            ErrorKind::InvalidRequest,
            format!("Could not read the request body: {}", e.body_text()),
        ))
    })?;
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
        (status = 400, description = "A missing, unknown or invalid field; a body that is not JSON.", body = crate::openapi::ErrorResponse),
        (status = 413, description = "A body over `gateway.max_json_body_bytes`.", body = crate::openapi::ErrorResponse),
    ),
)]
pub async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    body: Result<Bytes, BytesRejection>,
) -> HttpResult<Json<BatchObject>> {
    let params = CreateBatch::check(parse_body(body)?, &state.config.completion_windows)?;
    let has_metadata = params.metadata.is_some();
    let batch = state
        .control
        .batches()
        .create_batch(v1::CreateBatchRequest {
            tenant_id: tenant.id.to_string(),
            input_file_id: params.input_file_id,
            endpoint: params.endpoint,
            completion_window: params.completion_window.raw,
            completion_window_seconds: params.completion_window.seconds,
            metadata: params.metadata.unwrap_or_default().into_iter().collect(),
            has_metadata,
            output_expires_after_seconds: params.output_expires_after_secs,
        })
        .await?
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
    let resp = state
        .control
        .batches()
        .list_batches(v1::ListBatchesRequest {
            tenant_id: tenant.id.to_string(),
            limit,
            after: q.get("after").filter(|a| !a.is_empty()).cloned(),
        })
        .await?
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
