//! Property tests of the multipart upload path, `POST /v1/files` (issue 11): arbitrary and
//! mutated multipart bodies — bad or missing boundaries, missing or repeated parts, huge part
//! headers, garbage bytes, truncated bodies, wrong purposes, files over the size limit — get a
//! 4xx in OpenAI's envelope (a well-formed upload a 200), never a panic or a 5xx; and nothing
//! is stored half-way: after a refused upload no file is registered, no object is left in
//! storage and no temporary file in its scratch directory.
//!
//! The gateway's real router is driven in-process (`tower::ServiceExt::oneshot`) over the
//! standalone deployment's real scheduler (gRPC on loopback, SQLite) and object store (a
//! directory). The case count is modest so the test takes seconds; `PROPTEST_CASES` raises it
//! for a longer hunt.

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use nightshift_e2e::{Deployment, Stack, StackOptions};
use nightshift_gateway::{AppState, GatewayConfig};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::Value;
use tower::ServiceExt;

/// The largest file this gateway takes: small, so "too large" is reachable with small cases.
const MAX_UPLOAD_BYTES: u64 = 4096;

/// One part of the form.
#[derive(Debug, Clone)]
struct Part {
    /// `name=` in `Content-Disposition`; `None`: no `Content-Disposition` header at all.
    name: Option<String>,
    filename: Option<String>,
    /// More header lines (`Content-Type`, a huge one, garbage).
    headers: Vec<String>,
    content: Vec<u8>,
}

/// How the request's `Content-Type` names the boundary.
#[derive(Debug, Clone)]
enum ContentType {
    Exact,
    Quoted,
    OtherBoundary,
    NoBoundary,
    NotMultipart,
    Missing,
    Garbage(String),
}

