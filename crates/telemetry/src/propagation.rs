//! Carrying a trace from one service to the next, so that one batch is one trace: the W3C
//! trace context (`traceparent`, and `tracestate` when there is one) in gRPC metadata and in
//! work-queue message headers.
//!
//! - gRPC clients add [`TraceContextInterceptor`]: each call carries the context of the span
//!   it is made in. gRPC servers add [`GrpcServerTraceLayer`]: each call runs in a span whose
//!   parent is the caller's.
//! - Queue publishers stamp their messages with [`message_headers`] (trace context and
//!   `published-at`); consumers parent their span on the message with
//!   [`set_parent_from_headers`] and report the delivery lag with [`observe_delivery`].
//! - A context that must outlive any span (a batch remembers the span that created it) is kept
//!   as its `traceparent` string: [`traceparent`] / [`set_parent`].
//!
//! Without [`init`](crate::init) (or with another subscriber) spans have no trace context:
//! nothing is injected and extracting does nothing.

use std::collections::{BTreeMap, HashMap};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing::Span;
use tracing::instrument::{Instrument, Instrumented};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics;

/// The header (and metadata key) carrying the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// The message header carrying when the message was published, in milliseconds since the
/// Unix epoch: consumers measure their lag from it.
pub const PUBLISHED_AT: &str = "published-at";

/// Message headers, as `nightshift_queue::Headers` defines them.
pub type Headers = BTreeMap<String, String>;

/// The context of `span`, or the current OpenTelemetry context if `span` has none (a span
/// only the logs record).
fn context_of(span: &Span) -> Context {
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        cx
    } else {
        Context::current()
    }
}

/// Parents `span` on `cx` if `cx` names a span; otherwise leaves it alone (it keeps the
/// parent it was created with). Only works on a span just created, before it is entered.
fn adopt(span: &Span, cx: Context) {
    if cx.span().span_context().is_valid() {
        // An error means the span is disabled, or traces are not set up: nothing to parent.
        let _ = span.set_parent(cx);
    }
}

/// `span`'s trace context as a `traceparent` value, if it has one.
pub fn traceparent(span: &Span) -> Option<String> {
    let mut fields = HashMap::new();
    TraceContextPropagator::new().inject_context(&context_of(span), &mut fields);
    fields.remove(TRACEPARENT)
}

/// Parents `span` (just created, not yet entered) on a remembered `traceparent`; a missing
/// or malformed one leaves the span as it is.
pub fn set_parent(span: &Span, traceparent: Option<&str>) {
    let Some(value) = traceparent else { return };
    let fields = HashMap::from([(TRACEPARENT.to_owned(), value.to_owned())]);
    adopt(span, TraceContextPropagator::new().extract(&fields));
}

struct MapInjector<'a>(&'a mut Headers);

impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct MapExtractor<'a>(&'a Headers);

impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Adds `span`'s trace context to message headers.
pub fn inject_headers(span: &Span, headers: &mut Headers) {
    TraceContextPropagator::new().inject_context(&context_of(span), &mut MapInjector(headers));
}

/// Parents `span` (just created, not yet entered) on the trace context of message headers.
pub fn set_parent_from_headers(span: &Span, headers: &Headers) {
    adopt(
        span,
        TraceContextPropagator::new().extract(&MapExtractor(headers)),
    );
}

/// The headers of a message published now from within `span`: its trace context and
/// [`PUBLISHED_AT`].
pub fn message_headers(span: &Span) -> Headers {
    let mut headers = Headers::new();
    inject_headers(span, &mut headers);
    headers.insert(
        PUBLISHED_AT.to_owned(),
        unix_millis(SystemTime::now()).to_string(),
    );
    headers
}

/// Records in `nightshift_queue_delivery_lag_seconds{queue}` how long a message waited
/// between its publication and now. Messages without a (valid) [`PUBLISHED_AT`] are not
/// counted; clock skew between hosts never makes a lag negative.
pub fn observe_delivery(queue: &'static str, headers: &Headers) {
    if let Some(lag) = delivery_lag(headers, SystemTime::now()) {
        ::metrics::histogram!(metrics::QUEUE_DELIVERY_LAG_SECONDS, metrics::LABEL_QUEUE => queue)
            .record(lag.as_secs_f64());
    }
}

fn delivery_lag(headers: &Headers, now: SystemTime) -> Option<Duration> {
    let published: u64 = headers.get(PUBLISHED_AT)?.trim().parse().ok()?;
    Some(Duration::from_millis(
        unix_millis(now).saturating_sub(published),
    ))
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct HttpExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HttpExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Adds `span`'s trace context to gRPC request metadata.
pub fn inject_metadata(span: &Span, metadata: &mut MetadataMap) {
    TraceContextPropagator::new()
        .inject_context(&context_of(span), &mut MetadataInjector(metadata));
}

/// A tonic client interceptor: every call carries the trace context of the span it is made
/// in (`Client::with_interceptor(channel, TraceContextInterceptor)`).
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextInterceptor;

impl tonic::service::Interceptor for TraceContextInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        inject_metadata(&Span::current(), request.metadata_mut());
        Ok(request)
    }
}

