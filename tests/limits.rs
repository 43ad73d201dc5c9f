//! End-to-end: what one tenant stores can never stop it (or anyone) from listing, and the
//! identifiers a client sends are bounded at the edge (issue 11).
//!
//! - Lists never fail on size: a gRPC message is capped at 4 MiB, so the scheduler cuts a
//!   page before its encoded size passes a budget (`has_more` true, the cursor right). Proven
//!   with 100 failed batches of more than 1,000 validation errors each, and 10,000 files with
//!   long names.
//! - A failed batch lists its first `max_errors` errors and one last error saying how many
//!   more there were.
//! - Filenames and `custom_id`s have documented maxima, named in the error (metadata's are
//!   checked in `batches_api.py`).
//! - A tenant's uploads in progress are bounded: one more is a 429 with `retry-after`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use nightshift_core::file::MAX_FILENAME_BYTES;
use nightshift_core::validation::MAX_CUSTOM_ID_CHARS;
use nightshift_core::{FileId, file::FileRecord};
use nightshift_e2e::http::upload_batch_file;
use nightshift_e2e::{Deployment, Stack, StackOptions, eventually, for_both_deployments};
use nightshift_proto::v1;
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

/// Uploads `content` as a `batch` file named `filename`; returns the raw answer.
async fn upload(
    client: &Client,
    origin: &str,
    key: &str,
    filename: &str,
    content: &str,
) -> (StatusCode, Value) {
    upload_batch_file(client, origin, key, filename, content.as_bytes()).await
}

