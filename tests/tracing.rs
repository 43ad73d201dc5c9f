//! End-to-end: one batch is one trace. An in-test OTLP/HTTP receiver collects the spans of
//! the whole in-process stack — gateway, scheduler, executor, finalizer — while a batch with
//! a retried request runs; the batch's spans must form one connected tree.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use nightshift_e2e::{Stack, StackOptions, eventually};
use nightshift_telemetry::{LogFormat, OtelSettings, TelemetryConfig};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::{Value as Json, json};
use tokio::sync::Notify;

/// What the receiver collected: every span, and a signal per export.
#[derive(Default)]
struct Collected {
    spans: Mutex<Vec<Span>>,
    arrived: Notify,
}

/// An OTLP/HTTP (protobuf) trace receiver on loopback; returns its base URL.
async fn start_receiver(collected: Arc<Collected>) -> String {
    async fn export(State(c): State<Arc<Collected>>, body: Bytes) -> impl IntoResponse {
        let Ok(request) = ExportTraceServiceRequest::decode(body) else {
            return (StatusCode::BAD_REQUEST, Vec::new()).into_response();
        };
        {
            let mut spans = c.spans.lock().expect("lock");
            for resource in request.resource_spans {
                for scope in resource.scope_spans {
                    spans.extend(scope.spans);
                }
            }
        }
        c.arrived.notify_waiters();
        (
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            ExportTraceServiceResponse::default().encode_to_vec(),
        )
            .into_response()
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let origin = format!("http://{}", listener.local_addr().expect("addr"));
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(export))
        .with_state(collected);
    tokio::spawn(async move { axum::serve(listener, app).await });
    origin
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn attr_str<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    match attr(span, key)? {
        Value::StringValue(s) => Some(s),
        _ => None,
    }
}

fn attr_int(span: &Span, key: &str) -> Option<i64> {
    match attr(span, key)? {
        Value::IntValue(i) => Some(*i),
        Value::StringValue(s) => s.parse().ok(),
        _ => None,
    }
}

/// The service a span comes from: the crate of its `tracing` target.
fn service(span: &Span) -> &str {
    let target = attr_str(span, "target").unwrap_or("");
    target.split("::").next().unwrap_or(target)
}

/// The spans of the trace that the batch's creating request started, once that trace is
/// complete (every required span there, every parent collected); else what is missing.
fn batch_trace(spans: &[Span], batch_id: &str) -> Result<Vec<Span>, String> {
    let root = spans
        .iter()
        .find(|s| service(s) == "nightshift_gateway" && attr_str(s, "batch_id") == Some(batch_id))
        .ok_or("no gateway span for the batch yet")?;
    let trace: Vec<Span> = spans
        .iter()
        .filter(|s| s.trace_id == root.trace_id)
        .cloned()
        .collect();
    let ids: HashSet<&[u8]> = trace.iter().map(|s| s.span_id.as_slice()).collect();
    let orphans: Vec<&str> = trace
        .iter()
        .filter(|s| !s.parent_span_id.is_empty() && !ids.contains(s.parent_span_id.as_slice()))
        .map(|s| s.name.as_str())
        .collect();
    if !orphans.is_empty() {
        return Err(format!(
            "spans whose parent is not collected yet: {orphans:?}"
        ));
    }
    let have: HashSet<(&str, &str)> = trace
        .iter()
        .map(|s| (service(s), s.name.as_str()))
        .collect();
    for needed in [
        ("nightshift_gateway", "POST /v1/batches"),
        ("nightshift_scheduler", "create_batch"),
        ("nightshift_scheduler", "validate"),
        ("nightshift_scheduler", "dispatch_chunk"),
        ("nightshift_scheduler", "chunk_result"),
        ("nightshift_scheduler", "request_finalize"),
        ("nightshift_scheduler", "commit_batch"),
        ("nightshift_executor", "chunk"),
        ("nightshift_executor", "upstream_request"),
        ("nightshift_finalizer", "finalize"),
    ] {
        if !have.contains(&needed) {
            return Err(format!("no {needed:?} span yet; have {have:?}"));
        }
    }
    Ok(trace)
}