/// What is done to the well-built body afterwards.
#[derive(Debug, Clone)]
enum Mutation {
    None,
    /// Cut at this fraction (per mille) of the length.
    Truncate(u16),
    /// Insert bytes at this fraction (per mille).
    Insert(u16, Vec<u8>),
    /// Replace the byte at this fraction (per mille).
    Flip(u16, u8),
    /// An arbitrary body instead.
    Replace(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Case {
    boundary: String,
    content_type: ContentType,
    parts: Vec<Part>,
    /// The closing `--boundary--`.
    closed: bool,
    mutation: Mutation,
    /// Send `Content-Length` (else the length is unknown, like a chunked body).
    content_length: bool,
}

const PURPOSES: [&str; 4] = ["batch", "user_data", "fine-tune", "vision"];

fn valid_jsonl() -> impl Strategy<Value = Vec<u8>> {
    (1usize..4).prop_map(|n| {
        (0..n)
            .map(|i| {
                format!(
                    "{{\"custom_id\": \"r-{i}\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", \
                     \"body\": {{\"model\": \"m\", \"messages\": []}}}}\n"
                )
            })
            .collect::<String>()
            .into_bytes()
    })
}

/// A part that belongs in a good form.
fn good_part(name: &'static str, content: Vec<u8>, filename: Option<&str>) -> Part {
    Part {
        name: Some(name.to_owned()),
        filename: filename.map(str::to_owned),
        headers: Vec::new(),
        content,
    }
}

/// A well-formed form: a `purpose`, a `file` that suits it, maybe `expires_after`, in any
/// order.
fn good_parts() -> impl Strategy<Value = Vec<Part>> {
    (
        prop::sample::select(PURPOSES.to_vec()),
        valid_jsonl(),
        prop::collection::vec(any::<u8>(), 1..512),
        any::<bool>(),
        any::<bool>(),
        "[a-z]{1,12}\\.jsonl",
    )
        .prop_map(|(purpose, jsonl, bytes, file_first, expires, filename)| {
            let content = if purpose == "batch" { jsonl } else { bytes };
            let mut parts = vec![good_part("purpose", purpose.as_bytes().to_vec(), None)];
            let file = good_part("file", content, Some(&filename));
            if file_first {
                parts.insert(0, file);
            } else {
                parts.push(file);
            }
            if expires {
                parts.push(good_part(
                    "expires_after[anchor]",
                    b"created_at".to_vec(),
                    None,
                ));
                parts.push(good_part("expires_after[seconds]", b"3600".to_vec(), None));
            }
            parts
        })
}

/// Any part: good ones, wrong purposes, odd names, huge headers, contents over the limit,
/// not-JSONL, empty, arbitrary bytes.
fn any_part() -> impl Strategy<Value = Part> {
    let name = prop_oneof![
        Just(Some("file".to_owned())),
        Just(Some("purpose".to_owned())),
        Just(Some("expires_after[anchor]".to_owned())),
        Just(Some("expires_after[seconds]".to_owned())),
        Just(None),
        "[ -~]{0,20}".prop_map(Some),
    ];
    let filename = prop_oneof![
        Just(None),
        "[a-z.]{0,12}".prop_map(Some),
        "\\PC{0,40}".prop_map(Some),
        Just(Some("a\u{7}b".to_owned())),
        Just(Some("n".repeat(2000))),
    ];
    let header = prop_oneof![
        Just("Content-Type: application/jsonl".to_owned()),
        Just("Content-Type: text/plain; charset=utf-8".to_owned()),
        (1usize..200_000).prop_map(|n| format!("X-Huge: {}", "h".repeat(n))),
        "[ -~]{0,40}",
    ];
    let content = prop_oneof![
        valid_jsonl(),
        prop::sample::select(
            [
                "batch",
                "user_data",
                "batch_output",
                "fine-tune",
                "assistants",
                "",
                " batch"
            ]
            .to_vec()
        )
        .prop_map(|p| p.as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 0..600),
        Just(Vec::new()),
        Just(b"not json at all\n{\"half\": ".to_vec()),
        (0usize..3).prop_map(|extra| vec![b'x'; MAX_UPLOAD_BYTES as usize + extra]),
        Just(vec![b'y'; 70 * 1024]),
        Just(b"created_at".to_vec()),
        Just(b"-1".to_vec()),
    ];
    (name, filename, prop::collection::vec(header, 0..3), content).prop_map(
        |(name, filename, headers, content)| Part {
            name,
            filename,
            headers,
            content,
        },
    )
}

fn case() -> impl Strategy<Value = Case> {
    let boundary = prop_oneof![
        4 => "[A-Za-z0-9'()+_,./:=?-]{1,70}",
        1 => Just(String::new()),
        1 => "[ -~]{0,100}",
        1 => Just("x".repeat(300)),
    ];
    let content_type = prop_oneof![
        8 => Just(ContentType::Exact),
        1 => Just(ContentType::Quoted),
        1 => Just(ContentType::OtherBoundary),
        1 => Just(ContentType::NoBoundary),
        1 => Just(ContentType::NotMultipart),
        1 => Just(ContentType::Missing),
        1 => "[ -~]{0,60}".prop_map(ContentType::Garbage),
    ];
    let parts = prop_oneof![
        3 => good_parts(),
        3 => prop::collection::vec(any_part(), 0..5),
        // a good form with one more (or one repeated) part
        2 => (good_parts(), any_part(), any::<prop::sample::Index>()).prop_map(|(mut parts, extra, at)| {
            let at = at.index(parts.len() + 1);
            parts.insert(at, extra);
            parts
        }),
        // a good form with one part missing
        1 => (good_parts(), any::<prop::sample::Index>()).prop_map(|(mut parts, at)| {
            let at = at.index(parts.len());
            parts.remove(at);
            parts
        }),
    ];
    let mutation = prop_oneof![
        6 => Just(Mutation::None),
        1 => (0u16..1000).prop_map(Mutation::Truncate),
        1 => (0u16..1000, prop::collection::vec(any::<u8>(), 1..40)).prop_map(|(at, b)| Mutation::Insert(at, b)),
        1 => (0u16..1000, any::<u8>()).prop_map(|(at, b)| Mutation::Flip(at, b)),
        1 => prop::collection::vec(any::<u8>(), 0..400).prop_map(Mutation::Replace),
    ];
    (
        boundary,
        content_type,
        parts,
        prop::bool::weighted(0.9),
        mutation,
        any::<bool>(),
    )
        .prop_map(
            |(boundary, content_type, parts, closed, mutation, content_length)| Case {
                boundary,
                content_type,
                parts,
                closed,
                mutation,
                content_length,
            },
        )
}

impl Case {
    fn content_type(&self) -> Option<String> {
        let b = &self.boundary;
        match &self.content_type {
            ContentType::Exact => Some(format!("multipart/form-data; boundary={b}")),
            ContentType::Quoted => Some(format!("multipart/form-data; boundary=\"{b}\"")),
            ContentType::OtherBoundary => Some(format!("multipart/form-data; boundary={b}Z")),
            ContentType::NoBoundary => Some("multipart/form-data".to_owned()),
            ContentType::NotMultipart => Some("application/json".to_owned()),
            ContentType::Missing => None,
            ContentType::Garbage(g) => Some(g.clone()),
        }
    }

    fn body(&self) -> Vec<u8> {
        let b = &self.boundary;
        let mut body = Vec::new();
        for part in &self.parts {
            body.extend(format!("--{b}\r\n").into_bytes());
            if let Some(name) = &part.name {
                let mut disposition = format!("Content-Disposition: form-data; name=\"{name}\"");
                if let Some(f) = &part.filename {
                    disposition.push_str(&format!("; filename=\"{f}\""));
                }
                body.extend(disposition.into_bytes());
                body.extend(b"\r\n");
            }
            for h in &part.headers {
                body.extend(h.as_bytes());
                body.extend(b"\r\n");
            }
            body.extend(b"\r\n");
            body.extend(&part.content);
            body.extend(b"\r\n");
        }
        if self.closed {
            body.extend(format!("--{b}--\r\n").into_bytes());
        }
        let at = |per_mille: u16, len: usize| len * usize::from(per_mille) / 1000;
        match &self.mutation {
            Mutation::None => {}
            Mutation::Truncate(p) => body.truncate(at(*p, body.len())),
            Mutation::Insert(p, bytes) => {
                let i = at(*p, body.len());
                body.splice(i..i, bytes.iter().copied());
            }
            Mutation::Flip(p, byte) => {
                if !body.is_empty() {
                    let i = at(*p, body.len()).min(body.len() - 1);
                    body[i] = *byte;
                }
            }
            Mutation::Replace(bytes) => body.clone_from(bytes),
        }
        body
    }

    /// A form every client would call good: it must be taken (200).
    fn well_formed(&self) -> bool {
        let boundary_ok = !self.boundary.is_empty()
            && self.boundary.len() <= 70
            && self
                .boundary
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"'()+_,./:=?-".contains(&c));
        // Unquoted in the header, the boundary must be a token: no `(),/:=?`.
        let header_ok = match self.content_type {
            ContentType::Quoted => true,
            ContentType::Exact => self
                .boundary
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"'+_.-".contains(&c)),
            _ => false,
        };
        if !boundary_ok || !header_ok || !self.closed || !matches!(self.mutation, Mutation::None) {
            return false;
        }
        let named = |n: &str| {
            self.parts
                .iter()
                .filter(|p| p.name.as_deref() == Some(n))
                .collect::<Vec<_>>()
        };
        let (files, purposes) = (named("file"), named("purpose"));
        let [file] = files.as_slice() else {
            return false;
        };
        let [purpose] = purposes.as_slice() else {
            return false;
        };
        let purpose = String::from_utf8_lossy(&purpose.content).into_owned();
        let small_fields_ok = self.parts.iter().all(|p| {
            p.name.is_some()
                && p.headers.iter().all(|h| h.starts_with("Content-Type: "))
                && (p.name.as_deref() == Some("file") || p.content.len() <= 1024)
        });
        let expires_ok = named("expires_after[anchor]").is_empty()
            && named("expires_after[seconds]").is_empty()
            || matches!(
                (
                    named("expires_after[anchor]").as_slice(),
                    named("expires_after[seconds]").as_slice()
                ),
                ([a], [s]) if a.content == b"created_at" && s.content == b"3600"
            );
        let filename_ok = file
            .filename
            .as_deref()
            .is_some_and(|f| !f.is_empty() && f.len() <= 255 && !f.contains(['"', '\\']))
            && file
                .filename
                .as_deref()
                .is_some_and(|f| !f.chars().any(char::is_control));
        let content_ok = !file.content.is_empty()
            && file.content.len() as u64 <= MAX_UPLOAD_BYTES
            && (purpose != "batch" || file.content.ends_with(b"}\n"));
        PURPOSES.contains(&purpose.as_str())
            && small_fields_ok
            && expires_ok
            && filename_ok
            && content_ok
            && self.parts.iter().all(|p| {
                // the boundary must not show up inside a part
                let needle = format!("\r\n--{}", self.boundary).into_bytes();
                !p.content
                    .windows(needle.len())
                    .any(|w| w == needle.as_slice())
            })
    }
}