async fn create_batch(
    client: &Client,
    origin: &str,
    key: &str,
    body: &Value,
) -> (StatusCode, Value) {
    let resp = client
        .post(format!("{origin}/v1/batches"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("create");
    let status = resp.status();
    (status, resp.json().await.expect("JSON answer"))
}

async fn get(client: &Client, url: &str, key: &str) -> (StatusCode, Value) {
    let resp = client.get(url).bearer_auth(key).send().await.expect("get");
    let status = resp.status();
    let text = resp.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status} {e}: {text}"));
    (status, body)
}

/// Walks a list from its first page, `limit` per page; returns every id in order and how
/// many pages it took. Each page must be a 200 whose `last_id` is the next cursor.
async fn walk(
    client: &Client,
    origin: &str,
    path: &str,
    key: &str,
    limit: u32,
) -> (Vec<String>, usize) {
    let (mut ids, mut pages, mut after) = (Vec::new(), 0, None::<String>);
    loop {
        let mut url = format!("{origin}{path}?limit={limit}");
        if let Some(a) = &after {
            url.push_str(&format!("&after={a}"));
        }
        let (status, page) = get(client, &url, key).await;
        assert_eq!(status, StatusCode::OK, "{url}: {page}");
        pages += 1;
        let data = page["data"].as_array().expect("data");
        let page_ids: Vec<String> = data
            .iter()
            .map(|o| o["id"].as_str().expect("id").to_owned())
            .collect();
        assert_eq!(
            page["first_id"].as_str(),
            page_ids.first().map(String::as_str)
        );
        assert_eq!(
            page["last_id"].as_str(),
            page_ids.last().map(String::as_str)
        );
        ids.extend(page_ids);
        if page["has_more"] != json!(true) {
            return (ids, pages);
        }
        assert!(!data.is_empty(), "has_more with an empty page");
        after = page["last_id"].as_str().map(str::to_owned);
    }
}

/// 100 failed batches, each with more than 1,000 validation errors: every page of the list
/// answers, the pages are cut to fit (more than one page for `limit=100`), and walking them
/// visits every batch once. Each batch lists its first 1,000 errors and a last one counting
/// the rest.
async fn batch_lists_survive_many_errors(deployment: Deployment) {
    const BATCHES: usize = 100;
    const BAD_LINES: usize = 400; // 4 errors each: no custom_id, method, url or body
    let mut opts = StackOptions::on(deployment);
    opts.batches.max_lines = 10_000;
    opts.batches.max_errors = 1000;
    let stack = Stack::start(opts).await.expect("stack");
    let (_, key) = stack.tenant("errors").await.expect("tenant");
    let client = Client::new();
    // The first line is an object (the upload's JSONL check), the rest are empty objects.
    let mut input = String::from("{\"note\": \"no request here\"}");
    for _ in 0..BAD_LINES {
        input.push_str("\n{}");
    }
    let (status, file) = upload(&client, &stack.origin, &key, "bad.jsonl", &input).await;
    assert_eq!(status, StatusCode::OK, "{file}");
    let file_id = file["id"].as_str().expect("file id").to_owned();

    let mut created = BTreeSet::new();
    for _ in 0..BATCHES {
        let (status, b) = create_batch(
            &client,
            &stack.origin,
            &key,
            &json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{b}");
        created.insert(b["id"].as_str().expect("id").to_owned());
    }
    let (client2, origin, key2) = (client.clone(), stack.origin.clone(), key.clone());
    let failed = Arc::new(created.clone());
    eventually("every batch failed", Duration::from_secs(60), || {
        let (client, origin, key, failed) = (
            client2.clone(),
            origin.clone(),
            key2.clone(),
            failed.clone(),
        );
        async move {
            let mut left = 0;
            for id in failed.iter() {
                let (_, b) = get(&client, &format!("{origin}/v1/batches/{id}"), &key).await;
                if b["status"] != "failed" {
                    left += 1;
                }
            }
            if left == 0 {
                Ok(())
            } else {
                Err(format!("{left} not failed yet"))
            }
        }
    })
    .await
    .expect("batches failed");

    let id = created.iter().next().expect("a batch");
    let (_, b) = get(&client, &format!("{}/v1/batches/{id}", stack.origin), &key).await;
    let errors = b["errors"]["data"].as_array().expect("errors.data");
    assert_eq!(errors.len(), 1001, "1,000 errors and the summary");
    let last = &errors[1000];
    assert_eq!(last["code"], "too_many_errors", "{last}");
    // Every line lacks the four keys: at least 4 × BAD_LINES errors were found.
    let message = last["message"].as_str().expect("message");
    let more: usize = message
        .split_whitespace()
        .find_map(|w| w.replace(',', "").parse().ok())
        .unwrap_or_else(|| panic!("a count in {message:?}"));
    assert!(more + 1000 >= 4 * BAD_LINES, "{message}");

    let (ids, pages) = walk(&client, &stack.origin, "/v1/batches", &key, 100).await;
    assert!(
        pages > 1,
        "100 batches of 1,000 errors do not fit one gRPC message"
    );
    assert_eq!(ids.len(), BATCHES, "each batch once");
    assert_eq!(ids.iter().cloned().collect::<BTreeSet<_>>(), created);
    stack.stop().await.expect("stop");
}

/// 10,000 files with long names (registered straight with the scheduler, as a client that
/// uploaded them before filenames were bounded might have): `limit=10000` answers with a page
/// cut to fit, and walking the pages visits every file once.
async fn file_lists_survive_ten_thousand_files(deployment: Deployment) {
    const FILES: usize = 10_000;
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let (tenant, key) = stack.tenant("files").await.expect("tenant");
    let control = stack.control().expect("control");
    let name = "n".repeat(400);
    let mut workers = tokio::task::JoinSet::new();
    const WORKERS: usize = 16;
    for w in 0..WORKERS {
        let (control, tenant, name) = (control.clone(), tenant.clone(), name.clone());
        workers.spawn(async move {
            let mut ids = Vec::new();
            for _ in (w..FILES).step_by(WORKERS) {
                let id = FileId::generate();
                control
                    .files()
                    .register_file(v1::RegisterFileRequest {
                        tenant_id: tenant.clone(),
                        id: id.to_string(),
                        bytes: 1,
                        filename: name.clone(),
                        purpose: "user_data".into(),
                        storage_key: FileRecord::storage_key_for(&id),
                        expires_after_seconds: None,
                    })
                    .await
                    .expect("register");
                ids.push(id.to_string());
            }
            ids
        });
    }
    let mut registered = BTreeSet::new();
    while let Some(ids) = workers.join_next().await {
        registered.extend(ids.expect("worker"));
    }
    let client = Client::new();
    let (ids, pages) = walk(&client, &stack.origin, "/v1/files", &key, 10_000).await;
    assert!(
        pages > 1,
        "10,000 files with long names do not fit one gRPC message"
    );
    assert_eq!(ids.len(), FILES, "each file once");
    assert_eq!(ids.into_iter().collect::<BTreeSet<_>>(), registered);
    stack.stop().await.expect("stop");
}

fn assert_invalid(status: StatusCode, body: &Value, param: &str) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert_eq!(body["error"]["param"], param, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

/// Filenames are bounded (bytes, no control characters) at upload; an over-long `custom_id`
/// fails the batch's validation naming `custom_id`.
async fn identifiers_are_bounded_at_the_edge(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let (_, key) = stack.tenant("bounds").await.expect("tenant");
    let client = Client::new();
    let line = |custom_id: &str| {
        json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
               "body": {"model": nightshift_e2e::TEST_MODELS[0], "messages": [{"role": "user", "content": "hi"}]}})
        .to_string()
    };

    let longest = "f".repeat(MAX_FILENAME_BYTES - 6) + ".jsonl";
    let (status, ok) = upload(&client, &stack.origin, &key, &longest, &line("a")).await;
    assert_eq!(status, StatusCode::OK, "{ok}");
    assert_eq!(ok["filename"], longest.as_str());
    let too_long = "f".repeat(MAX_FILENAME_BYTES) + ".jsonl";
    let (status, e) = upload(&client, &stack.origin, &key, &too_long, &line("a")).await;
    assert_invalid(status, &e, "file");
    assert_eq!(e["error"]["code"], "invalid_filename", "{e}");
    // A control character in the header itself is refused by the form parser already.
    let (status, e) = upload(&client, &stack.origin, &key, "in\u{7}put.jsonl", &line("a")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");

    // custom_id: the longest passes, one more character fails validation naming it.
    let input = format!(
        "{}\n{}",
        line(&"c".repeat(MAX_CUSTOM_ID_CHARS)),
        line(&"d".repeat(MAX_CUSTOM_ID_CHARS + 1))
    );
    let (status, file) = upload(&client, &stack.origin, &key, "ids.jsonl", &input).await;
    assert_eq!(status, StatusCode::OK, "{file}");
    let (status, b) = create_batch(
        &client,
        &stack.origin,
        &key,
        &json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{b}");
    let id = b["id"].as_str().expect("id").to_owned();
    let (client2, origin, key2) = (client.clone(), stack.origin.clone(), key.clone());
    let failed = eventually("batch failed", Duration::from_secs(30), || {
        let (client, origin, key, id) = (client2.clone(), origin.clone(), key2.clone(), id.clone());
        async move {
            let (_, b) = get(&client, &format!("{origin}/v1/batches/{id}"), &key).await;
            if b["status"] == "failed" {
                Ok(b)
            } else {
                Err(b.to_string())
            }
        }
    })
    .await
    .expect("failed");
    let errors = failed["errors"]["data"].as_array().expect("errors");
    assert_eq!(errors.len(), 1, "{failed}");
    assert_eq!(errors[0]["line"], 2);
    assert_eq!(errors[0]["param"], "custom_id");
    assert_eq!(errors[0]["code"], "invalid_value");
    stack.stop().await.expect("stop");
}

/// Starts an upload on a raw connection that declares `declared` bytes, and returns once the
/// gateway has admitted it: the request says `Expect: 100-continue`, and the gateway only reads
/// (and so only answers `100 Continue`) past its upload bound. It then sends the form's first
/// part and stalls: the upload stays in progress until the connection is dropped.
///
/// Waiting for the admission is what makes the bound testable: an upload whose head was merely
/// sent may be admitted after the extra one a test sends next (which then takes the room this
/// one was meant to fill, and this one is refused), and an upload refused because the
/// previous phase's abandoned uploads are not released yet must be sent again.
async fn stalled_upload(origin: &str, key: &str, declared: u64) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = origin.trim_start_matches("http://").to_owned();
    let boundary = "nightshift-stalled";
    let head = format!(
        "POST /v1/files HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {declared}\r\n\
         Expect: 100-continue\r\n\r\n"
    );
    let first_part = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"slow.jsonl\"\r\n\r\n{{\"a\": 1}}\n"
    );
    eventually("a stalled upload admitted", Duration::from_secs(30), || {
        let (addr, head, first_part) = (addr.clone(), head.clone(), first_part.clone());
        async move {
            let mut conn = tokio::net::TcpStream::connect(&addr)
                .await
                .map_err(|e| e.to_string())?;
            conn.write_all(head.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            // The first answer's head: `100 Continue` (admitted) or the refusal.
            let mut answer = Vec::new();
            let mut byte = [0u8; 1];
            while !answer.ends_with(b"\r\n\r\n") {
                let n = conn.read(&mut byte).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err(format!(
                        "connection closed: {}",
                        String::from_utf8_lossy(&answer)
                    ));
                }
                answer.push(byte[0]);
            }
            if !answer.starts_with(b"HTTP/1.1 100 ") {
                // Refused (the previous phase's uploads still hold their share): again.
                return Err(String::from_utf8_lossy(&answer).into_owned());
            }
            conn.write_all(first_part.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            conn.flush().await.map_err(|e| e.to_string())?;
            Ok(conn)
        }
    })
    .await
    .expect("stalled upload admitted")
}

/// Expects an upload to be refused with a 429 `code` in the envelope, with `retry-after`, at
/// the first try: the stalled uploads are all admitted already ([`stalled_upload`]).
async fn expect_refused(client: &Client, origin: &str, key: &str, code: &str) {
    let boundary = "nightshift-limits-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nuser_data\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.txt\"\r\n\r\nx\r\n--{boundary}--\r\n"
    );
    let resp = client
        .post(format!("{origin}/v1/files"))
        .bearer_auth(key)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .expect("upload");
    let status = resp.status();
    let retry_after = resp.headers().get("retry-after").cloned();
    let body: Value = resp.json().await.expect("json answer");
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "the upload over the bound must be refused with {code}: {body}"
    );
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert_eq!(
        retry_after.as_ref().and_then(|v| v.to_str().ok()),
        Some("1")
    );
}

