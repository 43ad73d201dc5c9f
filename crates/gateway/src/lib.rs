//! The gateway: nightshift's OpenAI-compatible HTTP API.
//!
//! It owns nothing durable. File bytes stream straight between the client and object
//! storage; everything else is asked of the scheduler over gRPC. Routes are served under
//! `/v1`, at the root (for a `base_url` that forgot `/v1`) and under `/v1/openai`.
//!
//! [`serve`] runs it on a bound listener over the adapters the binary picked
//! ([`GatewayPorts`]) until its shutdown token is cancelled, then finishes the requests in
//! flight. The ops endpoints (`/livez`, `/readyz`, `/metrics`) are served on a second
//! listener of their own (`ops_listen`), never on the public API port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderValue, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use nightshift_core::secret::Secret;
use nightshift_core::{ApiError, ErrorKind};
use nightshift_proto::client::SchedulerClient;
use nightshift_state::LiveState;
use nightshift_storage::ObjectStore;
use nightshift_telemetry::Readiness;
use rand::Rng;
use rand::distr::Alphanumeric;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

pub mod auth;
pub mod batches;
pub mod console;
pub mod error;
pub mod files;
pub mod idempotency;
pub mod limits;
mod metrics;
pub mod openapi;
pub mod results;
pub mod serve;
pub mod webhooks;

use error::HttpError;

/// The gateway's own settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// The public HTTP API.
    pub listen: SocketAddr,
    /// The ops endpoints (`/livez`, `/readyz`, `/metrics`): for probes and Prometheus only,
    /// so bind it where only they reach. Unset: [`DEFAULT_OPS_LISTEN`] for `nightshift
    /// gateway`, any free loopback port for `nightshift standalone` (printed at start).
    pub ops_listen: Option<SocketAddr>,
    /// The scheduler's gRPC endpoint.
    pub scheduler_url: String,
    /// Largest accepted upload, in bytes. Enforced while streaming: a larger body is cut off
    /// as soon as it passes the limit, and nothing of it is kept.
    pub max_upload_bytes: u64,
    /// Largest accepted JSON request body, in bytes.
    pub max_json_body_bytes: usize,
    /// Completion windows clients may ask for (`24h`, and e.g. `1h` or `7d` if allowed).
    pub completion_windows: Vec<String>,
    /// Deadline of each control-plane call.
    #[serde(with = "humantime_serde")]
    pub control_timeout: Duration,
    /// Most uploads one tenant may have in progress at once on this gateway; one more is a
    /// 429 (`too_many_concurrent_uploads`) with `retry-after` ([`limits`]).
    pub max_concurrent_uploads_per_tenant: usize,
    /// Most bytes one tenant's uploads in progress may declare between them (an upload
    /// without `Content-Length` counts as `max_upload_bytes`); more is a 429
    /// (`upload_bytes_in_flight_exceeded`).
    pub max_upload_bytes_in_flight_per_tenant: u64,
    /// The longest a request head may take to arrive, and the longest an idle keep-alive
    /// connection stays open (slowloris; [`serve`](mod@serve)). Behind a load balancer that
    /// keeps idle connections to the gateway open, keep it above the balancer's idle timeout
    /// (60 s for AWS ALB and ingress-nginx).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// The secret sent with every call to the scheduler. Not a key of `[gateway]`: the binary
    /// copies `[internal] token` here ([`nightshift_proto::auth`]).
    #[serde(skip)]
    pub internal_token: Option<Secret>,
    /// Mutual TLS to the scheduler (then `scheduler_url` is `https://`). Not a key of
    /// `[gateway]`: the binary copies `[internal.tls]` here ([`nightshift_proto::tls`]).
    #[serde(skip)]
    pub internal_tls: Option<nightshift_proto::tls::TlsFiles>,
}

impl GatewayConfig {
    /// Checks what serde cannot: a usable `scheduler_url`, a non-zero header-read timeout.
    ///
    /// # Errors
    /// A message naming the bad setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.header_read_timeout.is_zero() {
            return Err("gateway.header_read_timeout must be more than 0s".into());
        }
        if self.max_concurrent_uploads_per_tenant == 0 {
            return Err("gateway.max_concurrent_uploads_per_tenant must be at least 1".into());
        }
        if self.max_upload_bytes_in_flight_per_tenant < self.max_upload_bytes {
            return Err(
                "gateway.max_upload_bytes_in_flight_per_tenant must be at least max_upload_bytes"
                    .into(),
            );
        }
        SchedulerClient::check_url(&self.scheduler_url)
            .map_err(|e| format!("gateway.scheduler_url: {e}"))
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            ops_listen: None,
            scheduler_url: "http://127.0.0.1:50051".into(),
            max_upload_bytes: 2 * 1024 * 1024 * 1024,
            max_json_body_bytes: 1024 * 1024,
            completion_windows: vec!["24h".into()],
            control_timeout: Duration::from_secs(30),
            max_concurrent_uploads_per_tenant: 8,
            max_upload_bytes_in_flight_per_tenant: 8 * 1024 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(65),
            internal_token: None,
            internal_tls: None,
        }
    }
}