/// Sends `request`; its JSON body, which must come with a 2xx.
async fn call(request: reqwest::RequestBuilder, what: &str) -> Json {
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = response.status();
    let body: Json = response
        .json()
        .await
        .unwrap_or_else(|e| panic!("{what}: body: {e}"));
    assert!(status.is_success(), "{what}: {status} {body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_is_one_connected_trace_across_every_service() {
    let collected = Arc::new(Collected::default());
    let endpoint = start_receiver(collected.clone()).await;
    // Before the stack: its own init keeps this first setup.
    let telemetry = nightshift_telemetry::init_with(
        &TelemetryConfig {
            log_format: LogFormat::Pretty,
            log_filter: "warn".into(),
        },
        OtelSettings {
            service_name: "nightshift-e2e".into(),
            otlp_endpoint: Some(endpoint),
        },
    );
    assert!(
        telemetry.is_exporting(),
        "traces are exported to the receiver"
    );

    let stack = Stack::start(StackOptions::default()).await.expect("stack");
    let (_, key) = stack.tenant("tracing").await.expect("tenant");
    let client = reqwest::Client::new();
    let api = format!("{}/v1", stack.origin);

    // Three requests, one of which the simulator fails once (503) before answering.
    let lines: Vec<Json> = [
        ("a", Json::Null),
        ("flaky", json!({"fail_times": 1, "status": 503})),
        ("c", Json::Null),
    ]
    .into_iter()
    .map(|(id, sim)| {
        let mut body = json!({
            "model": "sim-chat",
            "messages": [{"role": "user", "content": format!("say {id}")}],
            "max_tokens": 8,
        });
        if !sim.is_null() {
            body["sim"] = sim;
        }
        json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": body})
    })
    .collect();
    let jsonl: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let boundary = "nightshift-tracing-boundary";
    let form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"input.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{jsonl}\r\n--{boundary}--\r\n"
    );
    let file = call(
        client
            .post(format!("{api}/files"))
            .bearer_auth(&key)
            .header(
                header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(form),
        "upload",
    )
    .await;
    let batch = call(
        client
            .post(format!("{api}/batches"))
            .bearer_auth(&key)
            .json(&json!({
                "input_file_id": file["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            })),
        "create batch",
    )
    .await;
    let batch_id = batch["id"].as_str().expect("batch id").to_owned();

    // Bounded polling until the batch completes.
    eventually("the batch completes", Duration::from_secs(120), || async {
        let now = call(
            client
                .get(format!("{api}/batches/{batch_id}"))
                .bearer_auth(&key),
            "retrieve batch",
        )
        .await;
        match now["status"].as_str() {
            Some("completed") => {
                assert_eq!(now["request_counts"]["completed"], 3, "{now}");
                Ok(())
            }
            Some("validating" | "in_progress" | "finalizing") => Err(now),
            other => panic!("unexpected status {other:?}: {now}"),
        }
    })
    .await
    .expect("batch not completed in time");

    // Flush until the trace is complete: the finalizer's span ends a moment after the commit
    // the poll saw. Each round exports what has ended and waits for the receiver.
    let trace = eventually(
        "the batch's whole trace",
        Duration::from_secs(60),
        || async {
            let arrived = collected.arrived.notified();
            let flushing = telemetry.clone();
            tokio::task::spawn_blocking(move || flushing.flush())
                .await
                .expect("flush");
            let spans = collected.spans.lock().expect("lock").clone();
            let missing = match batch_trace(&spans, &batch_id) {
                Ok(trace) => return Ok(trace),
                Err(missing) => missing,
            };
            // Before flushing again, give the receiver a moment to take what was exported.
            let _ = tokio::time::timeout(Duration::from_secs(1), arrived).await;
            Err(missing)
        },
    )
    .await
    .expect("the batch's trace is incomplete");

    // One trace: every span of the batch, wherever it ran, carries the same trace id...
    let all = collected.spans.lock().expect("lock").clone();
    let trace_id = &trace[0].trace_id;
    for span in all
        .iter()
        .filter(|s| attr_str(s, "batch_id") == Some(batch_id.as_str()))
    {
        assert_eq!(
            &span.trace_id,
            trace_id,
            "{} ({}) is in another trace",
            span.name,
            service(span)
        );
    }
    // ...and it is a tree with a single root: the gateway's request.
    let roots: Vec<&Span> = trace
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(
        roots.len(),
        1,
        "roots: {:?}",
        roots.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    assert_eq!(roots[0].name, "POST /v1/batches");
    assert_eq!(service(roots[0]), "nightshift_gateway");
    let services: HashSet<&str> = trace.iter().map(service).collect();
    for needed in [
        "nightshift_gateway",
        "nightshift_scheduler",
        "nightshift_executor",
        "nightshift_finalizer",
    ] {
        assert!(
            services.contains(needed),
            "no span from {needed}: {services:?}"
        );
    }

    // Upstream requests: one span each, with model, status and retries.
    let upstream: Vec<&Span> = trace
        .iter()
        .filter(|s| s.name == "upstream_request")
        .collect();
    assert_eq!(upstream.len(), 3, "one span per request");
    for span in &upstream {
        assert_eq!(attr_str(span, "model"), Some("sim-chat"));
        assert_eq!(attr_str(span, "upstream"), Some("sim"));
        assert_eq!(attr_int(span, "http.response.status_code"), Some(200));
        assert_eq!(attr_str(span, "outcome"), Some("response"));
    }
    let retries: HashMap<i64, usize> = upstream.iter().fold(HashMap::new(), |mut m, s| {
        *m.entry(attr_int(s, "retries").expect("retries"))
            .or_default() += 1;
        m
    });
    assert_eq!(
        retries,
        HashMap::from([(0, 2), (1, 1)]),
        "the flaky line retried once"
    );
    let flaky = upstream
        .iter()
        .find(|s| attr_int(s, "retries") == Some(1))
        .expect("the retried request");
    assert_eq!(attr_int(flaky, "attempts"), Some(2));

    // Every consumer measured how long its messages waited.
    let metrics = reqwest::get(format!("{}/metrics", stack.ops_origin))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    for queue in ["chunk-tasks", "chunk-results", "finalize-jobs"] {
        let label = format!(r#"queue="{queue}""#);
        let delivered = series(
            &metrics,
            "nightshift_queue_delivery_lag_seconds_count",
            &[&label],
        );
        assert!(delivered >= Some(1.0), "{queue}: {delivered:?}");
        let bucketed = series(
            &metrics,
            "nightshift_queue_delivery_lag_seconds_bucket",
            &[&label, r#"le="+Inf""#],
        );
        assert_eq!(bucketed, delivered, "{queue} has buckets");
    }

    stack.stop().await.expect("stop");
    tokio::task::spawn_blocking(move || drop(telemetry))
        .await
        .expect("final flush");
}

/// The value of the series `name` whose labels include every `label="value"` of `labels`.
fn series(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name && labels.iter().all(|label| rest.contains(label))
        })
        .and_then(|(_, value)| value.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_families_are_exported_from_the_start() {
    let stack = Stack::start(StackOptions::default()).await.expect("stack");
    // Every service of the in-process stack records into the one process-wide registry.
    let url = format!("{}/metrics", stack.ops_origin);
    let metrics = eventually("the queue gauges", Duration::from_secs(30), || async {
        let text = reqwest::get(&url)
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body");
        // the first sample of the scheduler's gauges is taken as it starts; this is its last
        if series(
            &text,
            "nightshift_queue_dead_lettered_messages",
            &[r#"queue="finalize-jobs""#],
        )
        .is_some()
        {
            return Ok(text);
        }
        Err(format!("\n{text}"))
    })
    .await
    .expect("no queue gauges");
    for status in ["validating", "in_progress", "finalizing", "cancelling"] {
        let label = format!(r#"status="{status}""#);
        assert_eq!(
            series(&metrics, "nightshift_scheduler_batches", &[&label]),
            Some(0.0)
        );
        assert_eq!(
            series(
                &metrics,
                "nightshift_scheduler_batch_oldest_age_seconds",
                &[&label]
            ),
            Some(0.0)
        );
    }
    for queue in ["chunk-tasks", "chunk-results", "finalize-jobs"] {
        let label = format!(r#"queue="{queue}""#);
        for name in [
            "nightshift_queue_ready_messages",
            "nightshift_queue_dead_lettered_messages",
        ] {
            assert_eq!(
                series(&metrics, name, &[&label]),
                Some(0.0),
                "{name}{{{label}}}"
            );
        }
    }
    // counters of errors, retries and dead letters read 0 before anything happened
    for (name, labels) in [
        (
            "nightshift_executor_upstream_retries_total",
            &[r#"upstream="sim""#, r#"reason="server_error""#][..],
        ),
        (
            "nightshift_executor_upstream_requests_total",
            &[r#"upstream="sim""#, r#"outcome="timeout""#],
        ),
        (
            "nightshift_executor_chunks_total",
            &[r#"outcome="dead_lettered""#],
        ),
        (
            "nightshift_executor_state_errors_total",
            &[r#"operation="record""#],
        ),
        (
            "nightshift_finalizer_finalizations_total",
            &[r#"ending="unknown""#, r#"outcome="dead_lettered""#],
        ),
        (
            "nightshift_scheduler_validation_errors_total",
            &[r#"code="invalid_json_line""#],
        ),
        (
            "nightshift_scheduler_batch_transitions_total",
            &[r#"to="failed""#],
        ),
        (
            "nightshift_gateway_uploads_rejected_total",
            &[r#"reason="too_large""#],
        ),
    ] {
        assert_eq!(
            series(&metrics, name, labels),
            Some(0.0),
            "{name}{labels:?}"
        );
    }
    stack.stop().await.expect("stop");
}
