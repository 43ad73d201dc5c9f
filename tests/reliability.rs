//! End-to-end: every batch reaches a terminal state whatever is lost on the way (issue 9).
//!
//! - The owner deletes the input right after creating the batch: the file is gone from the
//!   API at once, its bytes stay until the batch ends, and the batch completes.
//! - A chunk handed out whose task never reached an executor (a publish lost after the claim)
//!   is driven again once its lease expires, and the batch completes.
//! - A cancelled batch, and a batch past its deadline, whose chunk is held by an executor
//!   that hangs (a live lease, never reported on) end `cancelled` / `expired` once the ending
//!   grace is over, with that chunk's lines as `batch_cancelled` / `batch_expired` lines.
//!
//! A "lost" or "hung" chunk is made by claiming it in the metadata store directly, as the
//! dispatcher would, without publishing its task. Deadlines, graces and leases pass by time
//! travel ([`Stack::age_batch`], [`Stack::expire_chunk_lease`]); everything else waits by
//! polling with a deadline.

use std::time::Duration;

use nightshift_core::batch::BatchStatus;
use nightshift_core::time::now_unix;
use nightshift_core::{BatchId, FileId, TenantId};
use nightshift_e2e::{Deployment, Stack, StackOptions, eventually};
use nightshift_metadata::LeasedChunk;
use nightshift_proto::v1::CancelBatchRequest;

/// Lines of each batch: 30 chunks of 10 (the test stacks' `chunk_max_lines`), more than the 8
/// the dispatcher hands out at once, so some are still pending when a test takes one.
const LINES: usize = 300;
/// The simulator's answer time per request: a batch runs for a few seconds.
const LATENCY_MS: u64 = 150;

/// The JSON object a script printed last.
fn emitted(stdout: &str) -> serde_json::Value {
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("no JSON result line ({e}): {stdout}"))
}

async fn status(stack: &Stack, batch: &BatchId) -> BatchStatus {
    stack
        .metadata
        .batch(batch)
        .await
        .expect("get batch")
        .expect("batch exists")
        .status
}

/// Creates a batch of [`LINES`] slow requests; returns it with its input file.
async fn create(stack: &Stack, key: &str, delete_input: bool) -> (BatchId, FileId) {
    let mut env = vec![
        ("NS_API_KEY", key.to_owned()),
        ("NS_LINES", LINES.to_string()),
        ("NS_LATENCY_MS", LATENCY_MS.to_string()),
    ];
    if delete_input {
        env.push(("NS_DELETE_INPUT", "1".into()));
    }
    let out = stack
        .python("reliability_create.py", &env)
        .await
        .expect("create");
    let v = emitted(&out);
    (
        BatchId::parse(v["batch"].as_str().expect("batch id")).expect("batch id"),
        FileId::parse(v["input"].as_str().expect("file id")).expect("file id"),
    )
}

/// Takes a pending chunk of the batch as soon as it runs, as the dispatcher would, leased for
/// an hour, and publishes nothing: its task is "lost", or its executor "hangs".
async fn take_a_chunk(stack: &Stack, batch: &BatchId) -> LeasedChunk {
    eventually(
        "the batch runs",
        Duration::from_secs(60),
        async || match status(stack, batch).await {
            BatchStatus::Validating => Err(BatchStatus::Validating),
            BatchStatus::InProgress => Ok(stack
                .metadata
                .claim_next_chunk(batch, now_unix(), 3600)
                .await
                .expect("claim")
                .expect("a pending chunk (the batch was handed out too fast)")),
            other => panic!("batch {batch} is {other}"),
        },
    )
    .await
    .expect("the batch runs")
}

/// Waits until `chunk` is the batch's only chunk in flight (the others are done, or came
/// back once the batch stopped running).
async fn only_in_flight(stack: &Stack, batch: &BatchId, chunk: u32) {
    eventually(
        "the other chunks came back",
        Duration::from_secs(120),
        || async {
            let dispatched = stack
                .metadata
                .dispatched_chunks(batch)
                .await
                .expect("dispatched");
            let indexes: Vec<u32> = dispatched.iter().map(|c| c.span.index).collect();
            if indexes == [chunk] {
                return Ok(());
            }
            Err(format!("chunks in flight: {indexes:?}"))
        },
    )
    .await
    .expect("the other chunks came back");
}

async fn check(stack: &Stack, key: &str, batch: &BatchId, status: &str, code: Option<&str>) {
    let mut env = vec![
        ("NS_API_KEY", key.to_owned()),
        ("NS_LINES", LINES.to_string()),
        ("NS_BATCH", batch.to_string()),
        ("NS_STATUS", status.to_owned()),
    ];
    if let Some(code) = code {
        env.push(("NS_CODE", code.to_owned()));
    }
    let out = stack
        .python("reliability_check.py", &env)
        .await
        .expect("check");
    let v = emitted(&out);
    if code.is_some() {
        assert!(
            v["failed"].as_u64().unwrap_or(0) >= 10,
            "the held chunk's 10 lines are error lines: {v}"
        );
    }
}

