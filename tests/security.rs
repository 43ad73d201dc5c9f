//! End-to-end: the doors around the tenants are closed (issue 11).
//!
//! - The scheduler's gRPC API answers only calls that carry the internal token: every method
//!   of every service declared in `control.proto` (read at test time, so a new rpc is covered
//!   as soon as it is declared), gRPC health and paths nobody serves are `UNAUTHENTICATED`
//!   without it or with a wrong one; with it they work. `nightshift scheduler` will not start
//!   without one.
//! - The gateway's `/metrics`, `/readyz` and `/livez` are on its ops listener, not on the
//!   public API port; the scheduler's are on its ops listener, not on its gRPC port.
//! - Readiness is not tied to Redis: with Redis gone the gateway and the scheduler stay ready
//!   and the API lists and creates batches.
//! - Slowloris: connections that never finish their request head are closed after the
//!   header-read timeout, and while they hang normal requests are served.

use std::process::Stdio;
use std::str::FromStr;
use std::time::Duration;

use nightshift_e2e::http::upload_batch_file_id;
use nightshift_e2e::infra::free_port;
use nightshift_e2e::{Deployment, Stack, StackOptions, eventually, for_both_deployments};
use reqwest::Client;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};

for_both_deployments!(
    internal_grpc_needs_the_internal_token,
    ops_endpoints_are_not_on_the_api_port,
    stalled_request_heads_are_cut_off,
);

/// Every gRPC path the scheduler must guard: each `rpc` of each `service` in `control.proto`,
/// gRPC health, and a path no service serves.
fn internal_paths() -> Vec<String> {
    let proto = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../proto/nightshift/v1/control.proto"
    ))
    .expect("control.proto");
    let mut paths = Vec::new();
    let mut service = None;
    for line in proto.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("service ") {
            service = rest.split_whitespace().next().map(str::to_owned);
        } else if let Some(rest) = line.strip_prefix("rpc ") {
            let method = rest.split('(').next().expect("rpc name").trim();
            let service = service.as_deref().expect("an rpc inside a service");
            paths.push(format!("/nightshift.v1.{service}/{method}"));
        }
    }
    assert!(
        paths.len() >= 15,
        "control.proto declares the scheduler's rpcs: {paths:?}"
    );
    paths.push("/grpc.health.v1.Health/Check".into());
    paths.push("/nightshift.v1.NoSuchService/Anything".into());
    paths
}

/// One unary call of `path` with an empty request message (every field at its default),
/// sending `authorization` as given.
async fn call(channel: &Channel, path: &str, authorization: Option<&str>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("channel ready");
    let mut request = tonic::Request::new(());
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", value.parse().expect("ascii"));
    }
    let path = tonic::codegen::http::uri::PathAndQuery::from_str(path).expect("a path");
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    match grpc.unary(request, path, codec).await {
        Ok(_) => tonic::Status::ok(""),
        Err(status) => status,
    }
}