/// A tenant's uploads in progress are bounded (count, and declared bytes); one more is a 429
/// with `retry-after`, another tenant's upload goes through meanwhile, and the slots come back
/// when the uploads end.
async fn uploads_in_progress_are_bounded_per_tenant(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let config = nightshift_gateway::GatewayConfig::default();
    let (_, key_a) = stack.tenant("uploader").await.expect("tenant a");
    let (_, key_b) = stack.tenant("bystander").await.expect("tenant b");
    let client = Client::new();

    // Count: as many stalled uploads as allowed, then one more is refused.
    let mut stalled = Vec::new();
    for _ in 0..config.max_concurrent_uploads_per_tenant {
        stalled.push(stalled_upload(&stack.origin, &key_a, 1000).await);
    }
    expect_refused(
        &client,
        &stack.origin,
        &key_a,
        "too_many_concurrent_uploads",
    )
    .await;
    let (status, file) = upload(&client, &stack.origin, &key_b, "b.jsonl", "{\"b\": 1}").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "another tenant is not limited: {file}"
    );
    drop(stalled);
    let (origin, key) = (stack.origin.clone(), key_a.clone());
    eventually("uploads admitted again", Duration::from_secs(30), || {
        let (client, origin, key) = (client.clone(), origin.clone(), key.clone());
        async move {
            let (status, v) = upload(&client, &origin, &key, "a.jsonl", "{\"a\": 1}").await;
            if status == StatusCode::OK {
                Ok(())
            } else {
                Err(format!("{status} {v}"))
            }
        }
    })
    .await
    .expect("slots given back");

    // Bytes: uploads declaring the largest file allowed fill the bytes in flight first.
    let largest = config.max_upload_bytes;
    let fit = (config.max_upload_bytes_in_flight_per_tenant / largest) as usize;
    assert!(
        fit < config.max_concurrent_uploads_per_tenant,
        "the byte bound is the tighter"
    );
    assert_eq!(
        config.max_upload_bytes_in_flight_per_tenant % largest,
        0,
        "no room left for even a small upload"
    );
    let mut stalled = Vec::new();
    for _ in 0..fit {
        stalled.push(stalled_upload(&stack.origin, &key_a, largest).await);
    }
    expect_refused(
        &client,
        &stack.origin,
        &key_a,
        "upload_bytes_in_flight_exceeded",
    )
    .await;
    drop(stalled);

    // Nothing the refused or abandoned uploads sent stays behind.
    let files = walk(&client, &stack.origin, "/v1/files", &key_a, 100)
        .await
        .0;
    assert_eq!(files.len(), 1, "only the one completed upload: {files:?}");
    stack.stop().await.expect("stop");
}

for_both_deployments!(
    batch_lists_survive_many_errors,
    file_lists_survive_ten_thousand_files,
    identifiers_are_bounded_at_the_edge,
    uploads_in_progress_are_bounded_per_tenant,
);
