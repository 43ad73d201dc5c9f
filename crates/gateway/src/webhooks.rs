//! `/v1/webhook_endpoints`: a tenant's webhook endpoints, in OpenAI's shapes (the official
//! SDKs' `client.webhooks.create/retrieve/list/delete/rotate_secret` work unchanged), scoped
//! to the caller's tenant as OpenAI scopes them to a project. Invisible to clients that do not
//! use it. The events delivered, their body and their signature are OpenAI's (see
//! `nightshift_core::webhook`).

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use nightshift_core::page::{ListPage, parse_limit};
use nightshift_core::webhook::{
    CreateWebhookEndpoint, CreateWebhookEndpointBody, RotateSecretBody, WebhookEndpointDeleted,
    WebhookEndpointObject,
};
use nightshift_core::{ApiError, ErrorKind};
use nightshift_proto::v1;

use crate::AppState;
use crate::auth::Tenant;
use crate::error::{HttpError, HttpResult};
use crate::files::RawQuery;

/// The API object of an endpoint the scheduler returned.
fn object(e: v1::WebhookEndpoint) -> WebhookEndpointObject {
    WebhookEndpointObject {
        id: e.id,
        object: "webhook_endpoint",
        created_at: e.created_at_us.div_euclid(1_000_000),
        event_types: e.event_types,
        name: e.name,
        url: e.url,
        signing_secret_hint: Some(e.signing_secret_hint),
        updated_at: Some(e.updated_at),
        signing_secret: e.signing_secret,
    }
}

/// Parses a JSON body (an empty one is `{}`); every failure is a 400 in OpenAI's words.
fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> HttpResult<T> {
    let body = body.map_err(crate::error::body_rejection)?;
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &body
    };
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

/// `POST /v1/webhook_endpoints`.
#[utoipa::path(
    post,
    path = "/webhook_endpoints",
    tag = "Webhooks",
    operation_id = "createWebhookEndpoint",
    summary = "Register a webhook endpoint for the caller's batch events",
    description = "Events (`batch.completed`, `batch.failed`, `batch.expired`, \
                   `batch.cancelled`; all four when `event_types` is absent) are POSTed to \
                   `url` in OpenAI's format, signed as Standard Webhooks says with the \
                   `signing_secret` returned here, and only here.",
    request_body(content = CreateWebhookEndpointBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The new endpoint, with its signing secret.", body = WebhookEndpointObject),
        (status = 400, description = "A missing or invalid `url` (not http(s), or a private address), an unsupported event type, a body that is not JSON.", body = crate::openapi::ErrorResponse),
        (status = 413, description = "A body over `gateway.max_json_body_bytes`.", body = crate::openapi::ErrorResponse),
    ),
)]
pub async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    body: Result<Bytes, BytesRejection>,
) -> HttpResult<Json<WebhookEndpointObject>> {
    let params = CreateWebhookEndpoint::check(parse_body(body)?)?;
    let endpoint = state
        .control
        .webhooks()
        .create_webhook_endpoint(v1::CreateWebhookEndpointRequest {
            tenant_id: tenant.id.to_string(),
            url: params.url,
            event_types: params
                .events
                .iter()
                .map(|e| e.as_str().to_owned())
                .collect(),
            name: params.name,
        })
        .await?
        .into_inner();
    Ok(Json(object(endpoint)))
}

/// `GET /v1/webhook_endpoints`.
#[utoipa::path(
    get,
    path = "/webhook_endpoints",
    tag = "Webhooks",
    operation_id = "listWebhookEndpoints",
    summary = "List the caller's webhook endpoints, oldest first (without their secrets)",
    params(
        ("after" = Option<String>, Query, description = "An endpoint id: the page starts after it (an unknown id gives an empty page)."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "Page size, 1..=100 (default 20)."),
    ),
    responses(
        (status = 200, description = "One page of the caller's endpoints.", body = ListPage<WebhookEndpointObject>),
        (status = 400, description = "A bad `limit` or query string.", body = crate::openapi::ErrorResponse),
    ),
)]
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    query: Result<Query<RawQuery>, QueryRejection>,
) -> HttpResult<Json<ListPage<WebhookEndpointObject>>> {
    let Query(q) = query.map_err(|e| {
        HttpError(ApiError::new(
            ErrorKind::InvalidRequest,
            format!("Invalid query string: {}", e.body_text()),
        ))
    })?;
    let limit = parse_limit(q.get("limit").map(String::as_str), 20, 100)? as usize;
    let after = q.get("after").filter(|a| !a.is_empty());
    let resp = state
        .control
        .webhooks()
        .list_webhook_endpoints(v1::ListWebhookEndpointsRequest {
            tenant_id: tenant.id.to_string(),
        })
        .await?
        .into_inner();
    // A tenant has a handful of endpoints: the page is cut here from the whole list.
    let all: Vec<WebhookEndpointObject> = resp.endpoints.into_iter().map(object).collect();
    let start = match after {
        None => 0,
        Some(a) => match all.iter().position(|e| &e.id == a) {
            Some(i) => i + 1,
            None => all.len(),
        },
    };
    let rest = &all[start..];
    let has_more = rest.len() > limit;
    let data = rest.iter().take(limit).cloned().collect();
    Ok(Json(ListPage::new(data, has_more, |e| e.id.clone())))
}

