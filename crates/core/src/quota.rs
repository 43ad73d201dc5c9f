//! The client-facing side of per-tenant quotas: their error codes and errors, shared by the
//! scheduler (which enforces them) and the gateway (which refuses an upload early).
//!
//! A quota is not passed by waiting a moment (a batch must end, files must be deleted), so
//! every refusal tells the SDKs not to retry (`x-should-retry: false`): the error surfaces at
//! once, never a silent queue.

use crate::{ApiError, ErrorKind};

/// `code` of a batch create refused by `max_active_batches` (429 `rate_limit_error`).
pub const ACTIVE_BATCH_LIMIT_EXCEEDED: &str = "active_batch_limit_exceeded";
/// `errors.data[].code` of a batch failed at validation by `max_enqueued_requests` (OpenAI
/// fails a batch over its enqueued-token limit the same way, with `token_limit_exceeded`).
pub const REQUEST_LIMIT_EXCEEDED: &str = "request_limit_exceeded";
/// `code` of an upload refused by `max_stored_bytes` (400 `invalid_request_error`,
/// `param: file`).
pub const STORAGE_QUOTA_EXCEEDED: &str = "storage_quota_exceeded";

/// The tenant has `held` active batches, its limit.
pub fn active_batch_limit_exceeded(held: u64) -> ApiError {
    ApiError::new(
        ErrorKind::RateLimited,
        format!(
            "Active batch limit reached: the organization has {held} batches in progress, the \
             most allowed at once. Wait for one to complete, or cancel one, then retry."
        ),
    )
    .with_code(ACTIVE_BATCH_LIMIT_EXCEEDED)
    .not_retryable()
}

/// An upload of at least `adding` bytes while the tenant's files hold `held` of `limit`.
pub fn storage_quota_exceeded(adding: u64, held: u64, limit: u64) -> ApiError {
    ApiError::new(
        ErrorKind::InvalidRequest,
        format!(
            "Storage quota exceeded: this file has at least {adding} bytes, and the \
             organization's files already hold {held} of the {limit} bytes allowed. Delete \
             files you no longer need, then retry."
        ),
    )
    .with_param("file")
    .with_code(STORAGE_QUOTA_EXCEEDED)
    .not_retryable()
}

/// A batch of `adding` requests while the tenant's active batches hold `held` of `limit`.
pub fn request_limit_message(adding: u64, held: u64, limit: u64) -> String {
    format!(
        "Enqueued request limit reached: this batch has {adding} requests, and the \
         organization's batches in progress already hold {held} of the {limit} allowed. Try \
         again once some of them have completed."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_errors_are_final_client_errors_with_their_codes() {
        let e = active_batch_limit_exceeded(5);
        assert_eq!(
            (e.kind.http_status(), e.kind.openai_type()),
            (429, "rate_limit_error")
        );
        assert_eq!(e.code.as_deref(), Some(ACTIVE_BATCH_LIMIT_EXCEEDED));
        assert_eq!(e.retryable, Some(false));
        let e = storage_quota_exceeded(10, 95, 100);
        assert_eq!(e.kind.http_status(), 400);
        assert_eq!(e.param.as_deref(), Some("file"));
        assert_eq!(e.code.as_deref(), Some(STORAGE_QUOTA_EXCEEDED));
        assert_eq!(e.retryable, Some(false));
        assert!(e.message.contains("95 of the 100"), "{}", e.message);
    }
}
