//! End-to-end: per-tenant quotas (issue 11), on both deployments, through the HTTP API and
//! the `nightshift admin quotas` command.
//!
//! - `max_active_batches`: one batch more is a 429 `rate_limit_error`, code
//!   `active_batch_limit_exceeded`, `x-should-retry: false`;
//! - `max_enqueued_requests`: a batch whose lines would pass it is created, then `failed` at
//!   validation with `errors.data[0].code` `request_limit_exceeded`;
//! - `max_stored_bytes`: an upload that would pass it is a 400 `storage_quota_exceeded`
//!   (`param: file`) and nothing of it is stored.
//!
//! Each: under the quota works, a second tenant is unaffected, a per-tenant override (set with
//! the admin CLI) beats the default, and `default` gives the default back.

use std::time::Duration;

use nightshift_e2e::cluster::nightshift_bin;
use nightshift_e2e::http::upload_batch_file;
use nightshift_e2e::{Deployment, Stack, StackOptions, eventually, for_both_deployments};
use nightshift_scheduler::QuotaSettings;
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

for_both_deployments!(
    the_active_batch_quota_refuses_one_more_batch,
    the_enqueued_request_quota_fails_the_batch_at_validation,
    the_stored_bytes_quota_refuses_an_upload_and_stores_nothing,
);

/// `n` chat lines that each take 20 s at the simulator: their batch stays in progress for
/// the whole test.
fn slow_lines(n: usize) -> String {
    (0..n)
        .map(|i| {
            json!({
                "custom_id": format!("slow-{i}"),
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "sim-chat",
                    "messages": [{"role": "user", "content": "hi"}],
                    "sim": {"latency_ms": 20_000}
                }
            })
            .to_string()
                + "\n"
        })
        .collect()
}

/// Uploads `content` as a `batch` file; returns the status and the JSON answer.
async fn upload(client: &Client, origin: &str, key: &str, content: &str) -> (StatusCode, Value) {
    upload_batch_file(client, origin, key, "input.jsonl", content.as_bytes()).await
}

/// Creates a batch of `file`; returns the status, the `x-should-retry` header and the answer.
async fn create_batch(
    client: &Client,
    origin: &str,
    key: &str,
    file: &str,
) -> (StatusCode, Option<String>, Value) {
    let resp = client
        .post(format!("{origin}/v1/batches"))
        .bearer_auth(key)
        .json(&json!({
            "input_file_id": file,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }))
        .send()
        .await
        .expect("create");
    let status = resp.status();
    let retry = resp
        .headers()
        .get("x-should-retry")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, retry, resp.json().await.expect("JSON answer"))
}

async fn batch(client: &Client, origin: &str, key: &str, id: &str) -> Value {
    client
        .get(format!("{origin}/v1/batches/{id}"))
        .bearer_auth(key)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("JSON batch")
}

/// Polls a batch until its status is `want`; returns it.
async fn batch_becomes(client: &Client, stack: &Stack, key: &str, id: &str, want: &str) -> Value {
    eventually(
        &format!("batch {id} {want}"),
        Duration::from_secs(60),
        || async {
            let b = batch(client, &stack.origin, key, id).await;
            if b["status"] == want {
                Ok(b)
            } else {
                Err(anyhow::anyhow!("{b}"))
            }
        },
    )
    .await
    .expect("status")
}

/// Runs `nightshift admin quotas <args>` against this stack's scheduler; returns its output.
async fn admin_quotas(stack: &Stack, args: &[&str]) -> String {
    let out = tokio::process::Command::new(nightshift_bin().expect("the nightshift binary"))
        .arg("admin")
        .arg("quotas")
        .args(args)
        .env("NIGHTSHIFT_GATEWAY__SCHEDULER_URL", &stack.scheduler_url)
        .env("NIGHTSHIFT_INTERNAL__TOKEN", stack.internal_token.expose())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run nightshift admin");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "nightshift admin quotas {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The line of `quota` in `nightshift admin quotas show`'s output.
fn quota_line<'a>(shown: &'a str, quota: &str) -> &'a str {
    shown
        .lines()
        .find(|l| l.starts_with(&format!("{quota}\t")))
        .unwrap_or_else(|| panic!("no {quota} in {shown}"))
}

