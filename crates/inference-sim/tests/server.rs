//! The simulator over real HTTP: started in-process with `serve` on 127.0.0.1:0, driven with
//! reqwest. No sleeps: server state is awaited through `GET /sim/wait`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use nightshift_inference_sim::{SimConfig, SimStats, serve};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct Sim {
    url: String,
    client: reqwest::Client,
    stop: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start(config: SimConfig) -> Sim {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(config, listener, stop.clone()));
    Sim {
        url,
        client: reqwest::Client::new(),
        stop,
        task,
    }
}

impl Sim {
    fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.try_post(path, body).await.unwrap()
    }

    async fn try_post(&self, path: &str, body: &Value) -> reqwest::Result<reqwest::Response> {
        self.client
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
    }

    async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let response = self.post(path, body).await;
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap()
    }

    async fn stats(&self) -> SimStats {
        self.get("/sim/stats").await.json().await.unwrap()
    }

    /// Long-polls `/sim/wait` and fails the test if the condition is not met.
    async fn wait(&self, query: &str) -> SimStats {
        let response = self
            .get(&format!("/sim/wait?{query}&timeout_ms=30000"))
            .await;
        assert_eq!(response.status(), StatusCode::OK, "wait for {query}");
        response.json().await.unwrap()
    }

    async fn shutdown(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn chat(content: &str) -> Value {
    json!({"model": "sim-chat", "messages": [{"role": "user", "content": content}]})
}

fn with_sim(mut body: Value, sim: Value) -> Value {
    body["sim"] = sim;
    body
}

fn assert_error(body: &Value, kind: &str) {
    let error = &body["error"];
    assert_eq!(error["type"], kind, "{body}");
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(error.get("param").is_some());
    assert!(error.get("code").is_some());
}

fn assert_usage(usage: &Value) {
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + completion);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 0);
}

/// True when the error is a transport failure with no HTTP response at all.
fn is_connection_error(error: &reqwest::Error) -> bool {
    error.status().is_none() && !error.is_timeout() && !error.is_decode()
}