/// Where `nightshift gateway` serves its ops endpoints unless `ops_listen` says otherwise.
pub const DEFAULT_OPS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9091);

/// The infrastructure the gateway runs on; the binary picks the adapters.
#[derive(Debug, Clone)]
pub struct GatewayPorts {
    /// Uploaded files' bytes, written on upload and read back for downloads.
    pub storage: Arc<dyn ObjectStore>,
    /// Live request counts and usage of running batches.
    pub state: Arc<dyn LiveState>,
}

/// Failures that stop the gateway from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The scheduler URL is unusable.
    #[error("invalid gateway configuration: {0}")]
    Config(String),
    /// The listener failed.
    #[error("serve: {0}")]
    Io(#[from] std::io::Error),
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<GatewayConfig>,
    /// The scheduler: tenants, files and batches.
    pub control: SchedulerClient,
    pub storage: Arc<dyn ObjectStore>,
    /// Live request counts and usage of running batches.
    pub live: Arc<dyn LiveState>,
}

/// Request ids: `req_` + 24 alphanumerics, unless the client sent its own `x-request-id`.
#[derive(Clone, Copy, Default)]
struct MakeReqId;

impl MakeRequestId for MakeReqId {
    fn make_request_id<B>(&mut self, _: &http::Request<B>) -> Option<RequestId> {
        let id: String = rand::rng()
            .sample_iter(&Alphanumeric)
            .take(24)
            .map(char::from)
            .collect();
        HeaderValue::from_str(&format!("req_{id}"))
            .ok()
            .map(RequestId::new)
    }
}

async fn not_found(method: Method, uri: Uri) -> HttpError {
    ApiError::new(
        ErrorKind::NotFound,
        format!("Invalid URL ({method} {})", uri.path()),
    )
    .into()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let mut resp = HttpError(ApiError::new(
        ErrorKind::InvalidRequest,
        format!("Method {method} is not allowed for {}", uri.path()),
    ))
    .into_response();
    *resp.status_mut() = http::StatusCode::METHOD_NOT_ALLOWED;
    resp
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    HttpError(ApiError::internal(
        "The server had an error while processing your request.",
    ))
    .into_response()
}

/// The `method` label of a request: a standard method's name, else `other`. Any client can
/// send any method token (the 404 and 405 answers come before authentication), so the raw
/// token would let it mint series without bound.
fn method_label(method: &Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "other",
    }
}

/// Counts and times every request by route template. Every label is bounded: `method` by
/// [`method_label`], `route` by the router's templates (or `unmatched`), `status` by the
/// codes this server answers with.
async fn track(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    ::metrics::counter!(metrics::HTTP_REQUESTS, "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    ::metrics::histogram!(metrics::HTTP_DURATION, "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    resp
}

/// Axum's own rejections (body too large, bad content type, ...) come out as plain text;
/// this rewrites any non-JSON client or server error into the OpenAI envelope.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let message = match String::from_utf8_lossy(&text).trim() {
        "" => status.canonical_reason().unwrap_or("error").to_owned(),
        t => t.to_owned(),
    };
    let kind = match status.as_u16() {
        401 => ErrorKind::Unauthenticated,
        403 => ErrorKind::PermissionDenied,
        404 => ErrorKind::NotFound,
        409 => ErrorKind::Conflict,
        413 => ErrorKind::PayloadTooLarge,
        429 => ErrorKind::RateLimited,
        503 => ErrorKind::Unavailable,
        s if s >= 500 => ErrorKind::Internal,
        _ => ErrorKind::InvalidRequest,
    };
    let mut out = HttpError(ApiError::new(kind, message)).into_response();
    *out.status_mut() = status;
    for (name, value) in parts.headers.iter() {
        if name != http::header::CONTENT_TYPE && name != http::header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// The span of one HTTP request: the root of its trace (or a child of the client's
/// `traceparent`). `tenant_id` and `batch_id` are recorded once known. Probes and scrapes get
/// a DEBUG span: logged as before, never exported as traces of their own.
fn request_span<B>(req: &http::Request<B>) -> tracing::Span {
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let path = req.uri().path();
    let span = if matches!(path, "/livez" | "/readyz" | "/metrics") {
        tracing::debug_span!("http", method = %req.method(), path, request_id)
    } else {
        tracing::info_span!(
            "http",
            otel.name = %format_args!("{} {path}", req.method()),
            otel.kind = "server",
            method = %req.method(),
            path,
            request_id,
            tenant_id = tracing::field::Empty,
            batch_id = tracing::field::Empty,
        )
    };
    let headers = req
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .filter(|(k, _)| k == "traceparent" || k == "tracestate")
        .collect();
    nightshift_telemetry::propagation::set_parent_from_headers(&span, &headers);
    span
}

fn api_routes() -> Router<AppState> {
    Router::new()
        .route(
            "/files",
            get(files::list)
                .post(files::create)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/files/{id}", get(files::retrieve).delete(files::delete))
        .route("/files/{id}/content", get(files::content))
        .route("/batches", get(batches::list).post(batches::create))
        .route("/batches/{id}", get(batches::retrieve))
        .route("/batches/{id}/cancel", axum::routing::post(batches::cancel))
        .route(
            "/webhook_endpoints",
            get(webhooks::list).post(webhooks::create),
        )
        .route(
            "/webhook_endpoints/{id}",
            get(webhooks::retrieve).delete(webhooks::delete),
        )
        .route(
            "/webhook_endpoints/{id}/rotate_secret",
            axum::routing::post(webhooks::rotate_secret),
        )
        .route("/batches/{id}/retry", axum::routing::post(batches::retry))
        .route("/batches/{id}/results", get(results::results))
        .route(openapi::PATH, get(openapi::document))
}

/// The public HTTP application (without the listener), for in-process tests. The ops
/// endpoints are not part of it: [`ops_app`].
pub fn app(state: AppState) -> Router {
    let api = api_routes();
    let routes = Router::new()
        .nest("/v1/openai", api.clone())
        .nest("/v1", api.clone())
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.max_json_body_bytes))
        // one set of per-tenant upload counts per application
        .layer(axum::Extension(Arc::new(limits::UploadLimits::new(
            state.config.max_concurrent_uploads_per_tenant,
            state.config.max_upload_bytes_in_flight_per_tenant,
        ))))
        .with_state(state);
    routes
        .merge(console::router())
        .route_layer(middleware::from_fn(track))
        .layer(middleware::from_fn(json_errors))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeReqId))
}

