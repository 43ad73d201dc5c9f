//! One error vocabulary, two transports.
//!
//! Every error that may reach a client is an [`ApiError`]: a small [`ErrorKind`] that maps to
//! both an HTTP status with OpenAI's error `type` (in the gateway) and a gRPC code (in the
//! proto crate), plus OpenAI's `message`, `param` and `code`. Internal crates keep their own
//! `thiserror` enums and convert into this at their edge.

use std::fmt;

/// The small set of error classes every transport understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The client sent something wrong (HTTP 400, `invalid_request_error`).
    InvalidRequest,
    /// No such object, or it belongs to another tenant (HTTP 404).
    NotFound,
    /// The object is in a state that forbids the call, and retrying will not help (HTTP 409).
    Conflict,
    /// A body over a configured size limit (HTTP 413).
    PayloadTooLarge,
    /// A `Range` that the object cannot satisfy (HTTP 416).
    RangeNotSatisfiable,
    /// Missing or unknown API key (HTTP 401, `authentication_error`).
    Unauthenticated,
    /// The key is valid but may not do this (HTTP 403, `permission_error`).
    PermissionDenied,
    /// Too many requests (HTTP 429, `rate_limit_error`).
    RateLimited,
    /// A dependency is down; retrying later may work (HTTP 503, `server_error`).
    Unavailable,
    /// A bug or an unexpected failure (HTTP 500, `server_error`).
    Internal,
}

impl ErrorKind {
    /// Every class, for code that must cover them all (tests, documents).
    pub const ALL: [Self; 10] = [
        Self::InvalidRequest,
        Self::NotFound,
        Self::Conflict,
        Self::PayloadTooLarge,
        Self::RangeNotSatisfiable,
        Self::Unauthenticated,
        Self::PermissionDenied,
        Self::RateLimited,
        Self::Unavailable,
        Self::Internal,
    ];

    /// HTTP status code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidRequest => 400,
            Self::Unauthenticated => 401,
            Self::PermissionDenied => 403,
            Self::NotFound => 404,
            Self::Conflict => 409,
            Self::PayloadTooLarge => 413,
            Self::RangeNotSatisfiable => 416,
            Self::RateLimited => 429,
            Self::Internal => 500,
            Self::Unavailable => 503,
        }
    }

    /// OpenAI's error `type` for this class.
    pub fn openai_type(self) -> &'static str {
        match self {
            Self::InvalidRequest
            | Self::NotFound
            | Self::Conflict
            | Self::PayloadTooLarge
            | Self::RangeNotSatisfiable => "invalid_request_error",
            Self::Unauthenticated => "authentication_error",
            Self::PermissionDenied => "permission_error",
            Self::RateLimited => "rate_limit_error",
            Self::Unavailable | Self::Internal => "server_error",
        }
    }

    /// Stable lowercase name, used on the gRPC wire and in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::PayloadTooLarge => "payload_too_large",
            Self::RangeNotSatisfiable => "range_not_satisfiable",
            Self::Unauthenticated => "unauthenticated",
            Self::PermissionDenied => "permission_denied",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// Inverse of [`ErrorKind::as_str`].
    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "invalid_request" => Self::InvalidRequest,
            "not_found" => Self::NotFound,
            "conflict" => Self::Conflict,
            "payload_too_large" => Self::PayloadTooLarge,
            "range_not_satisfiable" => Self::RangeNotSatisfiable,
            "unauthenticated" => Self::Unauthenticated,
            "permission_denied" => Self::PermissionDenied,
            "rate_limited" => Self::RateLimited,
            "unavailable" => Self::Unavailable,
            "internal" => Self::Internal,
            _ => return None,
        })
    }
}

/// An error as a client sees it: OpenAI's `{message, type, param, code}` plus its class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// The request field at fault (`"purpose"`, `"limit"`, `"metadata.team"`), if any.
    pub param: Option<String>,
    /// A machine-readable code (`"missing_required_parameter"`, `"invalid_value"`), if any.
    pub code: Option<String>,
    /// Whether a client retry could ever succeed; `false` is sent as `x-should-retry: false`
    /// so the SDKs stop retrying a 409 that will never change.
    pub retryable: Option<bool>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
            code: None,
            retryable: None,
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    pub fn not_retryable(mut self) -> Self {
        self.retryable = Some(false);
        self
    }

    /// 400 for a field with a wrong value.
    pub fn invalid_value(param: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message)
            .with_param(param)
            .with_code("invalid_value")
    }

    /// 400 for a required field that is absent.
    pub fn missing(param: &str) -> Self {
        Self::new(
            ErrorKind::InvalidRequest,
            format!("Missing required parameter: '{param}'."),
        )
        .with_param(param)
        .with_code("missing_required_parameter")
    }

    /// 404 for an object that does not exist or is not the caller's. `what` is OpenAI's
    /// object noun (`"File"`, `"Batch"`); `param` is always `"id"` as OpenAI does.
    pub fn no_such(what: &str, id: &str) -> Self {
        Self::new(ErrorKind::NotFound, format!("No such {what} object: {id}")).with_param("id")
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unauthenticated, message).with_code("invalid_api_key")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_map() {
        for kind in ErrorKind::ALL {
            assert_eq!(ErrorKind::parse(kind.as_str()), Some(kind));
            let status = kind.http_status();
            // client mistakes are 4xx, never 5xx: the SDKs retry 5xx
            let client_side = !matches!(kind, ErrorKind::Unavailable | ErrorKind::Internal);
            assert_eq!(client_side, (400..500).contains(&status), "{kind:?}");
        }
        assert_eq!(ErrorKind::parse("nope"), None);
    }

    #[test]
    fn helpers_fill_openai_fields() {
        let e = ApiError::missing("purpose");
        assert_eq!(e.param.as_deref(), Some("purpose"));
        assert_eq!(e.code.as_deref(), Some("missing_required_parameter"));
        let e = ApiError::no_such("File", "file-x");
        assert_eq!(e.message, "No such File object: file-x");
        assert_eq!(e.kind.http_status(), 404);
    }
}