#[tokio::test]
async fn chat_completion_shape_usage_and_determinism() {
    let sim = start(SimConfig::default()).await;
    let body = chat("tell me about night shifts");
    let response = sim.post("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "content type"
    );
    let first: Value = response.json().await.unwrap();
    assert!(first["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(first["object"], "chat.completion");
    assert!(first["created"].as_u64().is_some());
    assert_eq!(first["model"], "sim-chat");
    let choice = &first["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["logprobs"].is_null());
    let content = choice["message"]["content"].as_str().unwrap();
    assert!(content.starts_with("sim:"), "{content}");
    let usage = &first["usage"];
    assert_usage(usage);
    assert_eq!(usage["prompt_tokens"], 5);
    assert_eq!(
        usage["completion_tokens"].as_u64().unwrap(),
        content.split_whitespace().count() as u64
    );
    let finish = choice["finish_reason"].as_str().unwrap();
    assert!(finish == "stop" || finish == "length");

    // Same request, same answer; keys reordered and a `sim` directive change nothing.
    let again: Value = serde_json::from_str(
        r#"{"messages":[{"content":"tell me about night shifts","role":"user"}],"model":"sim-chat","sim":{"latency_ms":0}}"#,
    )
    .unwrap();
    let (_, second) = sim.post_json("/v1/chat/completions", &again).await;
    assert_eq!(second["choices"], first["choices"]);
    assert_eq!(second["usage"], first["usage"]);
    assert_ne!(second["id"], first["id"], "ids are unique per response");

    // Different content, different answer.
    let (_, other) = sim
        .post_json("/v1/chat/completions", &chat("something else"))
        .await;
    assert_ne!(other["choices"][0]["message"], choice["message"]);
    sim.shutdown().await;
}

#[tokio::test]
async fn chat_completion_is_capped_by_max_tokens() {
    let sim = start(SimConfig::default()).await;
    let mut body = chat("cap me");
    body["max_tokens"] = json!(1);
    let (status, one) = sim.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["choices"][0]["finish_reason"], "length");
    assert_eq!(one["usage"]["completion_tokens"], 1);
    let content = one["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        content.starts_with("sim:") && content.len() == 12,
        "{content}"
    );

    let mut body = chat("cap me");
    body["max_completion_tokens"] = json!(3);
    body["n"] = json!(2);
    let (_, three) = sim.post_json("/v1/chat/completions", &body).await;
    let choices = three["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        assert_eq!(choice["finish_reason"], "length");
    }
    assert_eq!(three["usage"]["completion_tokens"], 6);
    assert_usage(&three["usage"]);

    // A generous cap leaves the natural length (8..=64 words) alone.
    let mut body = chat("cap me");
    body["max_tokens"] = json!(1000);
    let (_, free) = sim.post_json("/v1/chat/completions", &body).await;
    assert_eq!(free["choices"][0]["finish_reason"], "stop");
    let tokens = free["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((8..=64).contains(&tokens));
    sim.shutdown().await;
}

#[tokio::test]
async fn routes_work_without_v1_prefix() {
    let sim = start(SimConfig::default()).await;
    let body = chat("prefix");
    let (status, with) = sim.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::OK);
    let (status, without) = sim.post_json("/chat/completions", &body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(with["choices"], without["choices"]);
    let prompt = json!({"model": "m", "prompt": "x"});
    assert_eq!(
        sim.post("/completions", &prompt).await.status(),
        StatusCode::OK
    );
    let input = json!({"model": "m", "input": "x"});
    assert_eq!(
        sim.post("/embeddings", &input).await.status(),
        StatusCode::OK
    );
    assert_eq!(sim.get("/models").await.status(), StatusCode::OK);
    sim.shutdown().await;
}

#[tokio::test]
async fn completions_shape_and_prompt_forms() {
    let sim = start(SimConfig::default()).await;
    let body = json!({"model": "sim-instruct", "prompt": "once upon a time", "max_tokens": 16});
    let (status, first) = sim.post_json("/v1/completions", &body).await;
    assert_eq!(status, StatusCode::OK);
    assert!(first["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(first["object"], "text_completion");
    assert_eq!(first["model"], "sim-instruct");
    let choice = &first["choices"][0];
    assert_eq!(choice["index"], 0);
    assert!(choice["text"].as_str().unwrap().starts_with("sim:"));
    assert!(choice["logprobs"].is_null());
    assert!(first["usage"]["completion_tokens"].as_u64().unwrap() <= 16);
    assert_eq!(first["usage"]["prompt_tokens"], 4);
    assert_usage(&first["usage"]);
    let (_, again) = sim.post_json("/v1/completions", &body).await;
    assert_eq!(again["choices"], first["choices"]);

    // An array of prompts gets one choice each; the first matches the single-prompt answer.
    let batch = json!({"model": "sim-instruct", "prompt": ["once upon a time", "the end"], "max_tokens": 16});
    let (_, both) = sim.post_json("/v1/completions", &batch).await;
    let choices = both["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["text"], choice["text"]);
    assert_eq!(choices[1]["index"], 1);
    assert_eq!(both["usage"]["prompt_tokens"], 6);
    assert_usage(&both["usage"]);

    // Token-id prompts count their ids.
    let tokens = json!({"model": "m", "prompt": [1, 2, 3, 4, 5]});
    let (status, by_ids) = sim.post_json("/v1/completions", &tokens).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(by_ids["usage"]["prompt_tokens"], 5);
    sim.shutdown().await;
}

fn norm(vector: &[Value]) -> f64 {
    vector
        .iter()
        .map(|x| x.as_f64().unwrap().powi(2))
        .sum::<f64>()
        .sqrt()
}

#[tokio::test]
async fn embeddings_shape_normalisation_and_determinism() {
    let sim = start(SimConfig {
        embedding_dim: 32,
        ..SimConfig::default()
    })
    .await;
    let body = json!({"model": "sim-embed", "input": ["first text", "second one here"]});
    let (status, first) = sim.post_json("/v1/embeddings", &body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["object"], "list");
    assert_eq!(first["model"], "sim-embed");
    let data = first["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (i, item) in data.iter().enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        let vector = item["embedding"].as_array().unwrap();
        assert_eq!(vector.len(), 32);
        assert!((norm(vector) - 1.0).abs() < 1e-4);
    }
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);
    assert_eq!(first["usage"]["prompt_tokens"], 5);
    assert_eq!(first["usage"]["total_tokens"], 5);

    // The same input alone gets the same vector.
    let (_, single) = sim
        .post_json(
            "/v1/embeddings",
            &json!({"model": "sim-embed", "input": "first text"}),
        )
        .await;
    assert_eq!(single["data"][0]["embedding"], data[0]["embedding"]);

    // `dimensions` is honoured.
    let (_, short) = sim
        .post_json(
            "/v1/embeddings",
            &json!({"model": "sim-embed", "input": "first text", "dimensions": 8}),
        )
        .await;
    let vector = short["data"][0]["embedding"].as_array().unwrap();
    assert_eq!(vector.len(), 8);
    assert!((norm(vector) - 1.0).abs() < 1e-4);

    // Token arrays, and base64 encoding of little-endian f32s.
    let (status, ids) = sim
        .post_json(
            "/v1/embeddings",
            &json!({"model": "sim-embed", "input": [[1, 2, 3], [4]], "encoding_format": "base64", "dimensions": 4}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ids["usage"]["prompt_tokens"], 4);
    let encoded = ids["data"][0]["embedding"].as_str().unwrap();
    assert_eq!(encoded.len(), 24, "16 bytes of base64: {encoded}");
    sim.shutdown().await;
}

#[tokio::test]
async fn models_listed_and_strict_models_enforced() {
    let sim = start(SimConfig::default()).await;
    let models: Value = sim.get("/v1/models").await.json().await.unwrap();
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"sim-chat"));
    assert_eq!(models["data"][0]["object"], "model");
    // Any model is accepted by default.
    let mut body = chat("hi");
    body["model"] = json!("some-unlisted-model");
    let (status, answer) = sim.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["model"], "some-unlisted-model");
    sim.shutdown().await;

    let strict = start(SimConfig {
        models: vec!["only-this".to_owned()],
        strict_models: true,
        ..SimConfig::default()
    })
    .await;
    let (status, error) = strict.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&error, "not_found_error");
    assert_eq!(error["error"]["code"], "model_not_found");
    body["model"] = json!("only-this");
    let (status, _) = strict.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::OK);
    strict.shutdown().await;
}

#[tokio::test]
async fn invalid_requests_get_openai_400s() {
    let sim = start(SimConfig::default()).await;
    let response = sim
        .client
        .post(format!("{}/v1/chat/completions", sim.url))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_error(&body, "invalid_request_error");
    assert!(body["error"]["param"].is_null());
    assert!(body["error"]["code"].is_null());

    let cases = [
        ("/v1/chat/completions", json!({"messages": []}), "model"),
        ("/v1/chat/completions", json!({"model": "m"}), "messages"),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": []}),
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true}),
            "stream",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
            "max_tokens",
        ),
        ("/v1/completions", json!({"model": "m"}), "prompt"),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": "x", "stream": true}),
            "stream",
        ),
        (
            "/v1/embeddings",
            json!({"model": "m", "input": ""}),
            "input",
        ),
        (
            "/v1/embeddings",
            json!({"model": "m", "input": "x", "encoding_format": "int8"}),
            "encoding_format",
        ),
        ("/v1/embeddings", json!({"input": "x"}), "model"),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [], "sim": {"kind": "explode"}}),
            "sim",
        ),
    ];
    for (path, body, param) in cases {
        let (status, error) = sim.post_json(path, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}");
        assert_error(&error, "invalid_request_error");
        assert_eq!(error["error"]["param"], param, "{path} {body}");
    }
    let stats = sim.stats().await;
    assert_eq!(stats.responses.get(&400), Some(&12));
    sim.shutdown().await;
}

