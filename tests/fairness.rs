//! End-to-end: one tenant cannot starve another of shared work (issue 11).
//!
//! Validation slots are shared fairly between tenants: while tenant A has many large inputs
//! queued for validation, tenant B's one-line batch is validated (and runs) without waiting
//! for A's queue to drain.

use std::time::Duration;

use nightshift_e2e::http::upload_batch_file_id;
use nightshift_e2e::{
    Deployment, Stack, StackOptions, TEST_MODELS, eventually, for_both_deployments,
};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

/// Uploads `content` as a `batch` file; returns its id.
async fn upload(client: &Client, origin: &str, key: &str, content: String) -> String {
    upload_batch_file_id(client, origin, key, content.as_bytes()).await
}

async fn create_batch(client: &Client, origin: &str, key: &str, file_id: &str) -> String {
    let resp = client
        .post(format!("{origin}/v1/batches"))
        .bearer_auth(key)
        .json(&json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
        .send()
        .await
        .expect("create");
    let status = resp.status();
    let batch: Value = resp.json().await.expect("batch object");
    assert_eq!(status, StatusCode::OK, "{batch}");
    batch["id"].as_str().expect("id").to_owned()
}

fn chat_line(custom_id: &str, model: &str, padding: usize) -> String {
    json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": "p".repeat(padding)}]},
    })
    .to_string()
}

/// Tenant A queues many batches whose ~12 MB inputs each take a while to validate (every line
/// is read and checked; they name a model nobody serves, so they fail at the end and run
/// nothing). Tenant B's one-line batch, created after all of them, must get past validation
/// while most of A's are still `validating` — with one FIFO queue it would come last.
async fn validation_is_fair_between_tenants(deployment: Deployment) {
    const A_BATCHES: usize = 24;
    const A_INPUT_BYTES: usize = 12 * 1024 * 1024;
    let mut opts = StackOptions::on(deployment);
    opts.batches.max_file_bytes = 64 * 1024 * 1024;
    opts.batches.max_lines = 1_000_000;
    opts.batches.validation_concurrency = 4;
    let stack = Stack::start(opts).await.expect("stack");
    let (_, key_a) = stack.tenant("heavy").await.expect("tenant A");
    let (_, key_b) = stack.tenant("light").await.expect("tenant B");
    let client = Client::new();

    let mut big = String::with_capacity(A_INPUT_BYTES + 1024);
    let mut i = 0;
    while big.len() < A_INPUT_BYTES {
        big.push_str(&chat_line(&format!("a-{i}"), "model-nobody-serves", 200));
        big.push('\n');
        i += 1;
    }
    let a_file = upload(&client, &stack.origin, &key_a, big).await;
    let mut a_batches = Vec::new();
    for _ in 0..A_BATCHES {
        a_batches.push(create_batch(&client, &stack.origin, &key_a, &a_file).await);
    }
    let b_file = upload(
        &client,
        &stack.origin,
        &key_b,
        chat_line("b-0", TEST_MODELS[0], 10),
    )
    .await;
    let b_batch = create_batch(&client, &stack.origin, &key_b, &b_file).await;

    let origin = stack.origin.clone();
    let a_validating_when_b_passed =
        eventually("B's batch past validation", Duration::from_secs(60), || {
            let (client, origin, key_a, key_b, b_batch) = (
                client.clone(),
                origin.clone(),
                key_a.clone(),
                key_b.clone(),
                b_batch.clone(),
            );
            async move {
                let b: Value = client
                    .get(format!("{origin}/v1/batches/{b_batch}"))
                    .bearer_auth(&key_b)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .json()
                    .await
                    .map_err(|e| e.to_string())?;
                match b["status"].as_str() {
                    Some("validating") => return Err("B still validating".to_owned()),
                    Some("in_progress" | "finalizing" | "completed") => {}
                    _ => panic!("B's batch went wrong: {b}"),
                }
                // B is past validation: how many of A's still wait (or run)?
                let page: Value = client
                    .get(format!("{origin}/v1/batches?limit=100"))
                    .bearer_auth(&key_a)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .json()
                    .await
                    .map_err(|e| e.to_string())?;
                let validating = page["data"]
                    .as_array()
                    .expect("data")
                    .iter()
                    .filter(|b| b["status"] == "validating")
                    .count();
                Ok(validating)
            }
        })
        .await
        .expect("B validated");
    assert!(
        a_validating_when_b_passed >= A_BATCHES / 2,
        "B's one-line batch waited behind A's queue: only {a_validating_when_b_passed} of A's \
         {A_BATCHES} batches were still validating when it passed"
    );

    // Tenant A is served too: its batches all end (failed: nobody serves the model).
    let origin = stack.origin.clone();
    eventually("A's batches all failed", Duration::from_secs(120), || {
        let (client, origin, key_a) = (client.clone(), origin.clone(), key_a.clone());
        async move {
            let page: Value = client
                .get(format!("{origin}/v1/batches?limit=100"))
                .bearer_auth(&key_a)
                .send()
                .await
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            let data = page["data"].as_array().expect("data");
            let failed = data.iter().filter(|b| b["status"] == "failed").count();
            if failed == A_BATCHES {
                let code = &data[0]["errors"]["data"][0]["code"];
                assert_eq!(code, "model_not_found", "{}", data[0]);
                Ok(())
            } else {
                Err(format!("{failed} of {A_BATCHES} failed"))
            }
        }
    })
    .await
    .expect("A's batches end");
    assert_eq!(a_batches.len(), A_BATCHES);
    stack.stop().await.expect("stop");
}

for_both_deployments!(validation_is_fair_between_tenants);
