//! The OpenTelemetry side of [`init_with`](crate::init_with): the tracer provider, the
//! `tracing` layer feeding it, and the guard that flushes it.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::Registry;

/// The path OTLP/HTTP serves traces at, under the collector's base URL.
const TRACES_PATH: &str = "/v1/traces";

/// Spans of these targets (and their modules) at INFO and up become OpenTelemetry spans.
/// Only our own: a dependency's spans would be roots or leaves of no use, and the SDK's own
/// diagnostics must never feed back into it.
const TRACED_TARGET: &str = "nightshift";

/// Where traces go and under which name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtelSettings {
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// The collector's OTLP/HTTP base URL (e.g. `http://127.0.0.1:4318`); traces are POSTed
    /// to `<endpoint>/v1/traces` as protobuf. `None`: no exporter at all.
    pub otlp_endpoint: Option<String>,
}

impl OtelSettings {
    /// The standard variables: `OTEL_SERVICE_NAME` (else `service`) and
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (unset or empty: no export). The exporter also reads
    /// `OTEL_EXPORTER_OTLP_HEADERS` / `_TIMEOUT` and the `OTEL_BSP_*` batch settings; the
    /// sampler reads `OTEL_TRACES_SAMPLER` / `_ARG` (default: always, or as the parent says).
    pub fn from_env(service: &str) -> Self {
        Self::from_vars(service, |var| std::env::var(var).ok())
    }

    /// [`from_env`](Self::from_env) over any source of variables (tests pass a map).
    pub fn from_vars(service: &str, var: impl Fn(&str) -> Option<String>) -> Self {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        Self {
            service_name: set("OTEL_SERVICE_NAME").unwrap_or_else(|| service.to_owned()),
            otlp_endpoint: set("OTEL_EXPORTER_OTLP_ENDPOINT"),
        }
    }

    /// The URL traces are POSTed to.
    fn traces_url(&self) -> Option<String> {
        let base = self.otlp_endpoint.as_deref()?.trim().trim_end_matches('/');
        Some(if base.ends_with(TRACES_PATH) {
            base.to_owned()
        } else {
            format!("{base}{TRACES_PATH}")
        })
    }
}

/// Keeps the trace pipeline of [`init_with`](crate::init_with). Dropping it (or calling
/// [`flush`](Self::flush)) exports the finished spans still buffered; it never stops the
/// pipeline, which lives as long as the process.
#[derive(Debug, Clone)]
pub struct TelemetryGuard {
    /// The provider, when spans are exported (nothing to flush otherwise).
    exporting: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Exports every finished span now. Blocks until the collector answered (or the
    /// exporter's timeout): call it from a blocking context, not on an async worker that the
    /// collector itself needs.
    pub fn flush(&self) {
        if let Some(provider) = &self.exporting
            && let Err(e) = provider.force_flush()
        {
            tracing::warn!(error = %e, "could not flush the trace exporter");
        }
    }

    /// Whether spans are exported.
    pub fn is_exporting(&self) -> bool {
        self.exporting.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Builds the provider (with an OTLP exporter if `settings` names an endpoint), installs it
/// and the W3C propagator globally, and returns the guard and the layer to add to the
/// subscriber.
pub(crate) fn install(
    settings: &OtelSettings,
) -> (TelemetryGuard, Box<dyn Layer<Registry> + Send + Sync>) {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let resource = Resource::builder()
        .with_service_name(settings.service_name.clone())
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let mut exporting = false;
    if let Some(url) = settings.traces_url() {
        // The blocking client runs on the SDK's batch thread, which has no async runtime.
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(url.clone())
            .build()
        {
            Ok(exporter) => {
                builder = builder.with_batch_exporter(exporter);
                exporting = true;
            }
            // Logs are not set up yet: this goes to stderr, once, at start.
            Err(e) => eprintln!("nightshift: OTLP trace exporter to {url} not started: {e}"),
        }
    }
    let provider = builder.build();
    let tracer = provider.tracer("nightshift");
    opentelemetry::global::set_tracer_provider(provider.clone());
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(Targets::new().with_target(TRACED_TARGET, Level::INFO))
        .boxed();
    (
        TelemetryGuard {
            exporting: exporting.then_some(provider),
        },
        layer,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_the_standard_variables() {
        let none = OtelSettings::from_vars("nightshift-gateway", |_| None);
        assert_eq!(none.service_name, "nightshift-gateway");
        assert_eq!(none.otlp_endpoint, None);
        assert_eq!(none.traces_url(), None);

        let vars = |name: &str| match name {
            "OTEL_SERVICE_NAME" => Some("edge".to_owned()),
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://collector:4318/".to_owned()),
            _ => None,
        };
        let set = OtelSettings::from_vars("nightshift-gateway", vars);
        assert_eq!(set.service_name, "edge");
        assert_eq!(
            set.traces_url().as_deref(),
            Some("http://collector:4318/v1/traces")
        );

        let blank = OtelSettings::from_vars("s", |_| Some("  ".to_owned()));
        assert_eq!(blank.service_name, "s");
        assert_eq!(blank.otlp_endpoint, None);

        let full = OtelSettings {
            service_name: "s".into(),
            otlp_endpoint: Some("http://c:4318/v1/traces".into()),
        };
        assert_eq!(
            full.traces_url().as_deref(),
            Some("http://c:4318/v1/traces")
        );
    }
}
