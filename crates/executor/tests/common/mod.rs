//! Shared by the executor's integration tests: the inference simulator in-process, the dev
//! Garage under a unique prefix, input files with known line offsets, chunk tasks.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use nightshift_core::routing::{RoutingConfig, UpstreamConfig};
use nightshift_executor::upstream::Upstreams;
use nightshift_inference_sim::{SimConfig, SimStats};
use nightshift_proto::v1::ChunkTask;
use nightshift_storage::{ObjectStore, S3Config, S3Store};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

/// How long a test waits for something that must happen.
pub const WAIT: Duration = Duration::from_secs(30);
/// How often a condition is polled while waiting for it.
pub const POLL: Duration = Duration::from_millis(25);

pub struct Sim {
    pub url: String,
    client: reqwest::Client,
    /// Dropping it shuts the simulator down.
    _stop: DropGuard,
}

/// Starts the simulator on 127.0.0.1:0.
pub async fn start_sim() -> Sim {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sim");
    let url = format!("http://{}", listener.local_addr().expect("sim addr"));
    let stop = CancellationToken::new();
    tokio::spawn(nightshift_inference_sim::serve(
        SimConfig::default(),
        listener,
        stop.clone(),
    ));
    Sim {
        url,
        client: reqwest::Client::new(),
        _stop: stop.drop_guard(),
    }
}

impl Sim {
    pub async fn stats(&self) -> SimStats {
        self.client
            .get(format!("{}/sim/stats", self.url))
            .send()
            .await
            .expect("sim stats")
            .json()
            .await
            .expect("sim stats json")
    }

    /// Long-polls `/sim/wait` and fails the test if the condition is not met in time.
    pub async fn wait(&self, query: &str) -> SimStats {
        let response = self
            .client
            .get(format!(
                "{}/sim/wait?{query}&timeout_ms={}",
                self.url,
                WAIT.as_millis()
            ))
            .send()
            .await
            .expect("sim wait");
        assert_eq!(response.status(), 200, "sim wait for {query}");
        response.json().await.expect("sim wait json")
    }

    /// A routing table with this simulator serving `models`: tiny backoffs, `max_attempts`.
    pub fn routing(&self, models: &[&str], max_attempts: u32) -> RoutingConfig {
        let mut upstream = UpstreamConfig::new(
            "sim",
            format!("{}/v1", self.url),
            models.iter().map(|m| (*m).to_owned()),
        );
        upstream.max_attempts = max_attempts;
        upstream.backoff_base = Duration::from_millis(1);
        upstream.backoff_max = Duration::from_millis(5);
        upstream.max_retry_after = Duration::from_millis(20);
        RoutingConfig {
            upstreams: vec![upstream],
        }
    }

    pub fn upstreams(&self, models: &[&str], max_attempts: u32) -> Arc<Upstreams> {
        self.upstreams_with(models, max_attempts, |_| {})
    }

    /// [`upstreams`](Self::upstreams) with the upstream's config edited.
    pub fn upstreams_with(
        &self,
        models: &[&str],
        max_attempts: u32,
        edit: impl Fn(&mut UpstreamConfig),
    ) -> Arc<Upstreams> {
        let mut routing = self.routing(models, max_attempts);
        for upstream in &mut routing.upstreams {
            edit(upstream);
        }
        Arc::new(Upstreams::new(&routing).expect("upstreams"))
    }