#[tokio::test]
async fn health_unknown_routes_and_request_ids() {
    let sim = start(SimConfig {
        max_body_bytes: 1024,
        ..SimConfig::default()
    })
    .await;
    assert_eq!(sim.get("/livez").await.status(), StatusCode::OK);
    assert_eq!(sim.get("/readyz").await.status(), StatusCode::OK);

    let missing = sim.get("/v1/nothing").await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let id = missing.headers()["x-request-id"].clone();
    assert_error(&missing.json().await.unwrap(), "not_found_error");

    let wrong_method = sim.get("/v1/chat/completions").await;
    assert_eq!(wrong_method.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_ne!(wrong_method.headers()["x-request-id"], id);

    let big = chat(&"word ".repeat(1000));
    let too_large = sim.post("/v1/chat/completions", &big).await;
    assert_eq!(too_large.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_error(&too_large.json().await.unwrap(), "invalid_request_error");

    let mut ids = std::collections::HashSet::new();
    for _ in 0..5 {
        let response = sim.post("/v1/chat/completions", &chat("same")).await;
        ids.insert(
            response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(ids.len(), 5, "every response has its own id");
    sim.shutdown().await;
}

#[tokio::test]
async fn capacity_limit_answers_429_with_retry_after() {
    let sim = start(SimConfig {
        max_concurrency: 2,
        retry_after_secs: 1.5,
        ..SimConfig::default()
    })
    .await;
    let held = with_sim(chat("hold me"), json!({"latency_ms": 600_000}));
    let mut holders = Vec::new();
    for _ in 0..2 {
        let client = sim.client.clone();
        let url = format!("{}/v1/chat/completions", sim.url);
        let body = held.clone();
        holders.push(tokio::spawn(async move {
            client.post(url).json(&body).send().await
        }));
    }
    sim.wait("in_flight=2").await;

    let response = sim
        .post("/v1/chat/completions", &chat("one too many"))
        .await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "2");
    assert_eq!(response.headers()["retry-after-ms"], "1500");
    assert_error(&response.json().await.unwrap(), "rate_limit_error");

    let stats = sim.stats().await;
    assert_eq!(stats.in_flight, 2);
    assert_eq!(stats.max_in_flight, 3, "the refused arrival was observed");
    assert_eq!(stats.failures.capacity_429, 1);
    assert_eq!(stats.responses.get(&429), Some(&1));

    // Shutdown cuts the held requests instead of waiting ten minutes.
    sim.shutdown().await;
    for holder in holders {
        let error = holder.await.unwrap().expect_err("held request is cut");
        assert!(is_connection_error(&error), "{error:?}");
    }
}

#[tokio::test]
async fn scripted_statuses_use_openai_error_types() {
    let sim = start(SimConfig::default()).await;
    for (status, kind) in [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (429, "rate_limit_error"),
        (500, "server_error"),
        (503, "server_error"),
    ] {
        let body = with_sim(chat("script"), json!({"status": status}));
        // No fail_times: every attempt fails.
        for _ in 0..2 {
            let response = sim.post("/v1/chat/completions", &body).await;
            assert_eq!(response.status().as_u16(), status);
            assert!(response.headers().get("retry-after").is_none());
            assert_error(&response.json().await.unwrap(), kind);
        }
    }
    // A scripted failure needs no valid request around it.
    let (status, _) = sim
        .post_json("/v1/embeddings", &json!({"sim": {"status": 502}}))
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(sim.stats().await.failures.scripted_status, 15);
    sim.shutdown().await;
}

#[tokio::test]
async fn fail_times_fails_then_succeeds() {
    let sim = start(SimConfig::default()).await;
    let body = with_sim(
        chat("flaky"),
        json!({"fail_times": 2, "status": 503, "retry_after": 3}),
    );
    for _ in 0..2 {
        let response = sim.post("/v1/chat/completions", &body).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "3");
        assert_eq!(response.headers()["retry-after-ms"], "3000");
        assert_error(&response.json().await.unwrap(), "server_error");
    }
    let (status, ok) = sim.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::OK);
    // The directive does not change content.
    let (_, plain) = sim.post_json("/v1/chat/completions", &chat("flaky")).await;
    assert_eq!(ok["choices"], plain["choices"]);
    let (status, _) = sim.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::OK, "later attempts keep succeeding");

    // Another body is another identity with its own attempts.
    let other = with_sim(chat("flaky too"), json!({"fail_times": 1, "kind": "429"}));
    let (status, error) = sim.post_json("/v1/chat/completions", &other).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_error(&error, "rate_limit_error");
    let (status, _) = sim.post_json("/v1/chat/completions", &other).await;
    assert_eq!(status, StatusCode::OK);

    let stats = sim.stats().await;
    assert_eq!(stats.failures.scripted_status, 3);
    assert_eq!(stats.responses.get(&503), Some(&2));
    assert_eq!(stats.responses.get(&429), Some(&1));
    assert_eq!(stats.responses.get(&200), Some(&4));
    assert_eq!(stats.attempts_tracked, 2);

    // A reset forgets the attempts: the script starts over.
    sim.client
        .post(format!("{}/sim/reset", sim.url))
        .send()
        .await
        .unwrap();
    let (status, _) = sim.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    sim.shutdown().await;
}