async fn internal_grpc_needs_the_internal_token(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let channel = Endpoint::from_shared(stack.scheduler_url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let token = stack.internal_token.expose().to_owned();
    let wrong = nightshift_proto::auth::generate_token();
    let refused = [
        None,
        Some(format!("Bearer {}", wrong.expose())),
        Some(format!("Bearer {}x", token)),
        Some(format!("Basic {token}")),
        Some(token.clone()),
        Some("Bearer ".to_owned()),
    ];
    for path in internal_paths() {
        for authorization in &refused {
            let status = call(&channel, &path, authorization.as_deref()).await;
            assert_eq!(
                status.code(),
                tonic::Code::Unauthenticated,
                "{path} with {authorization:?}: {status:?}"
            );
        }
    }

    // With the token: the health check answers, a read-only call gets past the door (its
    // empty request is the service's business), and the harness's client works.
    let bearer = format!("Bearer {token}");
    let health = call(&channel, "/grpc.health.v1.Health/Check", Some(&bearer)).await;
    assert_eq!(health.code(), tonic::Code::Ok, "{health:?}");
    let list = call(
        &channel,
        "/nightshift.v1.Batches/ListBatches",
        Some(&bearer),
    )
    .await;
    assert_ne!(list.code(), tonic::Code::Unauthenticated, "{list:?}");
    let (_, key) = stack
        .tenant("grpc-auth")
        .await
        .expect("a tenant, with the token");
    let page: Value = Client::new()
        .get(format!("{}/v1/batches", stack.origin))
        .bearer_auth(&key)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(page["object"], "list", "{page}");
    stack.stop().await.expect("stop");
}

async fn ops_endpoints_are_not_on_the_api_port(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let client = Client::new();
    for path in ["/metrics", "/readyz", "/livez"] {
        let resp = client
            .get(format!("{}{path}", stack.origin))
            .send()
            .await
            .expect("api port");
        assert_eq!(resp.status().as_u16(), 404, "{path} on the API port");
        let body: Value = resp.json().await.expect("the error envelope");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
    for path in ["/livez", "/readyz"] {
        let resp = client
            .get(format!("{}{path}", stack.ops_origin))
            .send()
            .await
            .expect("ops port");
        assert_eq!(resp.status().as_u16(), 200, "{path} on the ops port");
    }
    // a request to a route (a 401 without a key) is counted, and shows on the ops port
    let unauthenticated = client
        .get(format!("{}/v1/batches", stack.origin))
        .send()
        .await
        .expect("api port");
    assert_eq!(unauthenticated.status().as_u16(), 401);
    let metrics = client
        .get(format!("{}/metrics", stack.ops_origin))
        .send()
        .await
        .expect("ops port")
        .text()
        .await
        .expect("metrics");
    assert!(
        metrics.contains("nightshift_gateway_http_requests_total"),
        "{metrics}"
    );

    // The scheduler's gRPC port serves gRPC only (HTTP/2, every call behind the token): its
    // ops endpoints answer on a listener of their own.
    for path in ["/metrics", "/readyz", "/livez"] {
        if let Ok(resp) = client
            .get(format!("{}{path}", stack.scheduler_url))
            .send()
            .await
        {
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            assert!(
                status != 200 || body.is_empty(),
                "{path} answered on the scheduler's gRPC port: {status} {body}"
            );
        }
        let resp = client
            .get(format!("{}{path}", stack.scheduler_ops_origin))
            .send()
            .await
            .expect("scheduler ops port");
        assert_eq!(
            resp.status().as_u16(),
            200,
            "{path} on the scheduler's ops port"
        );
    }
    let metrics = client
        .get(format!("{}/metrics", stack.scheduler_ops_origin))
        .send()
        .await
        .expect("scheduler ops port")
        .text()
        .await
        .expect("metrics");
    assert!(metrics.contains("nightshift_scheduler_"), "{metrics}");
    stack.stop().await.expect("stop");
}

/// Uploads a one-line chat batch input and creates a batch on it; the batch object.
async fn create_batch(client: &Client, origin: &str, key: &str) -> Value {
    let line = json!({
        "custom_id": "r-0",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "sim-chat", "messages": [{"role": "user", "content": "hi"}]},
    });
    let file_id = upload_batch_file_id(client, origin, key, format!("{line}\n").as_bytes()).await;
    let resp = client
        .post(format!("{origin}/v1/batches"))
        .bearer_auth(key)
        .json(&json!({
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }))
        .send()
        .await
        .expect("create");
    let status = resp.status();
    let batch: Value = resp.json().await.expect("batch object");
    assert_eq!(status.as_u16(), 200, "{batch}");
    batch
}

/// Redis is a view: with it gone, both services stay ready and the API keeps listing and
/// creating batches. (Distributed only: standalone keeps its counts in memory.)
#[tokio::test]
async fn redis_down_leaves_the_api_serving_and_ready() {
    let port = free_port().await.expect("port");
    let mut redis = tokio::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server");
    eventually("private redis up", Duration::from_secs(30), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map(drop)
    })
    .await
    .expect("redis");
    let stack = Stack::start(StackOptions {
        state_url: Some(format!("redis://127.0.0.1:{port}")),
        ..StackOptions::on(Deployment::Distributed)
    })
    .await
    .expect("stack");
    let client = Client::new();
    let (_, key) = stack.tenant("redis-down").await.expect("tenant");
    let before = create_batch(&client, &stack.origin, &key).await;

    redis.kill().await.expect("stop redis");
    redis.wait().await.expect("redis gone");
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "redis still answers"
    );

    for ready in [
        format!("{}/readyz", stack.ops_origin),
        format!("{}/readyz", stack.scheduler_ops_origin),
    ] {
        let resp = client.get(&ready).send().await.expect("readyz");
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        assert_eq!(status, 200, "{ready} with redis down: {body}");
    }
    let after = create_batch(&client, &stack.origin, &key).await;
    let page: Value = client
        .get(format!("{}/v1/batches", stack.origin))
        .bearer_auth(&key)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("page");
    let ids: Vec<&str> = page["data"]
        .as_array()
        .unwrap_or_else(|| panic!("{page}"))
        .iter()
        .filter_map(|b| b["id"].as_str())
        .collect();
    for batch in [&before, &after] {
        let id = batch["id"].as_str().expect("id");
        assert!(ids.contains(&id), "{id} listed with redis down: {page}");
    }
    let one = client
        .get(format!(
            "{}/v1/batches/{}",
            stack.origin,
            after["id"].as_str().expect("id")
        ))
        .bearer_auth(&key)
        .send()
        .await
        .expect("retrieve");
    assert_eq!(one.status().as_u16(), 200);
    stack.stop().await.expect("stop");
}