fn assert_error(body: &Value, kind: &str, code: &str) {
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

async fn the_active_batch_quota_refuses_one_more_batch(deployment: Deployment) {
    let stack = Stack::start(StackOptions {
        quotas: QuotaSettings {
            max_active_batches: 2,
            ..QuotaSettings::default()
        },
        ..StackOptions::on(deployment)
    })
    .await
    .expect("stack");
    let client = Client::new();
    let (tenant, key) = stack.tenant("busy").await.expect("tenant");
    let (_, other_key) = stack.tenant("other").await.expect("tenant");
    let (status, file) = upload(&client, &stack.origin, &key, &slow_lines(1)).await;
    assert_eq!(status, StatusCode::OK, "{file}");
    let file = file["id"].as_str().expect("file id");
    for _ in 0..2 {
        let (status, _, body) = create_batch(&client, &stack.origin, &key, file).await;
        assert_eq!(status, StatusCode::OK, "under the quota: {body}");
    }
    let (status, retry, body) = create_batch(&client, &stack.origin, &key, file).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_error(&body, "rate_limit_error", "active_batch_limit_exceeded");
    assert_eq!(
        retry.as_deref(),
        Some("false"),
        "the SDKs must not retry it"
    );
    let listed: Value = client
        .get(format!("{}/v1/batches", stack.origin))
        .bearer_auth(&key)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("JSON list");
    assert_eq!(
        listed["data"].as_array().map(Vec::len),
        Some(2),
        "nothing recorded"
    );

    // another tenant has its own count
    let (_, other_file) = upload(&client, &stack.origin, &other_key, &slow_lines(1)).await;
    let other_file = other_file["id"].as_str().expect("file id");
    let (status, _, body) = create_batch(&client, &stack.origin, &other_key, other_file).await;
    assert_eq!(status, StatusCode::OK, "another tenant: {body}");

    // an override beats the default, and `default` gives it back
    let shown = admin_quotas(
        &stack,
        &["set", "--tenant", &tenant, "--max-active-batches", "3"],
    )
    .await;
    assert_eq!(
        quota_line(&shown, "max_active_batches"),
        "max_active_batches\t3\toverride\tused=2"
    );
    let (status, _, body) = create_batch(&client, &stack.origin, &key, file).await;
    assert_eq!(status, StatusCode::OK, "under the override: {body}");
    let (status, _, body) = create_batch(&client, &stack.origin, &key, file).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    admin_quotas(
        &stack,
        &[
            "set",
            "--tenant",
            &tenant,
            "--max-active-batches",
            "default",
        ],
    )
    .await;
    let shown = admin_quotas(&stack, &["show", "--tenant", &tenant]).await;
    assert_eq!(
        quota_line(&shown, "max_active_batches"),
        "max_active_batches\t2\tdefault\tused=3"
    );
    let (status, _, body) = create_batch(&client, &stack.origin, &key, file).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    stack.stop().await.expect("stop");
}

async fn the_enqueued_request_quota_fails_the_batch_at_validation(deployment: Deployment) {
    let stack = Stack::start(StackOptions {
        quotas: QuotaSettings {
            max_enqueued_requests: 5,
            ..QuotaSettings::default()
        },
        ..StackOptions::on(deployment)
    })
    .await
    .expect("stack");
    let client = Client::new();
    let (tenant, key) = stack.tenant("lines").await.expect("tenant");
    let (_, other_key) = stack.tenant("other").await.expect("tenant");
    let (_, file) = upload(&client, &stack.origin, &key, &slow_lines(3)).await;
    let file = file["id"].as_str().expect("file id");

    let (status, _, first) = create_batch(&client, &stack.origin, &key, file).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let first = first["id"].as_str().expect("batch id");
    batch_becomes(&client, &stack, &key, first, "in_progress").await;
    // 3 + 3 > 5: created, then failed at validation, never run
    let (status, _, second) = create_batch(&client, &stack.origin, &key, file).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    let second = second["id"].as_str().expect("batch id");
    let failed = batch_becomes(&client, &stack, &key, second, "failed").await;
    let errors = failed["errors"]["data"].as_array().expect("errors");
    assert_eq!(errors.len(), 1, "{failed}");
    assert_eq!(errors[0]["code"], "request_limit_exceeded", "{failed}");
    assert_eq!(failed["request_counts"]["total"], 0, "{failed}");
    assert!(failed["failed_at"].is_i64(), "{failed}");

    // another tenant has its own count
    let (_, other_file) = upload(&client, &stack.origin, &other_key, &slow_lines(3)).await;
    let other_file = other_file["id"].as_str().expect("file id");
    let (_, _, other) = create_batch(&client, &stack.origin, &other_key, other_file).await;
    let other = other["id"].as_str().expect("batch id");
    batch_becomes(&client, &stack, &other_key, other, "in_progress").await;

    // an override beats the default
    let shown = admin_quotas(
        &stack,
        &[
            "set",
            "--tenant",
            &tenant,
            "--max-enqueued-requests",
            "unlimited",
        ],
    )
    .await;
    assert_eq!(
        quota_line(&shown, "max_enqueued_requests"),
        "max_enqueued_requests\tunlimited\toverride\tused=3"
    );
    let (_, _, third) = create_batch(&client, &stack.origin, &key, file).await;
    let third = third["id"].as_str().expect("batch id");
    batch_becomes(&client, &stack, &key, third, "in_progress").await;
    stack.stop().await.expect("stop");
}

async fn the_stored_bytes_quota_refuses_an_upload_and_stores_nothing(deployment: Deployment) {
    let line = slow_lines(1);
    let size = line.len() as u64;
    let stack = Stack::start(StackOptions {
        quotas: QuotaSettings {
            // room for two files of `line`, not three
            max_stored_bytes: 2 * size + size / 2,
            ..QuotaSettings::default()
        },
        ..StackOptions::on(deployment)
    })
    .await
    .expect("stack");
    let client = Client::new();
    let (tenant, key) = stack.tenant("storage").await.expect("tenant");
    let (_, other_key) = stack.tenant("other").await.expect("tenant");
    let mut kept = Vec::new();
    for _ in 0..2 {
        let (status, body) = upload(&client, &stack.origin, &key, &line).await;
        assert_eq!(status, StatusCode::OK, "under the quota: {body}");
        kept.push(body["id"].as_str().expect("file id").to_owned());
    }
    let (status, body) = upload(&client, &stack.origin, &key, &line).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_error(&body, "invalid_request_error", "storage_quota_exceeded");
    assert_eq!(body["error"]["param"], "file", "{body}");
    // nothing of the refused upload is stored or listed
    let mut expected: Vec<String> = kept.iter().map(|id| format!("files/{id}")).collect();
    expected.sort();
    eventually("only the kept objects", Duration::from_secs(10), || async {
        let mut keys = stack.object_keys("files/").await?;
        keys.sort();
        anyhow::ensure!(keys == expected, "{keys:?}");
        Ok(())
    })
    .await
    .expect("objects");
    let listed: Value = client
        .get(format!("{}/v1/files", stack.origin))
        .bearer_auth(&key)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("JSON list");
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(2), "{listed}");

    // another tenant has its own bytes
    let (status, body) = upload(&client, &stack.origin, &other_key, &line).await;
    assert_eq!(status, StatusCode::OK, "another tenant: {body}");

    // a deleted file frees its bytes
    let resp = client
        .delete(format!("{}/v1/files/{}", stack.origin, kept[0]))
        .bearer_auth(&key)
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status(), StatusCode::OK);
    let (status, body) = upload(&client, &stack.origin, &key, &line).await;
    assert_eq!(status, StatusCode::OK, "after a delete: {body}");

    // an override beats the default: more room, then none at all (refused before storing)
    let limit = (4 * size).to_string();
    let shown = admin_quotas(
        &stack,
        &["set", "--tenant", &tenant, "--max-stored-bytes", &limit],
    )
    .await;
    assert_eq!(
        quota_line(&shown, "max_stored_bytes"),
        format!("max_stored_bytes\t{limit}\toverride\tused={}", 2 * size)
    );
    let (status, body) = upload(&client, &stack.origin, &key, &line).await;
    assert_eq!(status, StatusCode::OK, "under the override: {body}");
    admin_quotas(
        &stack,
        &["set", "--tenant", &tenant, "--max-stored-bytes", "1"],
    )
    .await;
    let (status, body) = upload(&client, &stack.origin, &key, &line).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_error(&body, "invalid_request_error", "storage_quota_exceeded");
    stack.stop().await.expect("stop");
}
