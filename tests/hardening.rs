//! End-to-end: hostile input the gateway must survive without harm to anyone else (issue 11).
//!
//! - Arbitrary HTTP method tokens reach the 404/405 answers before authentication; they must
//!   not mint metric series (the `method` label is a standard method or `other`).
//! - A model name is bounded (`MAX_MODEL_CHARS`): a batch naming a 10 kB model fails validation
//!   in OpenAI's shape, and the next batch runs as usual.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use nightshift_core::validation::MAX_MODEL_CHARS;
use nightshift_e2e::http::upload_batch_file_id;
use nightshift_e2e::{
    Deployment, Stack, StackOptions, TEST_MODELS, eventually, for_both_deployments,
};
use reqwest::{Client, Method};
use serde_json::{Value, json};

/// Requests sent with random method tokens, after the warm-up.
const HOSTILE_REQUESTS: usize = 10_000;
/// Requests in flight at once.
const CONCURRENCY: usize = 32;
/// Paths the random methods are sent to: routes (405), unknown paths (404), ops endpoints.
const PATHS: [&str; 8] = [
    "/v1/files",
    "/v1/files/file-abc/content",
    "/v1/batches",
    "/v1/batches/batch_abc/cancel",
    "/files",
    "/v1/nope",
    "/no/such/thing",
    "/livez",
];

/// A small xorshift generator: the test needs varied tokens, not cryptographic ones.
struct Tokens(u64);

impl Tokens {
    fn seeded() -> Self {
        Self(uuid::Uuid::new_v4().as_u128() as u64 | 1)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// An HTTP method token (RFC 9110 `tchar`s) that is none of the standard methods.
    fn method(&mut self) -> Method {
        const TCHAR: &[u8] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~";
        loop {
            let len = 1 + (self.next_u64() % 16) as usize;
            let token: Vec<u8> = (0..len)
                .map(|_| TCHAR[(self.next_u64() % TCHAR.len() as u64) as usize])
                .collect();
            let method = Method::from_bytes(&token).expect("a token is a method");
            let standard = [
                Method::GET,
                Method::HEAD,
                Method::POST,
                Method::PUT,
                Method::DELETE,
                Method::PATCH,
                Method::OPTIONS,
                Method::CONNECT,
                Method::TRACE,
            ];
            if !standard.contains(&method) {
                return method;
            }
        }
    }
}

/// The series of the gateway's HTTP metrics in a `/metrics` page.
fn http_series(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| l.starts_with("nightshift_gateway_http_request"))
        .filter_map(|l| l.rsplit_once(' ').map(|(series, _)| series.to_owned()))
        .collect()
}

async fn scrape(client: &Client, origin: &str) -> String {
    client
        .get(format!("{origin}/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics page")
}

/// Sends `count` requests with random methods, round-robin over [`PATHS`], and checks every
/// answer is a 404 or 405 in OpenAI's error envelope.
async fn send_random_methods(client: &Client, origin: &str, count: usize) {
    let origin: Arc<str> = origin.into();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..CONCURRENCY {
        let (client, origin) = (client.clone(), origin.clone());
        workers.spawn(async move {
            let mut tokens = Tokens::seeded();
            for i in (worker..count).step_by(CONCURRENCY) {
                let method = tokens.method();
                let path = PATHS[i % PATHS.len()];
                let resp = client
                    .request(method.clone(), format!("{origin}{path}"))
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
                let status = resp.status().as_u16();
                let body: serde_json::Value = resp
                    .json()
                    .await
                    .unwrap_or_else(|e| panic!("{method} {path}: {status} without JSON: {e}"));
                assert!(
                    matches!(status, 404 | 405),
                    "{method} {path}: {status} {body}"
                );
                assert!(
                    body["error"]["message"].is_string() && body["error"]["type"].is_string(),
                    "{method} {path}: {status} not in the envelope: {body}"
                );
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.expect("worker");
    }
}

async fn random_methods_mint_no_series(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let client = Client::new();
    // The first scrape creates the scrape's own series; the warm-up sends every path a few
    // random methods, so each (route, status) pair has been seen as `other`.
    scrape(&client, &stack.ops_origin).await;
    send_random_methods(&client, &stack.origin, 4 * PATHS.len()).await;
    let warm = http_series(&scrape(&client, &stack.ops_origin).await);
    assert!(
        warm.iter().any(|s| s.contains(r#"method="other""#)),
        "unknown methods are counted as `other`: {warm:#?}"
    );

    send_random_methods(&client, &stack.origin, HOSTILE_REQUESTS).await;
    let after = http_series(&scrape(&client, &stack.ops_origin).await);
    assert_eq!(
        after.difference(&warm).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "{HOSTILE_REQUESTS} random methods added series"
    );
    assert_eq!(after.len(), warm.len());
    stack.stop().await.expect("stop");
}

/// One chat line naming `model`.
fn chat_line(custom_id: &str, model: &str) -> String {
    json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": "hi"}]},
    })
    .to_string()
}

/// Uploads `jsonl` as a `batch` file and creates a chat batch on it; returns the batch id.
async fn create_batch(client: &Client, origin: &str, key: &str, jsonl: &str) -> String {
    let file_id = upload_batch_file_id(client, origin, key, format!("{jsonl}\n").as_bytes()).await;
    let batch: Value = client
        .post(format!("{origin}/v1/batches"))
        .bearer_auth(key)
        .json(&json!({
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("batch object");
    batch["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{batch}"))
        .to_owned()
}

/// Polls the batch until it is in one of `statuses`; returns the Batch object.
async fn batch_reaches(
    client: &Client,
    origin: &str,
    key: &str,
    id: &str,
    statuses: &[&str],
) -> Value {
    eventually(
        &format!("batch {id} in {statuses:?}"),
        Duration::from_secs(60),
        || async {
            let batch: Value = client
                .get(format!("{origin}/v1/batches/{id}"))
                .bearer_auth(key)
                .send()
                .await
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            match batch["status"].as_str() {
                Some(s) if statuses.contains(&s) => Ok(batch),
                _ => Err(batch.to_string()),
            }
        },
    )
    .await
    .expect("batch status")
}

async fn overlong_model_names_fail_validation(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let (_, key) = stack.tenant("models").await.expect("tenant");
    let client = Client::new();
    let origin = stack.origin.as_str();

    let huge = "m".repeat(10 * 1024);
    let jsonl = [chat_line("a", &huge), chat_line("b", TEST_MODELS[0])].join("\n");
    let id = create_batch(&client, origin, &key, &jsonl).await;
    let failed = batch_reaches(&client, origin, &key, &id, &["failed"]).await;
    let errors = failed["errors"]["data"].as_array().expect("errors.data");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        errors[0],
        json!({
            "code": "invalid_request",
            "line": 1,
            "param": "body.model",
            "message": format!(
                "Invalid 'body.model': string too long. Expected a string with maximum length \
                 {MAX_MODEL_CHARS}, but got a string with length {} instead.",
                huge.len()
            ),
        })
    );
    assert_ne!(failed["model"].as_str(), Some(huge.as_str()));

    // Nothing else broke: the next batch of the same tenant runs to the end.
    let jsonl = [
        chat_line("a", TEST_MODELS[0]),
        chat_line("b", TEST_MODELS[0]),
    ]
    .join("\n");
    let id = create_batch(&client, origin, &key, &jsonl).await;
    let done = batch_reaches(&client, origin, &key, &id, &["completed", "failed"]).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request_counts"]["completed"], 2, "{done}");
    stack.stop().await.expect("stop");
}

for_both_deployments!(
    random_methods_mint_no_series,
    overlong_model_names_fail_validation
);