    /// Polls the stats (every [`POLL`], at most [`WAIT`]) until no streamed body is being
    /// sent any more: every huge answer was read to its end or its connection is gone.
    pub async fn streams_done(&self) -> SimStats {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let stats = self.stats().await;
            if stats.streaming_bodies == 0 {
                return stats;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "streamed bodies still being sent: {stats:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

/// 100 MB: a "huge" answer, over any cap a test sets.
pub const HUGE: u64 = 100 * 1024 * 1024;

/// An S3 store over the dev Garage (env overrides as in the storage tests), under a prefix
/// of its own. Call `cleanup` at the end.
pub async fn storage() -> S3Store {
    let endpoint = std::env::var("NIGHTSHIFT_STORAGE__ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:3900".to_owned());
    storage_at(&endpoint).await
}

/// [`storage`] at another endpoint (a closed port stands for an S3 outage).
pub async fn storage_at(endpoint: &str) -> S3Store {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let config = S3Config {
        endpoint: Some(endpoint.to_owned()),
        region: env("NIGHTSHIFT_STORAGE__REGION", "us-east-1"),
        bucket: env("NIGHTSHIFT_STORAGE__BUCKET", "nightshift"),
        access_key_id: Some(env(
            "NIGHTSHIFT_STORAGE__ACCESS_KEY_ID",
            "GK1d224b85150aaabc7eadd95e",
        )),
        secret_access_key: Some(nightshift_core::secret::Secret::new(env(
            "NIGHTSHIFT_STORAGE__SECRET_ACCESS_KEY",
            "04b99fcef4651778881fd9e7d7cab01ed1df0241b092249abb2a27e8c90516e5",
        ))),
        prefix: format!("test/executor-{}", uuid::Uuid::new_v4()),
        ..S3Config::default()
    };
    S3Store::new(&config).await.expect("s3 client")
}

pub async fn cleanup(store: &S3Store) {
    store.delete_prefix("").await.expect("storage cleanup");
}

/// A chat request line whose body carries `sim` (unless null); `content` makes it unique.
pub fn chat_line(custom_id: &str, content: &str, sim: Value) -> String {
    let mut body = json!({
        "model": "sim-chat",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
    });
    if !sim.is_null() {
        body["sim"] = sim;
    }
    json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": body,
    })
    .to_string()
}

/// An input file: its bytes, and each line's `[start, end)` (terminator included). Lines
/// end in `\n`, or `\r\n` where `crlf` says so.
pub struct Input {
    pub bytes: Bytes,
    pub spans: Vec<(u64, u64)>,
}

impl Input {
    pub fn new(lines: &[String], crlf: &[usize]) -> Self {
        let mut bytes = Vec::new();
        let mut spans = Vec::new();
        for (index, line) in lines.iter().enumerate() {
            let start = bytes.len() as u64;
            bytes.extend_from_slice(line.as_bytes());
            if crlf.contains(&index) {
                bytes.extend_from_slice(b"\r\n");
            } else {
                bytes.push(b'\n');
            }
            spans.push((start, bytes.len() as u64));
        }
        Self {
            bytes: Bytes::from(bytes),
            spans,
        }
    }

    /// The task of the chunk made of 1-based lines `first..=last`.
    pub fn task(&self, batch_id: &str, key: &str, first: u64, last: u64) -> ChunkTask {
        let index = |line: u64| usize::try_from(line - 1).expect("line index");
        ChunkTask {
            schema_version: 1,
            batch_id: batch_id.to_owned(),
            tenant_id: "tenant_test".into(),
            chunk_index: 2,
            input_storage_key: key.to_owned(),
            byte_start: self.spans[index(first)].0,
            byte_end: self.spans[index(last)].1,
            first_line: first,
            line_count: u32::try_from(last - first + 1).expect("line count"),
            endpoint: "/v1/chat/completions".into(),
            model: "sim-chat".into(),
            deadline: unix_now() + 3600,
            attempt: 1,
        }
    }
}

pub fn unix_now() -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(now.as_secs()).expect("unix time fits i64")
}

/// A fresh batch id.
pub fn batch_id() -> String {
    nightshift_core::BatchId::generate().as_str().to_owned()
}

/// The JSON lines of an object.
pub async fn read_lines(store: &dyn ObjectStore, key: &str) -> Vec<Value> {
    raw_lines(store, key)
        .await
        .iter()
        .map(|line| serde_json::from_slice(line).expect("a JSON line"))
        .collect()
}

/// The lines of an object, as bytes without their `\n`.
pub async fn raw_lines(store: &dyn ObjectStore, key: &str) -> Vec<Bytes> {
    let bytes = store
        .get(key, None)
        .await
        .expect("get object")
        .collect()
        .await
        .expect("read object");
    assert!(bytes.ends_with(b"\n"), "a part ends with a newline");
    let mut lines = Vec::new();
    let mut start = 0;
    for (at, byte) in bytes.iter().enumerate() {
        if *byte == b'\n' {
            lines.push(bytes.slice(start..at));
            start = at + 1;
        }
    }
    lines
}

/// Writes `lines` (each followed by `\n`) as the object `key`.
pub async fn put_lines(store: &dyn ObjectStore, key: &str, lines: &[Bytes]) {
    let mut bytes = Vec::new();
    for line in lines {
        bytes.extend_from_slice(line);
        bytes.push(b'\n');
    }
    store
        .put(key, Bytes::from(bytes))
        .await
        .expect("put object");
}