/// Connections held open with an unfinished request head.
const STALLED: usize = 200;
/// The gateway's header-read timeout in this test.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(1);

async fn stalled_request_heads_are_cut_off(deployment: Deployment) {
    let stack = Stack::start(StackOptions {
        header_read_timeout: HEADER_READ_TIMEOUT,
        ..StackOptions::on(deployment)
    })
    .await
    .expect("stack");
    let (_, key) = stack.tenant("slowloris").await.expect("tenant");
    let addr = stack
        .origin
        .strip_prefix("http://")
        .expect("http origin")
        .to_owned();
    let mut stalled = Vec::with_capacity(STALLED);
    for i in 0..STALLED {
        let mut conn = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        // a request line and part of the headers, never the blank line that ends them
        let partial = if i % 2 == 0 {
            "GET /v1/batches HTTP/1.1\r\nHost: x\r\nAuthor".to_owned()
        } else {
            "POST /v1/fi".to_owned()
        };
        conn.write_all(partial.as_bytes()).await.expect("write");
        stalled.push(conn);
    }

    // While they hang, a normal client is served (a fresh connection each time).
    let client = Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    for _ in 0..5 {
        let resp = client
            .get(format!("{}/v1/batches", stack.origin))
            .bearer_auth(&key)
            .send()
            .await
            .expect("served while slow clients hang");
        assert_eq!(resp.status().as_u16(), 200);
    }

    // Each stalled connection is closed by the server: EOF (or a reset), whatever it was
    // sent before. The deadline is generous; the timeout is 1 s.
    for (i, mut conn) in stalled.into_iter().enumerate() {
        let mut seen = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(60), conn.read_to_end(&mut seen))
            .await
            .unwrap_or_else(|_| panic!("stalled connection {i} still open after 60 s"));
        if let Ok(n) = read {
            let text = String::from_utf8_lossy(&seen[..n]);
            assert!(
                text.is_empty() || text.starts_with("HTTP/1.1 408"),
                "connection {i}: {text}"
            );
        }
    }

    // An idle keep-alive connection is closed too, after a complete exchange.
    let mut idle = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    idle.write_all(b"GET /v1/nope HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), idle.read_to_end(&mut seen))
        .await
        .expect("the idle connection is closed")
        .ok();
    assert!(
        String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 404"),
        "{}",
        String::from_utf8_lossy(&seen)
    );

    let resp = client
        .get(format!("{}/v1/batches", stack.origin))
        .bearer_auth(&key)
        .send()
        .await
        .expect("served after");
    assert_eq!(resp.status().as_u16(), 200);
    stack.stop().await.expect("stop");
}

/// `nightshift scheduler` (and the other services that call it) will not start without a
/// usable internal token.
#[tokio::test]
async fn distributed_services_refuse_to_start_without_a_token() {
    let bin = nightshift_e2e::cluster::nightshift_bin().expect("the nightshift binary");
    for (service, token) in [
        ("scheduler", None),
        ("gateway", None),
        ("finalizer", None),
        ("admin", None),
        ("scheduler", Some("short")),
    ] {
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.arg(service);
        if service == "admin" {
            cmd.args(["create-tenant", "--name", "x"]);
        }
        cmd.env_remove("NIGHTSHIFT_INTERNAL__TOKEN")
            .env("NIGHTSHIFT_SCHEDULER__LISTEN", "127.0.0.1:0")
            .env("NIGHTSHIFT_GATEWAY__LISTEN", "127.0.0.1:0")
            .env("NIGHTSHIFT_FINALIZER__LISTEN", "127.0.0.1:0")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(token) = token {
            cmd.env("NIGHTSHIFT_INTERNAL__TOKEN", token);
        }
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("{service} kept running without a token"))
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{service} {token:?}: {stderr}");
        assert!(
            stderr.contains("internal token"),
            "{service} {token:?}: {stderr}"
        );
    }
}
