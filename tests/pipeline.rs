//! End-to-end: batches run to their terminal state through the whole pipeline — gateway,
//! scheduler, executors, finalizer — over PostgreSQL, RabbitMQ, Redis, Garage and the
//! inference simulator, driven by the official OpenAI Python SDK.

use std::time::Duration;

use nightshift_core::BatchId;
use nightshift_core::batch::BatchStatus;
use nightshift_e2e::{Deployment, Stack, StackOptions};
use nightshift_queue::QueueKind;

async fn seed_001_script_runs_unchanged(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
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

async fn batches_complete_with_every_outcome_in_the_right_file(deployment: Deployment) {
    let stack = Stack::start(StackOptions {
        executors: 2,
        ..StackOptions::on(deployment)
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

async fn cancel_mid_run_keeps_finished_work(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let (_, key) = stack.tenant("cancel").await.expect("tenant");
    stack
        .python("pipeline_cancel.py", &[("NS_API_KEY", key)])
        .await
        .expect("script");
    stack.stop().await.expect("stop");
}

async fn expiry_keeps_finished_work(deployment: Deployment) {
    // 200 requests of 300 ms, at most 4 at a time, cannot finish within the 4 s window
    let stack = Stack::start(StackOptions {
        upstream_max_concurrency: 4,
        ..StackOptions::on(deployment)
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

async fn a_lost_finalize_job_is_published_again(deployment: Deployment) {
    // No finalizer at first, and a short grace period before a job is re-published.
    let mut stack = Stack::start(StackOptions {
        finalizer: false,
        finalize_retry_after: Duration::from_secs(2),
        ..StackOptions::on(deployment)
    })
    .await
    .expect("stack");
    let (_, key) = stack.tenant("redrive").await.expect("tenant");
    let out = stack
        .python(
            "crash_create.py",
            &[("NS_API_KEY", key.clone()), ("NS_LINES", "30".into())],
        )
        .await
        .expect("create");
    let v: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or_default()).expect("result line");
    let batch = BatchId::parse(v["batch"].as_str().expect("id")).expect("batch id");

    // Wait for its finalize job, and lose it: dead-letter it as a poison message would be.
    let mut jobs = stack
        .queue
        .consume(QueueKind::FinalizeJobs, 1)
        .await
        .expect("consume");
    let job = tokio::time::timeout(Duration::from_secs(60), jobs.next())
        .await
        .expect("a finalize job within 60s")
        .expect("consumer open")
        .expect("delivery");
    job.dead_letter().await.expect("dead-letter");
    drop(jobs);
    let b = stack
        .metadata
        .batch(&batch)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(b.status, BatchStatus::Finalizing);

    // A finalizer now runs; the scheduler publishes the job again after the grace period.
    stack.start_finalizer().await.expect("finalizer");
    stack
        .python(
            "crash_check.py",
            &[
                ("NS_API_KEY", key),
                ("NS_LINES", "30".into()),
                ("NS_BATCH", batch.to_string()),
            ],
        )
        .await
        .expect("the batch completes anyway");
    assert_eq!(
        stack
            .queue
            .dead_lettered(QueueKind::FinalizeJobs)
            .await
            .expect("dlq"),
        1
    );
    stack.stop().await.expect("stop");
}

nightshift_e2e::for_both_deployments!(
    seed_001_script_runs_unchanged,
    batches_complete_with_every_outcome_in_the_right_file,
    cancel_mid_run_keeps_finished_work,
    expiry_keeps_finished_work,
    a_lost_finalize_job_is_published_again,
);
