//! Telemetry: one call sets up logs, traces and metrics for a service; one router serves the
//! health and metrics endpoints every service exposes.
//!
//! - Logs: JSON (default) or pretty, filtered by `RUST_LOG` or the configured filter.
//! - Traces: `tracing` spans of the nightshift crates (level INFO and up) become OpenTelemetry
//!   spans, whatever the log filter says. They are exported (OTLP over HTTP/protobuf) only when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set; without it spans still get trace ids, so the W3C
//!   `traceparent` passes through the service, but nothing leaves the process. See
//!   [`propagation`] for carrying the context across gRPC and the work queues.
//! - Metrics: a process-wide Prometheus recorder, rendered at `/metrics`. Several services in
//!   one process (standalone mode, tests) share it.
//! - Health: `/livez` answers while the process serves requests; `/readyz` runs the service's
//!   dependency checks and answers 503 naming the ones that failed (their errors go to the
//!   log, not into the answer: a dependency's error text can name hosts and users).

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use futures::future::BoxFuture;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::Registry;
use tracing_subscriber::util::SubscriberInitExt;

pub mod metrics;
mod otel;
pub mod propagation;

pub use otel::{OtelSettings, TelemetryGuard};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (production).
    #[default]
    Json,
    /// Human-readable (a terminal).
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG` wins when set. Logs only: traces always record
    /// the nightshift crates' spans at INFO and up.
    pub log_filter: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Json,
            log_filter: "info".into(),
        }
    }
}

/// [`init_with`] for a process named `nightshift`, exporting traces as the environment says
/// ([`OtelSettings::from_env`]).
pub fn init(config: &TelemetryConfig) -> TelemetryGuard {
    init_with(config, OtelSettings::from_env("nightshift"))
}

/// Installs the global log and trace subscriber, the W3C trace-context propagator and the
/// metrics recorder. Call once at the binary's edge and keep the guard until the end: dropping
/// it flushes the spans not yet exported.
///
/// Calling again (tests, several services in one process) keeps the first setup, `otel`
/// included, and returns a guard that flushes that setup.
pub fn init_with(config: &TelemetryConfig, otel: OtelSettings) -> TelemetryGuard {
    static FIRST: OnceLock<TelemetryGuard> = OnceLock::new();
    metrics_handle();
    FIRST
        .get_or_init(|| {
            let (guard, otel_layer) = otel::install(&otel);
            let filter = EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new(&config.log_filter));
            let fmt_layer = match config.log_format {
                LogFormat::Json => tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .boxed(),
                LogFormat::Pretty => tracing_subscriber::fmt::layer().boxed(),
            };
            // Each layer has its own filter: quiet logs must not switch traces off.
            let layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> =
                vec![fmt_layer.with_filter(filter).boxed(), otel_layer];
            let installed = tracing_subscriber::registry().with(layers).try_init();
            if installed.is_err() {
                // Another subscriber was installed first (a test harness): spans go there.
                tracing::debug!("a global subscriber is already installed; keeping it");
            }
            guard
        })
        .clone()
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        // Histograms render as summaries unless given buckets: every one gets buckets, so
        // dashboards can aggregate them across processes.
        let recorder = metrics::prometheus_builder().build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (a test harness); ours then renders
        // only what is recorded through it, which is nothing — acceptable outside services.
        let _ = ::metrics::set_global_recorder(recorder);
        metrics::describe();
        handle
    })
}

/// A dependency check for `/readyz`: `Err` says what is wrong.
pub type ReadinessCheck = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// Named readiness checks of one service.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Vec<(&'static str, ReadinessCheck)>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a check named after the dependency (`"postgres"`, `"object_storage"`).
    pub fn check<F, Fut>(mut self, name: &'static str, f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.checks.push((name, Arc::new(move || Box::pin(f()))));
        self
    }

    /// Runs every check concurrently; the failures, by name.
    pub async fn failures(&self) -> Vec<(&'static str, String)> {
        let results = futures::future::join_all(
            self.checks
                .iter()
                .map(|(name, f)| async move { (*name, f().await) }),
        )
        .await;
        results
            .into_iter()
            .filter_map(|(name, r)| r.err().map(|e| (name, e)))
            .collect()
    }
}

/// `/livez`, `/readyz` and `/metrics`, to merge into a service's router.
pub fn ops_router(readiness: Readiness) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_endpoint))
        .with_state(Arc::new(readiness))
}

async fn readyz(State(readiness): State<Arc<Readiness>>) -> impl IntoResponse {
    let failures = readiness.failures().await;
    for (dependency, error) in &failures {
        tracing::warn!(dependency, error = %error, "not ready");
    }
    let body = serde_json::json!({
        "ready": failures.is_empty(),
        "failures": failures.iter().map(|(n, _)| serde_json::json!({"dependency": n})).collect::<Vec<_>>(),
    });
    let status = if failures.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body))
}

async fn metrics_endpoint() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics_handle().render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(router: Router, path: &str) -> (StatusCode, String) {
        let resp = router
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("response");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn readiness_reports_failing_dependencies() {
        let ok = Readiness::new().check("db", || async { Ok(()) });
        assert_eq!(get(ops_router(ok), "/readyz").await.0, StatusCode::OK);
        let bad = Readiness::new()
            .check("db", || async { Ok(()) })
            .check("s3", || async { Err("connection refused".to_string()) });
        let (status, body) = get(ops_router(bad.clone()), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"s3\""), "{body}");
        // the error itself is logged, never answered
        assert!(!body.contains("connection refused"), "{body}");
        assert!(!body.contains("\"db\""), "{body}");
        assert_eq!(get(ops_router(bad), "/livez").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn metrics_are_rendered() {
        metrics_handle();
        ::metrics::counter!("nightshift_telemetry_test_total").increment(3);
        let (status, body) = get(ops_router(Readiness::new()), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("nightshift_telemetry_test_total 3"), "{body}");
    }
}