fn request(tenant: &Tenant, id: String) -> v1::WebhookEndpointRequest {
    v1::WebhookEndpointRequest {
        tenant_id: tenant.id.to_string(),
        id,
    }
}

/// `GET /v1/webhook_endpoints/{id}`.
#[utoipa::path(
    get,
    path = "/webhook_endpoints/{id}",
    tag = "Webhooks",
    operation_id = "retrieveWebhookEndpoint",
    summary = "Retrieve a webhook endpoint (without its secret)",
    params(("id" = String, Path, description = "The endpoint's id (`we_…`).")),
    responses(
        (status = 200, description = "The endpoint.", body = WebhookEndpointObject),
        (status = 404, description = "No such endpoint, or another tenant's.", body = crate::openapi::ErrorResponse),
    ),
)]
pub async fn retrieve(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> HttpResult<Json<WebhookEndpointObject>> {
    let e = state
        .control
        .webhooks()
        .get_webhook_endpoint(request(&tenant, id))
        .await?
        .into_inner();
    Ok(Json(object(e)))
}

/// `DELETE /v1/webhook_endpoints/{id}`.
#[utoipa::path(
    delete,
    path = "/webhook_endpoints/{id}",
    tag = "Webhooks",
    operation_id = "deleteWebhookEndpoint",
    summary = "Delete a webhook endpoint; its pending deliveries are dropped",
    params(("id" = String, Path, description = "The endpoint's id (`we_…`).")),
    responses(
        (status = 200, description = "The endpoint is gone.", body = WebhookEndpointDeleted),
        (status = 404, description = "No such endpoint, or another tenant's.", body = crate::openapi::ErrorResponse),
    ),
)]
pub async fn delete(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> HttpResult<Json<WebhookEndpointDeleted>> {
    let e = state
        .control
        .webhooks()
        .delete_webhook_endpoint(request(&tenant, id))
        .await?
        .into_inner();
    Ok(Json(WebhookEndpointDeleted {
        id: e.id,
        object: "webhook_endpoint.deleted",
        deleted: true,
    }))
}

/// `POST /v1/webhook_endpoints/{id}/rotate_secret`.
#[utoipa::path(
    post,
    path = "/webhook_endpoints/{id}/rotate_secret",
    tag = "Webhooks",
    operation_id = "rotateWebhookEndpointSecret",
    summary = "Replace a webhook endpoint's signing secret",
    description = "The new secret is returned once and signs every delivery from now on, \
                   retries of earlier events included. With \
                   `keep_old_secret_active_for_24_hours`, deliveries also carry a signature \
                   made with the previous secret for 24 hours.",
    params(("id" = String, Path, description = "The endpoint's id (`we_…`).")),
    request_body(content = RotateSecretBody, content_type = "application/json", description = "May be empty."),
    responses(
        (status = 200, description = "The endpoint, with its new secret.", body = WebhookEndpointObject),
        (status = 400, description = "A body that is not JSON or has unknown fields.", body = crate::openapi::ErrorResponse),
        (status = 404, description = "No such endpoint, or another tenant's.", body = crate::openapi::ErrorResponse),
    ),
)]
pub async fn rotate_secret(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> HttpResult<Json<WebhookEndpointObject>> {
    let params: RotateSecretBody = parse_body(body)?;
    let e = state
        .control
        .webhooks()
        .rotate_webhook_secret(v1::RotateWebhookSecretRequest {
            tenant_id: tenant.id.to_string(),
            id,
            keep_old_secret_active_for_24_hours: params
                .keep_old_secret_active_for_24_hours
                .unwrap_or(false),
        })
        .await?
        .into_inner();
    Ok(Json(object(e)))
}
