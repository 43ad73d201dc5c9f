//! End-to-end: batches run to their terminal state through the whole pipeline — gateway,
//! scheduler, executors, finalizer — over PostgreSQL, RabbitMQ, Redis, Garage and the
//! inference simulator, driven by the official OpenAI Python SDK.

use nightshift_e2e::{Stack, StackOptions};

#[tokio::test]
async fn seed_001_script_runs_unchanged() {
    let stack = Stack::start(StackOptions::default()).await.expect("stack");
    let (_, key) = stack.tenant("seed").await.expect("tenant");
    let out = stack
        .python_in("fixtures", "seed_001.py", &[("DEEPINFRA_TOKEN", key)])
        .await
        .expect("seed script");
    assert!(out.contains("Uploaded input file: file-"), "{out}");
    assert!(out.contains("Created batch: batch_"), "{out}");
    assert!(
        out.contains("status=in_progress") || out.contains("status=completed"),
        "{out}"
    );
    for id in ["request-0: ", "request-1: "] {
        assert_eq!(out.matches(id).count(), 1, "{id} in {out}");
    }
    stack.stop().await.expect("stop");
}

#[tokio::test]
async fn batches_complete_with_every_outcome_in_the_right_file() {
    let stack = Stack::start(StackOptions {
        executors: 2,
        ..StackOptions::default()
    })
    .await
    .expect("stack");
    let (_, key) = stack.tenant("complete").await.expect("tenant");
    stack
        .python("pipeline_complete.py", &[("NS_API_KEY", key)])
        .await
        .expect("script");
    // finalization cleaned up after itself: only input and result files remain
    let leftovers: Vec<String> = stack
        .object_keys("batches/")
        .await
        .expect("list")
        .into_iter()
        .collect();
    assert!(
        leftovers.is_empty(),
        "result parts left behind: {leftovers:?}"
    );
    stack.stop().await.expect("stop");
}

#[tokio::test]
async fn cancel_mid_run_keeps_finished_work() {
    let stack = Stack::start(StackOptions::default()).await.expect("stack");
    let (_, key) = stack.tenant("cancel").await.expect("tenant");
    stack
        .python("pipeline_cancel.py", &[("NS_API_KEY", key)])
        .await
        .expect("script");
    stack.stop().await.expect("stop");
}

#[tokio::test]
async fn expiry_keeps_finished_work() {
    // 200 requests of 300 ms, at most 4 at a time, cannot finish within the 4 s window
    let stack = Stack::start(StackOptions {
        upstream_max_concurrency: 4,
        ..StackOptions::default()
    })
    .await
    .expect("stack");
    let (_, key) = stack.tenant("expiry").await.expect("tenant");
    stack
        .python("pipeline_expiry.py", &[("NS_API_KEY", key)])
        .await
        .expect("script");
    stack.stop().await.expect("stop");
}
