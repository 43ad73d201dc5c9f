//! `Upstream::call` against real HTTP: the inference simulator in-process on 127.0.0.1:0,
//! failures scripted per request with its `sim` directive. No sleeps and no timing
//! assertions: attempts are counted (by the outcome and by the simulator's stats), server
//! state is awaited through `GET /sim/wait`. Backoffs are configured tiny.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nightshift_core::results::{BatchRequestId, NoResponseCode};
use nightshift_core::routing::{RoutingConfig, UpstreamConfig};
use nightshift_executor::upstream::{CallOutcome, CancelFlag, Upstream, Upstreams};
use nightshift_inference_sim::{SimConfig, SimStats, serve};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

const CHAT: &str = "/v1/chat/completions";

struct Sim {
    url: String,
    client: reqwest::Client,
    /// Dropping it shuts the simulator down.
    _stop: DropGuard,
}

async fn start(config: SimConfig) -> Sim {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(serve(config, listener, stop.clone()));
    Sim {
        url,
        client: reqwest::Client::new(),
        _stop: stop.drop_guard(),
    }
}

impl Sim {
    async fn stats(&self) -> SimStats {
        self.client
            .get(format!("{}/sim/stats", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Long-polls `/sim/wait` and fails the test if the condition is not met.
    async fn wait(&self, query: &str) -> SimStats {
        let response = self
            .client
            .get(format!("{}/sim/wait?{query}&timeout_ms=30000", self.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "wait for {query}");
        response.json().await.unwrap()
    }

    /// An upstream for this simulator with tiny backoffs.
    fn upstream_config(&self) -> UpstreamConfig {
        fast(UpstreamConfig::new(
            "sim",
            format!("{}/v1", self.url),
            ["*"],
        ))
    }
}

fn fast(mut config: UpstreamConfig) -> UpstreamConfig {
    config.backoff_base = Duration::from_millis(1);
    config.backoff_max = Duration::from_millis(5);
    config.max_retry_after = Duration::from_millis(20);
    config
}

fn build(config: UpstreamConfig) -> Arc<Upstream> {
    let upstreams = Upstreams::new(&RoutingConfig {
        upstreams: vec![config],
    })
    .unwrap();
    upstreams.for_model("sim-chat").unwrap()
}

/// A chat request body; `sim` is the simulator directive (or `null`).
fn chat(content: &str, sim: Value) -> Bytes {
    let mut body = json!({
        "model": "sim-chat",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
    });
    if !sim.is_null() {
        body["sim"] = sim;
    }
    Bytes::from(serde_json::to_vec(&body).unwrap())
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(120)
}

/// Unpacks a `Response`, parsing its body as JSON.
fn response(outcome: &CallOutcome) -> (u16, &str, Value, u32) {
    match outcome {
        CallOutcome::Response {
            status,
            request_id,
            body,
            attempts,
            ..
        } => (
            *status,
            request_id.as_str(),
            serde_json::from_slice(body).unwrap_or(Value::Null),
            *attempts,
        ),
        CallOutcome::NoResponse { .. } => panic!("expected a response, got {outcome:?}"),
    }
}

fn no_response(outcome: &CallOutcome) -> (NoResponseCode, &str, u32) {
    match outcome {
        CallOutcome::NoResponse {
            code,
            message,
            attempts,
        } => (*code, message.as_str(), *attempts),
        CallOutcome::Response { .. } => panic!("expected no response, got {outcome:?}"),
    }
}

#[tokio::test]
async fn success_returns_the_body_and_the_request_id() {
    let sim = start(SimConfig::default()).await;
    let upstream = build(sim.upstream_config());
    let outcome = upstream
        .call(
            "m",
            CHAT,
            chat("hello", Value::Null),
            far(),
            &CancelFlag::new(),
        )
        .await;
    let (status, request_id, body, attempts) = response(&outcome);
    assert_eq!((status, attempts), (200, 1));
    assert!(!request_id.is_empty() && !request_id.starts_with("nightshift-"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(upstream.in_flight(), 0);

    let id = BatchRequestId::for_line("batch_t", 1);
    let line = outcome.into_result_line(id.clone(), "c-1");
    assert!(line.is_success());
    assert!(line.usage().total_tokens > 0);
    let value: Value = serde_json::from_slice(&line.to_json_line()).unwrap();
    assert_eq!(value["id"], id.as_str());
    assert_eq!(value["custom_id"], "c-1");
    assert_eq!(value["response"]["status_code"], 200);
    assert_eq!(value["response"]["body"], body);
    assert_eq!(value["error"], Value::Null);
    assert_eq!(sim.stats().await.requests.chat_completions, 1);
}

#[tokio::test]
async fn a_client_error_is_not_retried() {
    let sim = start(SimConfig::default()).await;
    let upstream = build(sim.upstream_config());
    let outcome = upstream
        .call(
            "m",
            CHAT,
            chat("bad", json!({"status": 400})),
            far(),
            &CancelFlag::new(),
        )
        .await;
    let (status, _, body, attempts) = response(&outcome);
    assert_eq!((status, attempts), (400, 1));
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(sim.stats().await.requests.total, 1);

    let line = outcome.into_result_line(BatchRequestId::for_line("batch_t", 2), "c-2");
    assert!(!line.is_success());
    let value: Value = serde_json::from_slice(&line.to_json_line()).unwrap();
    assert_eq!(value["response"]["status_code"], 400);
    assert_eq!(
        value["response"]["body"]["error"]["type"],
        "invalid_request_error"
    );
}

#[tokio::test]
async fn server_errors_are_retried_until_success() {
    let sim = start(SimConfig::default()).await;
    let upstream = build(sim.upstream_config());
    let directive = json!({"fail_times": 2, "status": 503, "retry_after": 0.005});
    let outcome = upstream
        .call(
            "m",
            CHAT,
            chat("flaky", directive),
            far(),
            &CancelFlag::new(),
        )
        .await;
    let (status, _, body, attempts) = response(&outcome);
    assert_eq!((status, attempts), (200, 3));
    assert_eq!(body["object"], "chat.completion");
    let stats = sim.stats().await;
    assert_eq!(stats.requests.total, 3);
    assert_eq!(stats.responses.get(&503), Some(&2));
}

#[tokio::test]
async fn a_persistent_server_error_returns_the_last_answer_after_max_attempts() {
    let sim = start(SimConfig::default()).await;
    let mut config = sim.upstream_config();
    config.max_attempts = 4;
    let upstream = build(config);
    let outcome = upstream
        .call(
            "m",
            CHAT,
            chat("down", json!({"status": 503})),
            far(),
            &CancelFlag::new(),
        )
        .await;
    let (status, _, body, attempts) = response(&outcome);
    assert_eq!((status, attempts), (503, 4));
    assert_eq!(body["error"]["type"], "server_error");
    assert_eq!(sim.stats().await.requests.total, 4);
    let line = outcome.into_result_line(BatchRequestId::for_line("batch_t", 3), "c-3");
    assert!(!line.is_success());
}

#[tokio::test]
async fn rate_limits_with_retry_after_are_retried() {
    let sim = start(SimConfig::default()).await;
    let upstream = build(sim.upstream_config());
    let directive = json!({"fail_times": 2, "status": 429, "retry_after": 0.01});
    let outcome = upstream
        .call(
            "m",
            CHAT,
            chat("busy", directive),
            far(),
            &CancelFlag::new(),
        )
        .await;
    let (status, _, _, attempts) = response(&outcome);
    assert_eq!((status, attempts), (200, 3));
    assert_eq!(sim.stats().await.responses.get(&429), Some(&2));
    // Each 429 answered an attempt sent after the previous decrease, and a 429 steps back a
    // tenth (at least one): 8 → 7 → 6.
    assert_eq!(upstream.limit(), 6);
}

#[tokio::test]
async fn a_huge_retry_after_is_capped_by_max_retry_after() {
    let sim = start(SimConfig::default()).await;
    let upstream = build(sim.upstream_config()); // max_retry_after: 20 ms
    let directive = json!({"fail_times": 1, "status": 429, "retry_after": 3600});
    let outcome = upstream
        .call(
            "m",
            CHAT,
            chat("an hour", directive),
            far(),
            &CancelFlag::new(),
        )
        .await;
    assert_eq!(response(&outcome).3, 2, "retried after the capped wait");
}

#[tokio::test]
async fn a_retry_after_beyond_the_deadline_ends_the_call_with_that_answer() {
    let sim = start(SimConfig::default()).await;
    let mut config = sim.upstream_config();
    config.max_retry_after = Duration::from_secs(7200);
    let upstream = build(config);
    let directive = json!({"fail_times": 1, "status": 429, "retry_after": 3600});
    let deadline = Instant::now() + Duration::from_secs(600);
    let outcome = upstream
        .call(
            "m",
            CHAT,
            chat("later", directive),
            deadline,
            &CancelFlag::new(),
        )
        .await;
    let (status, _, _, attempts) = response(&outcome);
    assert_eq!((status, attempts), (429, 1), "no sleep past the deadline");
    assert_eq!(sim.stats().await.requests.total, 1);
}

#[tokio::test]
async fn a_timed_out_attempt_is_retried() {
    let sim = start(SimConfig::default()).await;
    let mut config = sim.upstream_config();
    config.timeout = Duration::from_millis(300);
    let upstream = build(config);
    let directive = json!({"fail_times": 1, "kind": "timeout"});
    let outcome = upstream
        .call(
            "m",
            CHAT,
            chat("slow once", directive),
            far(),
            &CancelFlag::new(),
        )
        .await;
    let (status, _, _, attempts) = response(&outcome);
    assert_eq!((status, attempts), (200, 2));
    assert_eq!(sim.stats().await.failures.timeout, 1);
    assert_eq!(
        upstream.limit(),
        4,
        "a full-length timeout is a congestion signal"
    );
}

#[tokio::test]
async fn a_dropped_connection_is_retried() {
    let sim = start(SimConfig::default()).await;
    let upstream = build(sim.upstream_config());
    let directive = json!({"fail_times": 2, "kind": "drop"});
    let outcome = upstream
        .call(
            "m",
            CHAT,
            chat("dropped", directive),
            far(),
            &CancelFlag::new(),
        )
        .await;
    let (status, _, _, attempts) = response(&outcome);
    assert_eq!((status, attempts), (200, 3));
    assert_eq!(sim.stats().await.failures.drop, 2);
    assert_eq!(
        upstream.limit(),
        8,
        "connection errors are not congestion signals"
    );
}

#[tokio::test]
async fn a_malformed_success_is_retried() {
    let sim = start(SimConfig::default()).await;
    let upstream = build(sim.upstream_config());
    let directive = json!({"fail_times": 1, "kind": "malformed"});
    let outcome = upstream
        .call(
            "m",
            CHAT,
            chat("truncated", directive),
            far(),
            &CancelFlag::new(),
        )
        .await;
    let (status, _, body, attempts) = response(&outcome);
    assert_eq!((status, attempts), (200, 2));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(sim.stats().await.failures.malformed, 1);
}

#[tokio::test]
async fn a_persistently_malformed_success_becomes_an_error_line() {
    let sim = start(SimConfig::default()).await;
    let mut config = sim.upstream_config();
    config.max_attempts = 2;
    let upstream = build(config);
    let directive = json!({"kind": "malformed"});
    let outcome = upstream
        .call(
            "m",
            CHAT,
            chat("always truncated", directive),
            far(),
            &CancelFlag::new(),
        )
        .await;
    let (status, _, body, attempts) = response(&outcome);
    assert_eq!((status, attempts), (200, 2));
    assert_eq!(body, Value::Null, "the body is not JSON");
    let line = outcome.into_result_line(BatchRequestId::for_line("batch_t", 4), "c-4");
    assert!(!line.is_success());
    let value: Value = serde_json::from_slice(&line.to_json_line()).unwrap();
    assert_eq!(value["response"]["status_code"], 502);
    assert_eq!(value["response"]["body"]["error"]["type"], "upstream_error");
}

#[tokio::test]
async fn a_past_deadline_expires_the_request_without_sending_it() {
    let sim = start(SimConfig::default()).await;
    let upstream = build(sim.upstream_config());
    let outcome = upstream
        .call(
            "m",
            CHAT,
            chat("late", Value::Null),
            Instant::now(),
            &CancelFlag::new(),
        )
        .await;
    let (code, message, attempts) = no_response(&outcome);
    assert_eq!((code, attempts), (NoResponseCode::BatchExpired, 0));
    assert_eq!(message, NoResponseCode::BatchExpired.default_message());
    assert_eq!(sim.stats().await.requests.total, 0);
}

#[tokio::test]
async fn a_request_cut_by_the_deadline_is_batch_expired() {
    let sim = start(SimConfig::default()).await;
    let upstream = build(sim.upstream_config()); // attempt timeout: 10 minutes
    let deadline = Instant::now() + Duration::from_millis(300);
    let directive = json!({"kind": "timeout"});
    let outcome = upstream
        .call(
            "m",
            CHAT,
            chat("hang", directive),
            deadline,
            &CancelFlag::new(),
        )
        .await;
    let (code, _, attempts) = no_response(&outcome);
    // the upstream was not slow: the batch's time ran out while the request was in flight
    assert_eq!((code, attempts), (NoResponseCode::BatchExpired, 1));
    assert_eq!(
        upstream.limit(),
        8,
        "an attempt cut by the deadline is not a congestion signal"
    );
}

#[tokio::test]
async fn a_slow_upstream_is_request_timeout() {
    let sim = start(SimConfig::default()).await;
    let mut config = sim.upstream_config();
    config.timeout = Duration::from_millis(100);
    config.max_attempts = 2;
    let upstream = build(config);
    let deadline = Instant::now() + Duration::from_secs(600);
    let outcome = upstream
        .call(
            "m",
            CHAT,
            chat("slow", json!({"kind": "timeout"})),
            deadline,
            &CancelFlag::new(),
        )
        .await;
    let (code, message, attempts) = no_response(&outcome);
    assert_eq!((code, attempts), (NoResponseCode::RequestTimeout, 2));
    assert!(message.contains("2 attempts"), "{message}");
}

#[tokio::test]
async fn an_unreachable_upstream_is_retried_then_reported() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let mut config = fast(UpstreamConfig::new(
        "dead",
        format!("http://{addr}/v1"),
        ["*"],
    ));
    config.max_attempts = 3;
    let upstream = build(config);
    let outcome = upstream
        .call(
            "m",
            CHAT,
            chat("anyone?", Value::Null),
            far(),
            &CancelFlag::new(),
        )
        .await;
    let (code, message, attempts) = no_response(&outcome);
    assert_eq!((code, attempts), (NoResponseCode::UpstreamUnreachable, 3));
    assert!(message.contains("3 attempts"), "{message}");
    assert!(!message.contains(&addr.to_string()), "no URL in: {message}");
    assert_eq!(upstream.in_flight(), 0);
}

#[tokio::test]
async fn a_cancelled_batch_sends_nothing() {
    let sim = start(SimConfig::default()).await;
    let upstream = build(sim.upstream_config());
    let cancel = CancelFlag::new();
    cancel.cancel();
    let outcome = upstream
        .call("m", CHAT, chat("never", Value::Null), far(), &cancel)
        .await;
    assert_eq!(
        no_response(&outcome),
        (
            NoResponseCode::BatchCancelled,
            NoResponseCode::BatchCancelled.default_message(),
            0
        )
    );
    assert_eq!(sim.stats().await.requests.total, 0);
}

#[tokio::test]
async fn a_cancel_during_backoff_returns_the_last_answer() {
    let sim = start(SimConfig::default()).await;
    let mut config = sim.upstream_config();
    config.max_retry_after = Duration::from_secs(7200);
    let upstream = build(config);
    let cancel = CancelFlag::new();
    let call = tokio::spawn({
        let upstream = Arc::clone(&upstream);
        let cancel = cancel.clone();
        let deadline = Instant::now() + Duration::from_secs(3 * 3600);
        async move {
            // Asks for an hour's wait after the first 503.
            let directive = json!({"status": 503, "retry_after": 3600});
            upstream
                .call("m", CHAT, chat("wait", directive), deadline, &cancel)
                .await
        }
    });
    sim.wait("requests=1").await;
    cancel.cancel();
    let outcome = call.await.unwrap();
    let (status, _, _, attempts) = response(&outcome);
    assert_eq!((status, attempts), (503, 1));
    assert_eq!(sim.stats().await.requests.total, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_in_flight_than_max_concurrency() {
    let sim = start(SimConfig {
        base_latency_ms: 20,
        ..SimConfig::default()
    })
    .await;
    let mut config = sim.upstream_config();
    config.max_concurrency = 4;
    let upstream = build(config);
    assert_eq!(upstream.limit(), 4);
    let calls: Vec<_> = (0..100)
        .map(|i| {
            let upstream = Arc::clone(&upstream);
            tokio::spawn(async move {
                upstream
                    .call(
                        "m",
                        CHAT,
                        chat(&format!("n{i}"), Value::Null),
                        far(),
                        &CancelFlag::new(),
                    )
                    .await
            })
        })
        .collect();
    for call in calls {
        let outcome = call.await.unwrap();
        assert_eq!(response(&outcome).0, 200);
    }
    let stats = sim.stats().await;
    assert_eq!(stats.requests.total, 100);
    assert!(
        (1..=4).contains(&stats.max_in_flight),
        "max in flight {}",
        stats.max_in_flight
    );
    assert_eq!(upstream.in_flight(), 0);
    assert_eq!(upstream.limit(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_adapts_to_a_small_upstream_and_every_call_succeeds() {
    let sim = start(SimConfig {
        max_concurrency: 3,
        base_latency_ms: 100,
        retry_after_secs: 0.01,
        ..SimConfig::default()
    })
    .await;
    let mut config = sim.upstream_config();
    config.max_concurrency = 16;
    config.initial_concurrency = Some(16);
    config.max_attempts = 100;
    let upstream = build(config);
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let upstream = Arc::clone(&upstream);
            tokio::spawn(async move {
                upstream
                    .call(
                        "m",
                        CHAT,
                        chat(&format!("a{i}"), Value::Null),
                        far(),
                        &CancelFlag::new(),
                    )
                    .await
            })
        })
        .collect();
    for call in calls {
        let outcome = call.await.unwrap();
        assert_eq!(response(&outcome).0, 200, "{outcome:?}");
    }
    let stats = sim.stats().await;
    assert!(
        stats.failures.capacity_429 > 0,
        "the burst overloaded the sim"
    );
    assert!(stats.max_in_flight <= 16, "{}", stats.max_in_flight);
    // The first 429 halves 16 to at most 8; growing back to 16 would take 8 + 9 + ... + 15
    // = 92 full-window successes, more than the 50 requests there are.
    assert!(upstream.limit() < 16, "limit {}", upstream.limit());
    assert_eq!(upstream.in_flight(), 0);
}

/// What a one-shot raw HTTP server saw of one request.
struct Seen {
    head: String,
    body: Vec<u8>,
}

/// Accepts one connection, records the request, answers 200 `{}` without an
/// `x-request-id`. A raw server because the simulator does not expose request headers.
async fn one_shot_server() -> (String, oneshot::Receiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buffer = Vec::new();
        let head_end = loop {
            let mut chunk = [0u8; 4096];
            let n = socket.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed before the request head ended");
            buffer.extend_from_slice(&chunk[..n]);
            if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8(buffer[..head_end].to_vec()).unwrap();
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().unwrap())
            })
            .unwrap();
        while buffer.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            let n = socket.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed before the body ended");
            buffer.extend_from_slice(&chunk[..n]);
        }
        let body = buffer[head_end..head_end + length].to_vec();
        socket
            .write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            )
            .await
            .unwrap();
        _ = tx.send(Seen { head, body });
    });
    (url, rx)
}

#[tokio::test]
async fn the_body_goes_verbatim_with_the_configured_key() {
    let (url, seen) = one_shot_server().await;
    // No `/v1` in the base URL: the standard root is assumed.
    let mut config = fast(UpstreamConfig::new("keyed", url, ["*"]));
    config.api_key_env = Some("KEYED_API_KEY".into());
    let upstreams = Upstreams::with_env(
        &RoutingConfig {
            upstreams: vec![config],
        },
        |var| (var == "KEYED_API_KEY").then(|| "sk-test-123".to_owned()),
    )
    .unwrap();
    let upstream = upstreams.for_model("m").unwrap();
    let body = Bytes::from_static(b"{\"z\": 1,  \"model\": \"m\",\n\"a\": [ ]}");
    let outcome = upstream
        .call("m", CHAT, body.clone(), far(), &CancelFlag::new())
        .await;
    let (status, request_id, value, attempts) = response(&outcome);
    assert_eq!((status, attempts), (200, 1));
    assert_eq!(value, json!({}));
    assert!(request_id.starts_with("nightshift-"), "{request_id}");

    let seen = seen.await.unwrap();
    let head = seen.head.to_ascii_lowercase();
    assert!(
        head.starts_with("post /v1/chat/completions http/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.contains("\r\nauthorization: bearer sk-test-123\r\n"),
        "{head}"
    );
    assert!(
        head.contains("\r\ncontent-type: application/json\r\n"),
        "{head}"
    );
    assert_eq!(seen.body, body.as_ref());
}

#[tokio::test]
async fn no_key_configured_sends_no_authorization() {
    let (url, seen) = one_shot_server().await;
    let upstream = build(fast(UpstreamConfig::new(
        "open",
        format!("{url}/v1/"),
        ["*"],
    )));
    let outcome = upstream
        .call(
            "m",
            "/v1/embeddings",
            Bytes::from_static(b"{}"),
            far(),
            &CancelFlag::new(),
        )
        .await;
    assert_eq!(response(&outcome).0, 200);
    let head = seen.await.unwrap().head.to_ascii_lowercase();
    assert!(
        head.starts_with("post /v1/embeddings http/1.1\r\n"),
        "{head}"
    );
    assert!(!head.contains("authorization"), "{head}");
}

/// 100 MB: over any cap below.
const HUGE: u64 = 100 * 1024 * 1024;
/// The cap the size tests set: 1 MiB.
const CAP: usize = 1 << 20;

/// Polls the simulator's stats until no streamed body is being sent any more.
async fn streams_done(sim: &Sim) -> SimStats {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = sim.stats().await;
        if stats.streaming_bodies == 0 {
            return stats;
        }
        assert!(Instant::now() < deadline, "still streaming: {stats:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// An answer over `max_response_bytes` is `response_too_large` at once, without a retry,
/// whether its size is declared up front or only found while reading it; and the huge body is
/// not read whole (the simulator counts what it could hand to the connection).
#[tokio::test]
async fn an_answer_over_max_response_bytes_is_response_too_large_and_not_read_whole() {
    let sim = start(SimConfig::default()).await;
    let mut config = sim.upstream_config();
    config.max_response_bytes = CAP;
    config.max_attempts = 5;
    let upstream = build(config);
    for (round, chunked) in [false, true].into_iter().enumerate() {
        let directive = json!({"response_bytes": HUGE, "chunked": chunked});
        let outcome = upstream
            .call(
                "m",
                CHAT,
                chat(&format!("huge {chunked}"), directive),
                far(),
                &CancelFlag::new(),
            )
            .await;
        let (code, message, attempts) = no_response(&outcome);
        assert_eq!(
            (code, attempts),
            (NoResponseCode::ResponseTooLarge, 1),
            "{outcome:?}"
        );
        assert!(
            message.contains("HTTP 200") && message.contains("1048576 bytes (1 MiB)"),
            "{message}"
        );
        let stats = streams_done(&sim).await;
        assert_eq!(stats.requests.total, round as u64 + 1, "never retried");
        assert!(
            stats.streamed_body_bytes < (round as u64 + 1) * HUGE / 4,
            "{} bytes of huge answers were sent: read whole?",
            stats.streamed_body_bytes
        );
        let line = outcome.into_result_line(BatchRequestId::for_line("batch_t", 9), "big");
        let value: Value = serde_json::from_slice(&line.to_json_line()).unwrap();
        assert_eq!(value["error"]["code"], "response_too_large");
        assert_eq!(value["response"], Value::Null);
    }
    assert_eq!(upstream.in_flight(), 0);
}

#[tokio::test]
async fn an_answer_within_max_response_bytes_is_read_whole() {
    let sim = start(SimConfig::default()).await;
    let mut config = sim.upstream_config();
    config.max_response_bytes = CAP;
    let upstream = build(config);
    for (chunked, size) in [(true, CAP as u64), (false, CAP as u64), (true, 70_000)] {
        let directive = json!({"response_bytes": size, "chunked": chunked});
        let outcome = upstream
            .call(
                "m",
                CHAT,
                chat("fits", directive),
                far(),
                &CancelFlag::new(),
            )
            .await;
        let CallOutcome::Response { status, body, .. } = &outcome else {
            panic!("expected an answer, got {outcome:?}");
        };
        assert_eq!((*status, body.len() as u64), (200, size));
        let line = outcome.into_result_line(BatchRequestId::for_line("batch_t", 1), "fits");
        assert!(line.is_success());
    }
}

/// A call that cannot start before its start limit sends nothing and says so; one whose batch
/// is cancelled or expired still gets its line.
#[tokio::test]
async fn a_call_not_started_by_its_start_limit_sends_nothing() {
    let sim = start(SimConfig::default()).await;
    let mut config = sim.upstream_config();
    config.max_concurrency = 1;
    let upstream = build(config);
    let cancel = CancelFlag::new();
    let passed = Instant::now();
    let not_started = upstream
        .call_started_by("m", CHAT, chat("late", Value::Null), far(), passed, &cancel)
        .await;
    assert_eq!(not_started, None);
    assert_eq!(sim.stats().await.requests.total, 0);

    // Waiting for the only permit when the limit passes: not started either.
    let holder = tokio::spawn({
        let upstream = Arc::clone(&upstream);
        async move {
            let directive = json!({"latency_ms": 60_000});
            upstream
                .call(
                    "m",
                    CHAT,
                    chat("hold", directive),
                    far(),
                    &CancelFlag::new(),
                )
                .await
        }
    });
    sim.wait("in_flight=1").await;
    let start_by = Instant::now() + Duration::from_millis(50);
    let waiting = upstream
        .call_started_by(
            "m",
            CHAT,
            chat("queued", Value::Null),
            far(),
            start_by,
            &cancel,
        )
        .await;
    assert_eq!(waiting, None);
    assert_eq!(sim.stats().await.requests.total, 1);
    holder.abort();
    _ = holder.await;

    // Started in time: a normal call.
    let outcome = upstream
        .call_started_by(
            "m",
            CHAT,
            chat("on time", Value::Null),
            far(),
            Instant::now() + Duration::from_secs(60),
            &cancel,
        )
        .await
        .expect("started");
    assert_eq!(response(&outcome).0, 200);

    // Cancellation and expiry are reported even past the start limit.
    let expired = upstream
        .call_started_by("m", CHAT, chat("x", Value::Null), passed, passed, &cancel)
        .await
        .expect("an outcome");
    assert_eq!(no_response(&expired).0, NoResponseCode::BatchExpired);
    cancel.cancel();
    let cancelled = upstream
        .call_started_by("m", CHAT, chat("x", Value::Null), far(), passed, &cancel)
        .await
        .expect("an outcome");
    assert_eq!(no_response(&cancelled).0, NoResponseCode::BatchCancelled);
    assert_eq!(sim.stats().await.requests.total, 2);
}
