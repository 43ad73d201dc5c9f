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
/// Uploads refused or failed, by `reason`.
pub const UPLOADS_REJECTED: &str = "nightshift_gateway_uploads_rejected_total";