/// A tower layer for gRPC servers: each call runs in a `grpc` span named after its method
/// (`/nightshift.v1.Batches/CreateBatch`) and parented on the caller's trace context, so the
/// handler's spans join the caller's trace. Health checks get no span (probes are no story).
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcServerTraceLayer;

impl<S> tower::Layer<S> for GrpcServerTraceLayer {
    type Service = GrpcServerTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcServerTrace { inner }
    }
}

/// The service of [`GrpcServerTraceLayer`].
#[derive(Debug, Clone)]
pub struct GrpcServerTrace<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for GrpcServerTrace<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let span = if path.starts_with("/grpc.health.") {
            Span::none()
        } else {
            let span = tracing::info_span!(
                "grpc",
                otel.name = %path,
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.method = %path,
            );
            adopt(
                &span,
                TraceContextPropagator::new().extract(&HttpExtractor(request.headers())),
            );
            span
        };
        let future = span.in_scope(|| self.inner.call(request));
        future.instrument(span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_lag_is_measured_from_published_at() {
        let now = UNIX_EPOCH + Duration::from_millis(10_000);
        let mut headers = Headers::new();
        assert_eq!(delivery_lag(&headers, now), None);
        headers.insert(PUBLISHED_AT.into(), "9750".into());
        assert_eq!(
            delivery_lag(&headers, now),
            Some(Duration::from_millis(250))
        );
        // a publisher whose clock runs ahead: no negative lag
        headers.insert(PUBLISHED_AT.into(), "10500".into());
        assert_eq!(delivery_lag(&headers, now), Some(Duration::ZERO));
        headers.insert(PUBLISHED_AT.into(), "soon".into());
        assert_eq!(delivery_lag(&headers, now), None);
    }

    #[test]
    fn without_a_trace_pipeline_nothing_is_injected() {
        tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::new(), || {
            let span = tracing::info_span!("x");
            let headers = message_headers(&span);
            assert!(!headers.contains_key(TRACEPARENT), "{headers:?}");
            assert!(headers.contains_key(PUBLISHED_AT));
            assert_eq!(traceparent(&span), None);
            set_parent(&span, Some("garbage"));
            set_parent_from_headers(&span, &headers);
        });
    }

    /// A subscriber with the trace layer (no exporter), for this thread only.
    fn traced<R>(f: impl FnOnce() -> R) -> R {
        use tracing_subscriber::layer::SubscriberExt;
        let (_guard, layer) = crate::otel::install(&crate::OtelSettings {
            service_name: "test".into(),
            otlp_endpoint: None,
        });
        let subscriber = tracing_subscriber::registry().with(vec![layer]);
        tracing::subscriber::with_default(subscriber, f)
    }

    fn trace_id(traceparent: &str) -> &str {
        traceparent.split('-').nth(1).unwrap_or_default()
    }

    #[test]
    fn contexts_travel_through_headers_metadata_and_traceparents() {
        traced(|| {
            let root = tracing::info_span!(target: "nightshift_test", "root");
            let root_tp = traceparent(&root).expect("the root has a context");
            assert_eq!(root_tp.len(), 55, "{root_tp}");

            // a message: the consumer's span joins the trace, as a child of the publisher's
            let headers = message_headers(&root);
            assert_eq!(headers.get(TRACEPARENT), Some(&root_tp));
            let consumer = tracing::info_span!(target: "nightshift_test", "consume");
            set_parent_from_headers(&consumer, &headers);
            let consumer_tp = traceparent(&consumer).expect("context");
            assert_eq!(trace_id(&consumer_tp), trace_id(&root_tp));
            assert_ne!(consumer_tp, root_tp);

            // a remembered traceparent
            let later = tracing::info_span!(target: "nightshift_test", "later");
            set_parent(&later, Some(&root_tp));
            assert_eq!(
                trace_id(&traceparent(&later).expect("context")),
                trace_id(&root_tp)
            );

            // gRPC metadata, through the interceptor, from the span the call is made in
            let mut request = tonic::Request::new(());
            {
                let _entered = root.enter();
                request = tonic::service::Interceptor::call(&mut TraceContextInterceptor, request)
                    .expect("intercepted");
            }
            let sent = request.metadata().get(TRACEPARENT).expect("metadata");
            assert_eq!(sent.to_str().ok(), Some(root_tp.as_str()));

            // a span of another crate is not traced: no context of its own
            let unrelated = tracing::info_span!(target: "hyper", "conn");
            assert_eq!(traceparent(&unrelated), None);
        });
    }
}