async fn cancel(stack: &Stack, tenant: &str, batch: &BatchId) {
    stack
        .control()
        .expect("control plane")
        .batches()
        .cancel_batch(CancelBatchRequest {
            tenant_id: tenant.to_owned(),
            id: batch.to_string(),
        })
        .await
        .expect("cancel");
}

async fn the_owner_deletes_the_input_right_after_create(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let (tenant, key) = stack.tenant("delete-input").await.expect("tenant");
    // the script checks the file is 404 and unlisted at once
    let (batch, input) = create(&stack, &key, true).await;
    check(&stack, &key, &batch, "completed", None).await;
    // Its bytes outlived the batch; the sweeper reclaims them now that it ended.
    let input_key = format!("files/{input}");
    assert!(
        stack
            .object_keys("files/")
            .await
            .expect("list")
            .contains(&input_key),
        "the input's bytes went while the batch read them"
    );
    nightshift_scheduler::sweep_once(&stack.ports, now_unix(), 10_000)
        .await
        .expect("sweep");
    assert!(
        !stack
            .object_keys("files/")
            .await
            .expect("list")
            .contains(&input_key)
    );
    let tenant = TenantId::parse(&tenant).expect("tenant id");
    assert_eq!(
        stack
            .metadata
            .file_as_of(&tenant, &input, 0)
            .await
            .expect("file"),
        None,
        "the record is purged"
    );
    stack.stop().await.expect("stop");
}

async fn a_chunk_whose_task_was_lost_is_driven_again(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let (_, key) = stack.tenant("lost-task").await.expect("tenant");
    let (batch, _) = create(&stack, &key, false).await;
    let lost = take_a_chunk(&stack, &batch).await;
    // Every other chunk runs; the lost one holds the batch (and its model slot).
    only_in_flight(&stack, &batch, lost.span.index).await;
    assert_eq!(status(&stack, &batch).await, BatchStatus::InProgress);
    // Its lease expires without news: nothing waits in the queue, so the task was lost and
    // is published again.
    stack
        .expire_chunk_lease(batch.as_str(), lost.span.index)
        .await
        .expect("expire the lease");
    check(&stack, &key, &batch, "completed", None).await;
    stack.stop().await.expect("stop");
}

async fn a_cancelled_batch_with_a_hung_chunk_ends_cancelled(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let (tenant, key) = stack.tenant("hung-cancel").await.expect("tenant");
    let (batch, _) = create(&stack, &key, false).await;
    let hung = take_a_chunk(&stack, &batch).await;
    cancel(&stack, &tenant, &batch).await;
    // The live state loses the cancel flag (a Redis flush or restart): it is raised again.
    stack.state.clear(batch.as_str()).await.expect("clear");
    eventually(
        "the cancel flag is raised again",
        Duration::from_secs(30),
        || async {
            let raised = stack
                .state
                .is_cancelled(batch.as_str())
                .await
                .expect("flag");
            if raised { Ok(()) } else { Err("no flag") }
        },
    )
    .await
    .expect("the cancel flag is raised again");
    // The other chunks come back; the hung one's live lease holds the batch, within the
    // ending grace only.
    only_in_flight(&stack, &batch, hung.span.index).await;
    assert_eq!(status(&stack, &batch).await, BatchStatus::Cancelling);
    let grace = nightshift_scheduler::pipeline::PipelineSettings::default().ending_grace;
    stack
        .age_batch(batch.as_str(), grace.as_secs() as i64)
        .await
        .expect("the grace passes");
    check(&stack, &key, &batch, "cancelled", Some("batch_cancelled")).await;
    stack.stop().await.expect("stop");
}

async fn a_batch_past_its_deadline_with_a_hung_chunk_ends_expired(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let (_, key) = stack.tenant("hung-expiry").await.expect("tenant");
    let (batch, _) = create(&stack, &key, false).await;
    let hung = take_a_chunk(&stack, &batch).await;
    only_in_flight(&stack, &batch, hung.span.index).await;
    assert_eq!(status(&stack, &batch).await, BatchStatus::InProgress);
    // Its 24 h pass, and the ending grace after them.
    let grace = nightshift_scheduler::pipeline::PipelineSettings::default().ending_grace;
    stack
        .age_batch(batch.as_str(), 24 * 3600 + grace.as_secs() as i64)
        .await
        .expect("the deadline and the grace pass");
    check(&stack, &key, &batch, "expired", Some("batch_expired")).await;
    stack.stop().await.expect("stop");
}

nightshift_e2e::for_both_deployments!(
    the_owner_deletes_the_input_right_after_create,
    a_chunk_whose_task_was_lost_is_driven_again,
    a_cancelled_batch_with_a_hung_chunk_ends_cancelled,
    a_batch_past_its_deadline_with_a_hung_chunk_ends_expired,
);
