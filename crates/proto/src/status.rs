//! [`ApiError`] ⇄ [`tonic::Status`]: the error vocabulary across gRPC.
//!
//! The class travels both as the gRPC code (for generic clients and tooling) and exactly, with
//! OpenAI's `param`/`code`, in metadata — so a 409 raised in the scheduler reaches the HTTP
//! client as the same 409 with the same fields.

use nightshift_core::{ApiError, ErrorKind};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

const KIND: &str = "ns-kind";
const PARAM: &str = "ns-param";
const CODE: &str = "ns-code";
const RETRYABLE: &str = "ns-retryable";

fn code_for(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidRequest => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::Conflict => Code::FailedPrecondition,
        ErrorKind::PayloadTooLarge | ErrorKind::RangeNotSatisfiable => Code::OutOfRange,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::RateLimited => Code::ResourceExhausted,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Internal => Code::Internal,
    }
}

fn insert(md: &mut MetadataMap, key: &'static str, value: &str) {
    // Metadata values must be visible ASCII; params and codes are identifiers, so anything
    // else is dropped rather than corrupting the response.
    if let Ok(v) = MetadataValue::try_from(value) {
        md.insert(key, v);
    }
}

/// Encodes an API error as a gRPC status.
pub fn status_from_api_error(err: &ApiError) -> Status {
    let mut status = Status::new(code_for(err.kind), err.message.clone());
    let md = status.metadata_mut();
    insert(md, KIND, err.kind.as_str());
    if let Some(p) = &err.param {
        insert(md, PARAM, p);
    }
    if let Some(c) = &err.code {
        insert(md, CODE, c);
    }
    if let Some(r) = err.retryable {
        insert(md, RETRYABLE, if r { "true" } else { "false" });
    }
    status
}

/// Decodes a gRPC status. A status that did not come from [`status_from_api_error`] (the
/// peer is down, a deadline passed, a transport error) becomes `Unavailable` or `Internal`,
/// never a client error: the client did nothing wrong.
pub fn api_error_from_status(status: &Status) -> ApiError {
    let md = status.metadata();
    let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
    if let Some(kind) = get(KIND).as_deref().and_then(ErrorKind::parse) {
        let mut err = ApiError::new(kind, status.message());
        err.param = get(PARAM);
        err.code = get(CODE);
        err.retryable = get(RETRYABLE).map(|v| v == "true");
        return err;
    }
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::ResourceExhausted => {
            ApiError::unavailable(format!(
                "The control plane is unavailable: {}",
                status.message()
            ))
        }
        _ => ApiError::internal(format!("Control plane error: {}", status.message())),
    }
}

impl From<ApiErrorStatus> for Status {
    fn from(e: ApiErrorStatus) -> Self {
        status_from_api_error(&e.0)
    }
}

/// Wrapper so `?` converts an [`ApiError`] into a [`Status`] inside gRPC handlers.
#[derive(Debug)]
pub struct ApiErrorStatus(pub ApiError);

impl From<ApiError> for ApiErrorStatus {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_field() {
        let err = ApiError::invalid_value("limit", "bad limit").not_retryable();
        let back = api_error_from_status(&status_from_api_error(&err));
        assert_eq!(back, err);
        let err = ApiError::no_such("File", "file-1");
        assert_eq!(api_error_from_status(&status_from_api_error(&err)), err);
    }

    #[test]
    fn foreign_statuses_are_server_side() {
        let e = api_error_from_status(&Status::unavailable("connection refused"));
        assert_eq!(e.kind, ErrorKind::Unavailable);
        let e = api_error_from_status(&Status::invalid_argument("prost decode"));
        assert_eq!(e.kind, ErrorKind::Internal);
    }
}
