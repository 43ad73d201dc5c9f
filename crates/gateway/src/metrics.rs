//! The gateway's metrics. Names: `nightshift_gateway_*`; labels are bounded (route templates,
//! methods, status classes — never ids).

/// HTTP requests, by `method`, `route` (template) and `status`.
pub const HTTP_REQUESTS: &str = "nightshift_gateway_http_requests_total";
/// HTTP request latency, by `method` and `route`.
pub const HTTP_DURATION: &str = "nightshift_gateway_http_request_duration_seconds";
/// File bytes received by uploads that were stored.
pub const UPLOAD_BYTES: &str = "nightshift_gateway_upload_bytes_total";
/// File bytes sent by downloads.
pub const DOWNLOAD_BYTES: &str = "nightshift_gateway_download_bytes_total";
/// Uploads refused or failed, by `reason` (one of [`UPLOAD_REJECT_REASONS`]).
pub const UPLOADS_REJECTED: &str = "nightshift_gateway_uploads_rejected_total";
/// Every `reason` of [`UPLOADS_REJECTED`].
pub const UPLOAD_REJECT_REASONS: [&str; 4] = ["too_large", "empty", "not_jsonl", "storage_quota"];

/// Makes the counters whose labels are known up front appear at zero, so "nothing yet" reads
/// as 0 rather than as no series. (`HTTP_REQUESTS` is labelled by the status answered, so it
/// starts with the first request.)
pub fn register() {
    ::metrics::counter!(UPLOAD_BYTES).increment(0);
    ::metrics::counter!(DOWNLOAD_BYTES).increment(0);
    for reason in UPLOAD_REJECT_REASONS {
        ::metrics::counter!(UPLOADS_REJECTED, "reason" => reason).increment(0);
    }
}
