//! A client of any OpenAI-compatible Batch API, over the public routes only: `POST /files`,
//! `GET /files/{id}/content`, `POST /batches`, `GET /batches`, `GET /batches/{id}`,
//! `POST /batches/{id}/cancel` (and, when the server has it, `POST /batches/{id}/retry`).

use std::fmt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use futures::TryStreamExt;
use indicatif::ProgressBar;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// A non-2xx answer, reduced to what a person needs: the server's message (OpenAI's envelope
/// `error.message`, else the body's first line) and the status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// `error.code` of the envelope, when there is one.
    pub code: Option<String>,
}

impl ApiError {
    /// Builds the error from a response's status and body.
    pub fn from_body(status: StatusCode, body: &[u8]) -> Self {
        let envelope: Option<Value> = serde_json::from_slice(body).ok();
        let error = envelope.as_ref().and_then(|v| v.get("error"));
        let message = error
            .and_then(|e| e.get("message"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| {
                let text = String::from_utf8_lossy(body);
                let first = text.lines().next().unwrap_or_default().trim();
                if first.is_empty() {
                    status.canonical_reason().unwrap_or("no message").to_owned()
                } else {
                    first.chars().take(300).collect()
                }
            });
        let code = error
            .and_then(|e| e.get("code"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        Self {
            status,
            message,
            code,
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // one line whatever the server sent
        let message = self.message.replace(['\n', '\r'], " ");
        write!(f, "{message} (HTTP {}", self.status.as_u16())?;
        if let Some(code) = &self.code {
            write!(f, ", {code}")?;
        }
        write!(f, ")")
    }
}

impl std::error::Error for ApiError {}

/// The fields of a Batch object the client reads. The whole object is kept in `raw` for
/// `--json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Batch {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub input_file_id: Option<String>,
    #[serde(default)]
    pub output_file_id: Option<String>,
    #[serde(default)]
    pub error_file_id: Option<String>,
    #[serde(default)]
    pub completion_window: Option<String>,
    #[serde(default)]
    pub created_at: Option<i64>,
    #[serde(default)]
    pub request_counts: Option<RequestCounts>,
    #[serde(skip)]
    pub raw: Value,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct RequestCounts {
    #[serde(default)]
    pub total: u64,
    #[serde(default)]
    pub completed: u64,
    #[serde(default)]
    pub failed: u64,
}

impl Batch {
    fn from_value(raw: Value) -> anyhow::Result<Self> {
        let mut batch: Batch =
            serde_json::from_value(raw.clone()).context("the server's answer is not a Batch")?;
        batch.raw = raw;
        Ok(batch)
    }

    pub fn counts(&self) -> RequestCounts {
        self.request_counts.unwrap_or_default()
    }

    /// A terminal batch never changes again.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.status.as_str(),
            "completed" | "failed" | "expired" | "cancelled"
        )
    }
}

/// One page of `GET /batches`.
pub struct Page {
    pub data: Vec<Batch>,
    pub has_more: bool,
}

/// Where the API is and who calls it.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// `…/v1`, without a trailing slash.
    base_url: String,
    api_key: Option<String>,
}

impl Client {
    pub fn new(base_url: &str, api_key: Option<String>) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .user_agent(concat!("nightshift-cli/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key: api_key.filter(|k| !k.is_empty()),
        })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let req = self
            .http
            .request(method, format!("{}{path}", self.base_url));
        match &self.api_key {
            Some(key) => req.bearer_auth(key),
            None => req,
        }
    }

    /// Sends `req`; a non-2xx answer becomes an [`ApiError`].
    async fn send(&self, req: RequestBuilder) -> anyhow::Result<Response> {
        let resp = req
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach {}: {}", self.base_url, error_chain(&e)))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        Err(ApiError::from_body(status, &body).into())
    }

    async fn json(&self, req: RequestBuilder) -> anyhow::Result<Value> {
        let resp = self.send(req).await?;
        resp.json()
            .await
            .map_err(|e| anyhow::anyhow!("unreadable answer: {}", error_chain(&e)))
    }