/// Temporary files left in the object store's scratch directories.
fn scratch_files(objects: &Path) -> Vec<String> {
    let Ok(dirs) = std::fs::read_dir(objects.join(".nightshift-tmp")) else {
        return Vec::new();
    };
    let mut left = Vec::new();
    for dir in dirs.flatten() {
        if dir.path().is_dir()
            && let Ok(files) = std::fs::read_dir(dir.path())
        {
            left.extend(files.flatten().map(|f| f.path().display().to_string()));
        }
    }
    left
}

struct Harness {
    stack: Stack,
    app: axum::Router,
    key: String,
    /// Uploads taken so far: the files listed and the objects stored.
    taken: std::cell::Cell<usize>,
}

impl Harness {
    async fn send(&self, case: &Case) -> (StatusCode, Value) {
        let body = case.body();
        let mut req = Request::post("/v1/files")
            .header(header::AUTHORIZATION, format!("Bearer {}", self.key));
        if let Some(ct) = case.content_type() {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        if case.content_length {
            req = req.header(header::CONTENT_LENGTH, body.len());
        }
        let resp = self
            .app
            .clone()
            .oneshot(req.body(Body::from(body)).expect("request"))
            .await
            .expect("infallible");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1024 * 1024)
            .await
            .expect("answer body");
        let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            Value::String(format!("not JSON: {}", String::from_utf8_lossy(&bytes)))
        });
        (status, value)
    }

    async fn listed_files(&self) -> usize {
        let req = Request::get("/v1/files?limit=10000")
            .header(header::AUTHORIZATION, format!("Bearer {}", self.key))
            .body(Body::empty())
            .expect("request");
        let resp = self.app.clone().oneshot(req).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(resp.into_body(), 64 * 1024 * 1024)
            .await
            .expect("list body");
        let page: Value = serde_json::from_slice(&bytes).expect("list JSON");
        page["data"].as_array().expect("data").len()
    }

    async fn check(&self, case: &Case) -> Result<(), TestCaseError> {
        let (status, body) = self.send(case).await;
        prop_assert!(
            status == StatusCode::OK || status.is_client_error(),
            "a {status} for {case:?}: {body}"
        );
        if case.well_formed() {
            prop_assert_eq!(status, StatusCode::OK, "a good form refused: {}", body);
        }
        if status == StatusCode::OK {
            prop_assert_eq!(&body["object"], "file", "{}", body);
            prop_assert!(
                body["id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("file-"))
            );
            self.taken.set(self.taken.get() + 1);
        } else {
            let error = &body["error"];
            prop_assert!(error["message"].is_string(), "no envelope: {}", body);
            prop_assert!(error["type"].is_string(), "no envelope: {}", body);
            prop_assert!(error.get("param").is_some(), "no param: {}", body);
            prop_assert!(error.get("code").is_some(), "no code: {}", body);
        }
        // Nothing half-way: exactly the taken uploads are listed and stored, and no write in
        // progress is left behind.
        prop_assert_eq!(
            self.listed_files().await,
            self.taken.get(),
            "files after {:?}",
            case
        );
        let objects = self
            .stack
            .object_keys("files/")
            .await
            .expect("list objects");
        prop_assert_eq!(objects.len(), self.taken.get(), "objects after {:?}", case);
        let data_dir = self.stack.data_dir().expect("standalone");
        let left = scratch_files(&data_dir.join("objects"));
        prop_assert!(left.is_empty(), "temporary files left: {:?}", left);
        Ok(())
    }
}

#[test]
fn uploads_of_arbitrary_forms_are_answered_in_the_envelope_and_store_nothing_half_way() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let harness = runtime.block_on(async {
        let stack = Stack::start(StackOptions::on(Deployment::Standalone))
            .await
            .expect("stack");
        let (_, key) = stack.tenant("props").await.expect("tenant");
        let config = GatewayConfig {
            max_upload_bytes: MAX_UPLOAD_BYTES,
            max_upload_bytes_in_flight_per_tenant: MAX_UPLOAD_BYTES * 8,
            ..GatewayConfig::default()
        };
        let app = nightshift_gateway::app(AppState {
            config: Arc::new(config),
            control: stack.control().expect("control"),
            storage: stack.storage.clone(),
            live: stack.state.clone(),
        });
        Harness {
            stack,
            app,
            key,
            taken: std::cell::Cell::new(0),
        }
    });
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(96);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case(), |case| runtime.block_on(harness.check(&case)));
    runtime.block_on(async { harness.stack.stop().await.expect("stop") });
    if let Err(e) = result {
        panic!("{e}");
    }
}