/// The ops endpoints (`/livez`, `/readyz`, `/metrics`), served on `ops_listen`.
pub fn ops_app(readiness: Readiness) -> Router {
    nightshift_telemetry::ops_router(readiness)
}

/// Runs the gateway — the API on `listener`, the ops endpoints on `ops_listener` — until
/// `shutdown` is cancelled, then finishes the requests in flight. `config` was validated when
/// it was loaded ([`GatewayConfig::validate`]); the scheduler may be down at start or at any
/// time (`/readyz` says so).
///
/// # Errors
/// An unusable `scheduler_url` or internal token, or a listener's I/O error.
pub async fn serve(
    config: GatewayConfig,
    ports: GatewayPorts,
    listener: TcpListener,
    ops_listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let control = SchedulerClient::connect_lazy_tls(
        &config.scheduler_url,
        config.control_timeout,
        config.internal_tls.as_ref(),
    )
    .map_err(|e| ServeError::Config(format!("gateway.scheduler_url: {e}")))?
    .with_token(config.internal_token.as_ref())
    .map_err(|e| ServeError::Config(e.to_string()))?;
    let readiness = readiness(&control);
    metrics::register();
    let limits = serve::ConnectionLimits {
        header_read_timeout: config.header_read_timeout,
    };
    let state = AppState {
        config: Arc::new(config),
        control,
        storage: ports.storage,
        live: ports.state,
    };
    tracing::info!(
        addr = %listener.local_addr()?,
        ops = %ops_listener.local_addr()?,
        "gateway listening"
    );
    // The ops endpoints stay up while the API drains, so probes see it until the end.
    let stop_ops = CancellationToken::new();
    let ops = tokio::spawn(serve::serve_http(
        ops_listener,
        ops_app(readiness),
        limits,
        stop_ops.clone(),
    ));
    let served = serve::serve_http(listener, app(state), limits, shutdown).await;
    stop_ops.cancel();
    let ops_served = ops.await.map_err(std::io::Error::other)?;
    served?;
    ops_served?;
    tracing::info!("gateway stopped");
    Ok(())
}

/// `/readyz`: whether this gateway can do its job — the scheduler answers (every request but
/// a download needs it). Redis is a view (live counts degrade to the scheduler's) and object
/// storage is shared by every replica: neither outage is helped by taking this pod out of its
/// Service, so neither is checked.
fn readiness(control: &SchedulerClient) -> Readiness {
    let c = control.clone();
    Readiness::new().check("scheduler", move || {
        let c = c.clone();
        async move { c.ping().await }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_methods_are_their_own_label_and_the_rest_is_other() {
        for m in [
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::PATCH,
            Method::OPTIONS,
            Method::CONNECT,
            Method::TRACE,
        ] {
            assert_eq!(method_label(&m), m.as_str());
        }
        for token in ["get", "PROPFIND", "X", "A!#$%&'*+-.^_`|~z", "POSTX"] {
            let m = Method::from_bytes(token.as_bytes()).expect("a method token");
            assert_eq!(method_label(&m), "other", "{token}");
        }
    }
}