    /// `POST /files` with `purpose=batch`, the body streamed from disk: memory stays bounded
    /// whatever the file's size, and `progress` advances by the bytes handed to the socket.
    pub async fn upload(&self, path: &Path, progress: &ProgressBar) -> anyhow::Result<Value> {
        let file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("cannot open {}", path.display()))?;
        let len = file.metadata().await?.len();
        progress.set_length(len);
        let bar = progress.clone();
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024)
            .inspect_ok(move |chunk: &bytes::Bytes| bar.inc(chunk.len() as u64));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "batch.jsonl".into());
        let part =
            reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(stream), len)
                .file_name(name)
                .mime_str("application/jsonl")?;
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part("file", part);
        self.json(self.request(Method::POST, "/files").multipart(form))
            .await
    }

    /// `POST /batches`.
    pub async fn create_batch(
        &self,
        input_file_id: &str,
        endpoint: &str,
        completion_window: &str,
        metadata: &serde_json::Map<String, Value>,
    ) -> anyhow::Result<Batch> {
        let mut body = serde_json::json!({
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": completion_window,
        });
        if !metadata.is_empty() {
            body["metadata"] = Value::Object(metadata.clone());
        }
        let raw = self
            .json(self.request(Method::POST, "/batches").json(&body))
            .await?;
        Batch::from_value(raw)
    }

    /// `GET /batches/{id}`.
    pub async fn batch(&self, id: &str) -> anyhow::Result<Batch> {
        let raw = self
            .json(self.request(Method::GET, &format!("/batches/{}", path_segment(id))))
            .await?;
        Batch::from_value(raw)
    }

    /// `POST /batches/{id}/cancel`.
    pub async fn cancel(&self, id: &str) -> anyhow::Result<Batch> {
        let raw = self
            .json(self.request(
                Method::POST,
                &format!("/batches/{}/cancel", path_segment(id)),
            ))
            .await?;
        Batch::from_value(raw)
    }

    /// `POST /batches/{id}/retry` with `body`, the server-side retry some servers have (see
    /// nightshift's docs/api.md): `None` when this server has no such route (404 or 405 naming
    /// the route, not the batch).
    pub async fn retry_on_server(&self, id: &str, body: &Value) -> anyhow::Result<Option<Batch>> {
        let req = self
            .request(
                Method::POST,
                &format!("/batches/{}/retry", path_segment(id)),
            )
            .json(body);
        match self.json(req).await {
            Ok(raw) => Ok(Some(Batch::from_value(raw)?)),
            Err(e) => match e.downcast_ref::<ApiError>() {
                Some(api) if is_missing_route(api) => Ok(None),
                _ => Err(e),
            },
        }
    }

    /// One page of `GET /batches`, newest first.
    pub async fn list(&self, after: Option<&str>, limit: u32) -> anyhow::Result<Page> {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(after) = after {
            query.push(("after", after.to_owned()));
        }
        let page = self
            .json(self.request(Method::GET, "/batches").query(&query))
            .await?;
        let data = page
            .get("data")
            .and_then(Value::as_array)
            .context("the list has no `data`")?
            .iter()
            .cloned()
            .map(Batch::from_value)
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Page {
            has_more: page
                .get("has_more")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            data,
        })
    }

    /// `GET /files/{id}/content` streamed into `dest` (appended), `progress` advancing by
    /// bytes received. Returns the bytes written.
    pub async fn download_to(
        &self,
        file_id: &str,
        dest: &mut (impl tokio::io::AsyncWrite + Unpin),
        progress: &ProgressBar,
    ) -> anyhow::Result<u64> {
        let resp = self
            .send(self.request(
                Method::GET,
                &format!("/files/{}/content", path_segment(file_id)),
            ))
            .await?;
        if let Some(len) = resp.content_length() {
            progress.inc_length(len);
        }
        let mut written = 0;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| anyhow::anyhow!("download of {file_id} broke: {}", error_chain(&e)))?
        {
            dest.write_all(&chunk).await?;
            written += chunk.len() as u64;
            progress.inc(chunk.len() as u64);
        }
        dest.flush().await?;
        Ok(written)
    }
}

/// Whether a 404/405 is about the route rather than the object: nightshift and OpenAI both
/// answer an unknown route with `Invalid URL (…)`; a 405 is always about the route.
fn is_missing_route(e: &ApiError) -> bool {
    e.status == StatusCode::METHOD_NOT_ALLOWED
        || (e.status == StatusCode::NOT_FOUND && e.message.starts_with("Invalid URL"))
}

/// Ids go into paths as they are, but a character that would change the route is escaped.
fn path_segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An error and its causes on one line (`reqwest` keeps the useful part in the sources).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_openai_envelope_gives_its_message_status_and_code() {
        let e = ApiError::from_body(
            StatusCode::NOT_FOUND,
            br#"{"error":{"message":"No batch found with id 'batch_x'.","type":"invalid_request_error","param":null,"code":"not_found"}}"#,
        );
        assert_eq!(
            e.to_string(),
            "No batch found with id 'batch_x'. (HTTP 404, not_found)"
        );
    }

    #[test]
    fn a_body_without_an_envelope_gives_its_first_line() {
        let e = ApiError::from_body(StatusCode::BAD_GATEWAY, b"upstream down\nmore detail\n");
        assert_eq!(e.to_string(), "upstream down (HTTP 502)");
        let e = ApiError::from_body(StatusCode::SERVICE_UNAVAILABLE, b"");
        assert_eq!(e.to_string(), "Service Unavailable (HTTP 503)");
    }

    #[test]
    fn a_multiline_message_stays_on_one_line() {
        let e = ApiError::from_body(
            StatusCode::BAD_REQUEST,
            br#"{"error":{"message":"line one\nline two"}}"#,
        );
        assert_eq!(e.to_string(), "line one line two (HTTP 400)");
    }

    #[test]
    fn only_a_missing_route_means_no_server_side_retry() {
        let route = ApiError::from_body(
            StatusCode::NOT_FOUND,
            br#"{"error":{"message":"Invalid URL (POST /v1/batches/b/retry)"}}"#,
        );
        assert!(is_missing_route(&route));
        let object = ApiError::from_body(
            StatusCode::NOT_FOUND,
            br#"{"error":{"message":"No batch found with id 'b'."}}"#,
        );
        assert!(!is_missing_route(&object));
        assert!(is_missing_route(&ApiError::from_body(
            StatusCode::METHOD_NOT_ALLOWED,
            b""
        )));
    }

    #[test]
    fn ids_cannot_change_the_route() {
        assert_eq!(path_segment("batch_abc-1"), "batch_abc-1");
        assert_eq!(path_segment("../files"), "..%2Ffiles");
    }
}
