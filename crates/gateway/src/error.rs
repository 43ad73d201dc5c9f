//! Every error leaves the gateway in OpenAI's envelope:
//! `{"error": {"message", "type", "param", "code"}}` with `Content-Type: application/json`,
//! including axum's own rejections, unknown routes and wrong methods.

use axum::Json;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use nightshift_core::{ApiError, ErrorKind};

/// The gateway's error type: an [`ApiError`] that knows how to become a response.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<tonic::Status> for HttpError {
    fn from(status: tonic::Status) -> Self {
        let err = nightshift_proto::api_error_from_status(&status);
        if matches!(err.kind, ErrorKind::Internal | ErrorKind::Unavailable) {
            tracing::error!(code = ?status.code(), message = status.message(), "control plane call failed");
        }
        Self(err)
    }
}

impl From<nightshift_storage::StorageError> for HttpError {
    fn from(e: nightshift_storage::StorageError) -> Self {
        tracing::error!(error = %e, "object storage failed");
        Self(ApiError::unavailable("Object storage is unavailable."))
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let e = self.0;
        let status =
            StatusCode::from_u16(e.kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::json!({
            "error": {
                "message": e.message,
                "type": e.kind.openai_type(),
                "param": e.param,
                "code": e.code,
            }
        });
        let mut resp = (status, Json(body)).into_response();
        // A 429 that can pass (a limit of work in progress) says when to come back; the SDKs
        // wait that long before their retry.
        if e.kind == nightshift_core::ErrorKind::RateLimited && e.retryable != Some(false) {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        // The SDKs retry 408/409/429/5xx; tell them when a retry cannot help.
        if let Some(retry) = e.retryable {
            resp.headers_mut().insert(
                "x-should-retry",
                HeaderValue::from_static(if retry { "true" } else { "false" }),
            );
        }
        resp
    }
}

pub type HttpResult<T> = Result<T, HttpError>;

/// A request body that could not be read: 413 when it passed the size limit (the SDKs do not
/// retry it), else a 400; both in OpenAI's envelope.
pub fn body_rejection(e: axum::extract::rejection::BytesRejection) -> HttpError {
    let kind = if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ErrorKind::PayloadTooLarge
    } else {
        ErrorKind::InvalidRequest
    };
    HttpError(ApiError::new(
        kind,
        format!("Could not read the request body: {}", e.body_text()),
    ))
}