#[tokio::test]
async fn scripted_429_carries_fractional_retry_after() {
    let sim = start(SimConfig::default()).await;
    let body = with_sim(
        chat("slow down"),
        json!({"fail_times": 1, "kind": "429", "retry_after": 0.25}),
    );
    let response = sim.post("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(response.headers()["retry-after-ms"], "250");
    let error: Value = response.json().await.unwrap();
    assert_error(&error, "rate_limit_error");
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert_eq!(
        sim.post("/v1/chat/completions", &body).await.status(),
        StatusCode::OK
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn scripted_timeout_holds_until_the_client_gives_up() {
    let sim = start(SimConfig::default()).await;
    let body = with_sim(chat("hang"), json!({"fail_times": 1, "kind": "timeout"}));
    let error = sim
        .client
        .post(format!("{}/v1/chat/completions", sim.url))
        .json(&body)
        .timeout(Duration::from_millis(500))
        .send()
        .await
        .expect_err("the first attempt is never answered");
    assert!(error.is_timeout(), "{error:?}");
    let stats = sim.wait("failures=1").await;
    assert_eq!(stats.failures.timeout, 1);

    let (status, _) = sim.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::OK);
    sim.shutdown().await;
}

#[tokio::test]
async fn scripted_drop_is_a_connection_error() {
    let sim = start(SimConfig::default()).await;
    let body = with_sim(chat("vanish"), json!({"fail_times": 1, "kind": "drop"}));
    let error = sim
        .try_post("/v1/chat/completions", &body)
        .await
        .expect_err("dropped");
    assert!(is_connection_error(&error), "{error:?}");
    assert!(error.is_request(), "{error:?}");
    let (status, _) = sim.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::OK);
    let stats = sim.stats().await;
    assert_eq!(stats.failures.drop, 1);
    assert_eq!(
        stats.responses.values().sum::<u64>(),
        1,
        "a drop sends no response"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn dropped_connection_carries_zero_bytes() {
    let sim = start(SimConfig::default()).await;
    let body = with_sim(chat("vanish"), json!({"kind": "drop"})).to_string();
    let mut stream = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    // A reset instead of a clean close is as good: either way, nothing arrived.
    _ = stream.read_to_end(&mut received).await;
    assert!(
        received.is_empty(),
        "{}",
        String::from_utf8_lossy(&received)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn scripted_malformed_is_unparsable_json() {
    let sim = start(SimConfig::default()).await;
    let body = with_sim(
        chat("garble"),
        json!({"fail_times": 1, "kind": "malformed"}),
    );
    let response = sim.post("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    let text = response.text().await.unwrap();
    assert!(text.starts_with('{'), "{text}");
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
    let (status, _) = sim.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sim.stats().await.failures.malformed, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn rate_one_always_fails_and_rate_zero_never() {
    // Certain 500s.
    let sim = start(SimConfig {
        rate_500: 1.0,
        ..SimConfig::default()
    })
    .await;
    for _ in 0..5 {
        let (status, error) = sim.post_json("/v1/chat/completions", &chat("x")).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_error(&error, "server_error");
    }
    // A scripted request is exempt from drawn failures.
    let scripted = with_sim(chat("x"), json!({"fail_times": 0}));
    assert_eq!(
        sim.post("/v1/chat/completions", &scripted).await.status(),
        StatusCode::OK
    );
    assert_eq!(sim.stats().await.failures.random_500, 5);
    sim.shutdown().await;

    // Certain 429s, with the configured Retry-After.
    let sim = start(SimConfig {
        rate_429: 1.0,
        retry_after_secs: 2.0,
        ..SimConfig::default()
    })
    .await;
    let response = sim
        .post("/v1/embeddings", &json!({"model": "m", "input": "x"}))
        .await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "2");
    assert_error(&response.json().await.unwrap(), "rate_limit_error");
    sim.shutdown().await;

    // Certain drops and timeouts (held for 0 ms, then cut): connection errors.
    for config in [
        SimConfig {
            rate_drop: 1.0,
            ..SimConfig::default()
        },
        SimConfig {
            rate_timeout: 1.0,
            timeout_hold_ms: 0,
            ..SimConfig::default()
        },
    ] {
        let sim = start(config).await;
        let error = sim
            .try_post("/v1/completions", &json!({"model": "m", "prompt": "x"}))
            .await
            .expect_err("cut");
        assert!(is_connection_error(&error), "{error:?}");
        let stats = sim.stats().await;
        assert_eq!(stats.failures.drop + stats.failures.timeout, 1);
        sim.shutdown().await;
    }

    // Certain malformed bodies.
    let sim = start(SimConfig {
        rate_malformed: 1.0,
        ..SimConfig::default()
    })
    .await;
    let text = sim
        .post("/v1/completions", &json!({"model": "m", "prompt": "x"}))
        .await
        .text()
        .await
        .unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_err());
    sim.shutdown().await;

    // Rates of zero never fail.
    let sim = start(SimConfig::default()).await;
    for i in 0..20 {
        let (status, _) = sim
            .post_json("/v1/chat/completions", &chat(&format!("healthy {i}")))
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(sim.stats().await.failures.total, 0);
    sim.shutdown().await;
}

async fn status_sequence(sim: &Sim, n: usize) -> Vec<u16> {
    let mut statuses = Vec::with_capacity(n);
    for i in 0..n {
        let response = sim
            .post("/v1/chat/completions", &chat(&format!("request {i}")))
            .await;
        statuses.push(response.status().as_u16());
    }
    statuses
}

#[tokio::test]
async fn seeded_rates_are_reproducible() {
    let config = SimConfig {
        rate_500: 0.5,
        seed: 42,
        ..SimConfig::default()
    };
    let sim = start(config.clone()).await;
    let first = status_sequence(&sim, 32).await;
    assert!(first.contains(&200) && first.contains(&500), "{first:?}");

    // A reset re-seeds: the same sequence again.
    let reset = sim
        .client
        .post(format!("{}/sim/reset", sim.url))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), StatusCode::OK);
    assert_eq!(status_sequence(&sim, 32).await, first);
    sim.shutdown().await;

    // Another server with the same seed agrees.
    let twin = start(config).await;
    assert_eq!(status_sequence(&twin, 32).await, first);
    twin.shutdown().await;
}

#[tokio::test]
async fn stats_count_requests_responses_and_reset() {
    let sim = start(SimConfig::default()).await;
    sim.post("/v1/chat/completions", &chat("a")).await;
    sim.post("/v1/chat/completions", &chat("b")).await;
    sim.post("/v1/completions", &json!({"model": "m", "prompt": "c"}))
        .await;
    sim.post("/v1/embeddings", &json!({"model": "m", "input": "d"}))
        .await;
    sim.post("/v1/embeddings", &json!({"input": "no model"}))
        .await;
    sim.get("/v1/models").await;

    let stats = sim.stats().await;
    assert_eq!(stats.requests.chat_completions, 2);
    assert_eq!(stats.requests.completions, 1);
    assert_eq!(stats.requests.embeddings, 2);
    assert_eq!(stats.requests.models, 1);
    assert_eq!(stats.requests.total, 5);
    assert_eq!(stats.responses.get(&200), Some(&4));
    assert_eq!(stats.responses.get(&400), Some(&1));
    assert_eq!(stats.failures.total, 0);
    assert_eq!(stats.in_flight, 0);
    assert_eq!(stats.max_in_flight, 1);

    let raw: Value = sim.get("/sim/stats").await.json().await.unwrap();
    assert_eq!(raw["responses"]["200"], 4, "statuses are JSON keys");

    let reset: SimStats = sim
        .client
        .post(format!("{}/sim/reset", sim.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reset, SimStats::default());
    assert_eq!(sim.stats().await, SimStats::default());

    // /sim/wait reports a timeout when the condition is not met.
    let response = sim.get("/sim/wait?requests=1&timeout_ms=0").await;
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    sim.shutdown().await;
}

#[tokio::test]
async fn serve_rejects_invalid_config() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = SimConfig {
        rate_drop: 2.0,
        ..SimConfig::default()
    };
    let error = serve(config, listener, CancellationToken::new())
        .await
        .expect_err("invalid config");
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
}

#[tokio::test]
async fn router_can_be_mounted_elsewhere() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().nest(
        "/sim-upstream",
        nightshift_inference_sim::router(SimConfig::default()),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest::Client::new();

    let response = client
        .post(format!("{url}/sim-upstream/v1/chat/completions"))
        .json(&chat("mounted"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().contains_key("x-request-id"));

    // Without serve's connection handle a drop is a failing body: still no usable response.
    let dropped = with_sim(chat("mounted"), json!({"kind": "drop"}));
    let outcome = async {
        client
            .post(format!("{url}/sim-upstream/v1/chat/completions"))
            .json(&dropped)
            .send()
            .await?
            .text()
            .await
    }
    .await;
    assert!(outcome.is_err(), "{outcome:?}");
    server.abort();
}

#[tokio::test]
async fn padded_answers_have_the_asked_size_with_or_without_content_length() {
    let sim = start(SimConfig::default()).await;
    for (chunked, size) in [(false, 300_000u64), (true, 200_001)] {
        let body = with_sim(
            chat("big"),
            json!({"response_bytes": size, "chunked": chunked}),
        );
        let response = sim.post("/v1/chat/completions", &body).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "application/json");
        let declared = response.headers().get("content-length").cloned();
        assert_eq!(declared.is_none(), chunked, "{declared:?}");
        assert_eq!(response.content_length().is_none(), chunked);
        let bytes = response.bytes().await.unwrap();
        assert_eq!(bytes.len() as u64, size);
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["object"], "chat.completion");
        assert_usage(&value["usage"]);
        assert!(value["sim_padding"].as_str().unwrap().len() > 100_000);
    }
    let stats = sim.stats().await;
    assert_eq!(stats.streamed_body_bytes, 500_001);
    assert_eq!(stats.streaming_bodies, 0);

    // Chunked alone streams the answer as it is; a configured size pads every answer.
    let response = sim
        .post(
            "/v1/chat/completions",
            &with_sim(chat("plain"), json!({"chunked": true})),
        )
        .await;
    assert!(response.content_length().is_none());
    let value: Value = response.json().await.unwrap();
    assert!(value.get("sim_padding").is_none());
    sim.shutdown().await;

    let sim = start(SimConfig {
        response_bytes: 100_000,
        ..SimConfig::default()
    })
    .await;
    let response = sim.post("/v1/chat/completions", &chat("configured")).await;
    assert_eq!(response.content_length(), Some(100_000));
    assert_eq!(response.bytes().await.unwrap().len(), 100_000);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_huge_answer_stops_streaming_when_the_client_stops_reading() {
    let sim = start(SimConfig::default()).await;
    let size = 100 * 1024 * 1024;
    let body = with_sim(
        chat("huge"),
        json!({"response_bytes": size, "chunked": true}),
    );
    let mut response = sim.post("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut read = 0;
    while read < 1024 * 1024 {
        read += response.chunk().await.unwrap().expect("more body").len();
    }
    drop(response);
    // The body ends once its connection is gone: poll until it does.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let stats = loop {
        let stats = sim.stats().await;
        if stats.streaming_bodies == 0 {
            break stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the body is still streaming: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        stats.streamed_body_bytes < size / 2,
        "{} bytes sent",
        stats.streamed_body_bytes
    );
    sim.shutdown().await;
}

fn response_request(input: Value) -> Value {
    json!({"model": "sim-chat", "input": input})
}

/// Checks a `response` object's shape and returns its output text.
fn assert_response_shape(body: &Value) -> String {
    assert!(body["id"].as_str().unwrap().starts_with("resp_"), "{body}");
    assert_eq!(body["object"], "response");
    assert!(body["created_at"].as_u64().is_some());
    assert_eq!(body["model"], "sim-chat");
    assert!(body["error"].is_null());
    assert_eq!(body["output"].as_array().unwrap().len(), 1);
    let message = &body["output"][0];
    assert_eq!(message["type"], "message");
    assert!(message["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["status"], body["status"]);
    let part = &message["content"][0];
    assert_eq!(part["type"], "output_text");
    assert_eq!(part["annotations"], json!([]));
    let text = part["text"].as_str().unwrap().to_owned();
    assert!(text.starts_with("sim:"), "{text}");

    let usage = &body["usage"];
    let input = usage["input_tokens"].as_u64().unwrap();
    let output = usage["output_tokens"].as_u64().unwrap();
    assert_eq!(output, text.split_whitespace().count() as u64);
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), input + output);
    assert_eq!(usage["input_tokens_details"]["cached_tokens"], 0);
    assert_eq!(usage["output_tokens_details"]["reasoning_tokens"], 0);
    assert!(
        usage.get("prompt_tokens").is_none(),
        "Responses usage shape"
    );
    text
}

#[tokio::test]
async fn responses_shape_usage_and_determinism() {
    let sim = start(SimConfig::default()).await;
    let (status, first) = sim
        .post_json(
            "/v1/responses",
            &response_request(json!("tell me about night shifts")),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let text = assert_response_shape(&first);
    assert_eq!(first["status"], "completed");
    assert!(first["incomplete_details"].is_null());
    assert_eq!(first["usage"]["input_tokens"], 5);
    // The request's settings, echoed with OpenAI's defaults.
    assert!(first["instructions"].is_null());
    assert!(first["max_output_tokens"].is_null());
    assert_eq!(first["temperature"], 1.0);
    assert_eq!(first["top_p"], 1.0);
    assert_eq!(first["parallel_tool_calls"], true);
    assert_eq!(first["tool_choice"], "auto");
    assert_eq!(first["tools"], json!([]));
    assert_eq!(first["metadata"], json!({}));

    // Same request, same answer, whatever the key order; a new id.
    let (_, again) = sim
        .post_json(
            "/responses",
            &json!({"input": "tell me about night shifts", "model": "sim-chat"}),
        )
        .await;
    assert_eq!(assert_response_shape(&again), text);
    assert_eq!(again["usage"], first["usage"]);
    assert_ne!(again["id"], first["id"]);

    // A list of input items, instructions and settings echoed back.
    let tools = json!([{"type": "function", "name": "f", "parameters": {"type": "object"}}]);
    let body = json!({
        "model": "sim-chat",
        "instructions": "be brief",
        "input": [
            {"role": "user", "content": "what is this"},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "and that"},
                {"type": "input_image", "image_url": "data:,"}
            ]},
        ],
        "temperature": 0.2,
        "parallel_tool_calls": false,
        "tool_choice": "none",
        "tools": tools,
        "metadata": {"k": "v"},
    });
    let (status, items) = sim.post_json("/v1/responses", &body).await;
    assert_eq!(status, StatusCode::OK, "{items}");
    assert_ne!(assert_response_shape(&items), text);
    assert_eq!(items["usage"]["input_tokens"], 2 + 3 + 2 + 85);
    assert_eq!(items["instructions"], "be brief");
    assert_eq!(items["temperature"], 0.2);
    assert_eq!(items["parallel_tool_calls"], false);
    assert_eq!(items["tool_choice"], "none");
    assert_eq!(items["tools"], tools);
    assert_eq!(items["metadata"], json!({"k": "v"}));

    let stats = sim.stats().await;
    assert_eq!(stats.requests.responses, 3);
    assert_eq!(stats.requests.total, 3);
    sim.shutdown().await;
}

#[tokio::test]
async fn responses_honour_max_output_tokens() {
    let sim = start(SimConfig::default()).await;
    let mut cut = 0;
    for i in 0..10 {
        let mut body = response_request(json!(format!("cap me {i}")));
        body["max_output_tokens"] = json!(16);
        let (status, capped) = sim.post_json("/v1/responses", &body).await;
        assert_eq!(status, StatusCode::OK, "{capped}");
        assert_response_shape(&capped);
        assert_eq!(capped["max_output_tokens"], 16);
        let output = capped["usage"]["output_tokens"].as_u64().unwrap();
        assert!(output <= 16, "{capped}");
        if capped["status"] == "incomplete" {
            cut += 1;
            assert_eq!(output, 16);
            assert_eq!(capped["incomplete_details"]["reason"], "max_output_tokens");
            assert!(capped["completed_at"].is_null());
        } else {
            assert_eq!(capped["status"], "completed");
        }
    }
    // Natural lengths are 8..=64 words: most of ten answers are cut.
    assert!(cut > 0, "no answer was cut");

    // OpenAI's minimum is 16.
    let mut body = response_request(json!("too small"));
    body["max_output_tokens"] = json!(15);
    let (status, error) = sim.post_json("/v1/responses", &body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["error"]["param"], "max_output_tokens");
    sim.shutdown().await;
}

#[tokio::test]
async fn moderations_flag_by_keyword_one_result_per_input() {
    let sim = start(SimConfig::default()).await;
    let (status, single) = sim
        .post_json(
            "/v1/moderations",
            &json!({"input": "I will kill the process"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{single}");
    assert!(single["id"].as_str().unwrap().starts_with("modr-"));
    assert_eq!(single["model"], "omni-moderation-latest");
    assert!(single.get("usage").is_none(), "moderations carry no usage");
    let result = &single["results"][0];
    assert_eq!(result["flagged"], true);
    assert_eq!(result["categories"]["violence"], true);
    assert_eq!(result["categories"]["hate"], false);
    assert!(result["category_scores"]["violence"].as_f64().unwrap() >= 0.9);
    assert!(result["category_scores"]["hate"].as_f64().unwrap() < 0.1);
    let categories = result["categories"].as_object().unwrap();
    assert_eq!(categories.len(), 13);
    for name in categories.keys() {
        assert!(result["category_scores"][name].is_f64(), "{name}");
        assert_eq!(
            result["category_applied_input_types"][name],
            json!(["text"])
        );
    }

    // One result per string, in order; deterministic.
    let body = json!({"model": "omni-moderation-latest", "input": ["a calm sea", "I hate mondays", "calm"]});
    let (status, many) = sim.post_json("/v1/moderations", &body).await;
    assert_eq!(status, StatusCode::OK);
    let flagged: Vec<&Value> = many["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["flagged"])
        .collect();
    assert_eq!(flagged, [&json!(false), &json!(true), &json!(false)]);
    assert_eq!(many["results"][1]["categories"]["hate"], true);
    let (_, again) = sim.post_json("/moderations", &body).await;
    assert_eq!(again["results"], many["results"]);

    // Multi-modal parts: one result, images scored where OpenAI scores them.
    let body = json!({"input": [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    ]});
    let (status, omni) = sim.post_json("/v1/moderations", &body).await;
    assert_eq!(status, StatusCode::OK, "{omni}");
    assert_eq!(omni["results"].as_array().unwrap().len(), 1);
    let applied = &omni["results"][0]["category_applied_input_types"];
    assert_eq!(applied["violence"], json!(["text", "image"]));
    assert_eq!(applied["illicit"], json!(["text"]));

    assert_eq!(sim.stats().await.requests.moderations, 4);
    sim.shutdown().await;
}

#[tokio::test]
async fn responses_and_moderations_reject_bad_bodies_with_400s() {
    let sim = start(SimConfig::default()).await;
    let cases = [
        ("/v1/responses", json!({"input": "x"}), "model"),
        ("/v1/responses", json!({"model": "m"}), "input"),
        ("/v1/responses", json!({"model": "m", "input": []}), "input"),
        ("/v1/responses", json!({"model": "m", "input": 3}), "input"),
        (
            "/v1/responses",
            json!({"model": "m", "input": [{"role": "wizard", "content": "x"}]}),
            "input",
        ),
        (
            "/v1/responses",
            json!({"model": "m", "input": "x", "stream": true}),
            "stream",
        ),
        (
            "/v1/responses",
            json!({"model": "m", "input": "x", "temperature": 3}),
            "temperature",
        ),
        (
            "/v1/responses",
            json!({"model": "m", "input": "x", "instructions": 1}),
            "instructions",
        ),
        (
            "/v1/responses",
            json!({"model": "m", "input": "x", "previous_response_id": "resp_1"}),
            "previous_response_id",
        ),
        ("/v1/moderations", json!({}), "input"),
        ("/v1/moderations", json!({"input": []}), "input"),
        ("/v1/moderations", json!({"input": ["a", 1]}), "input"),
        (
            "/v1/moderations",
            json!({"input": [{"type": "video"}]}),
            "input",
        ),
        (
            "/v1/moderations",
            json!({"input": "x", "model": ""}),
            "model",
        ),
    ];
    for (path, body, param) in cases {
        let (status, error) = sim.post_json(path, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}");
        assert_error(&error, "invalid_request_error");
        assert_eq!(error["error"]["param"], param, "{path} {body}");
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn responses_and_moderations_obey_sim_directives() {
    let sim = start(SimConfig::default()).await;
    let response = response_request(json!("scripted"));
    let moderation = json!({"input": "scripted"});
    for (path, body) in [
        ("/v1/responses", &response),
        ("/v1/moderations", &moderation),
    ] {
        // A scripted status, in the envelope.
        let (status, error) = sim
            .post_json(path, &with_sim(body.clone(), json!({"status": 400})))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert_error(&error, "invalid_request_error");

        // Fails once, then succeeds with the answer the plain request gets.
        let flaky = with_sim(body.clone(), json!({"fail_times": 1, "status": 503}));
        let (status, _) = sim.post_json(path, &flaky).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
        let (status, answer) = sim.post_json(path, &flaky).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        let (_, plain) = sim.post_json(path, body).await;
        // Ids are per response; the content is the plain request's.
        let content = if path == "/v1/responses" {
            "/output/0/content"
        } else {
            "/results"
        };
        assert_eq!(answer.pointer(content), plain.pointer(content), "{path}");

        // Malformed: half a body.
        let malformed = with_sim(body.clone(), json!({"kind": "malformed"}));
        let response = sim.post(path, &malformed).await;
        assert_eq!(response.status(), StatusCode::OK);
        let text = response.text().await.unwrap();
        assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");

        // Dropped: no answer at all.
        let dropped = with_sim(body.clone(), json!({"kind": "drop"}));
        let error = sim.try_post(path, &dropped).await.unwrap_err();
        assert!(is_connection_error(&error), "{error}");
    }
    let stats = sim.stats().await;
    assert_eq!(stats.failures.total, 2 * 4);
    sim.shutdown().await;
}
