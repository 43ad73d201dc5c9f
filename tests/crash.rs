//! End-to-end crash safety with real processes: `kill -9` of an executor, the finalizer or the
//! scheduler in the middle of a 10,000-line batch, then a fresh process — the batch completes
//! with every custom_id exactly once and exact counts (architecture invariants 1 and 2).

use std::time::Duration;

use nightshift_core::BatchId;
use nightshift_core::batch::BatchStatus;
use nightshift_e2e::cluster::Cluster;
use nightshift_e2e::run_python;
use nightshift_inference_sim::SimConfig;
use nightshift_metadata::MetadataStore;
use nightshift_state::LiveState;

const LINES: u64 = 10_000;

fn sim() -> SimConfig {
    // slow enough that the batch is still running when the test strikes
    SimConfig {
        base_latency_ms: 15,
        ..SimConfig::default()
    }
}

async fn create(cluster: &Cluster, key: &str) -> BatchId {
    let out = run_python(
        &cluster.origin,
        None,
        "crash_create.py",
        &[
            ("NS_API_KEY", key.to_owned()),
            ("NS_LINES", LINES.to_string()),
        ],
    )
    .await
    .expect("create phase");
    let v: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or_default()).expect("result line");
    BatchId::parse(v["batch"].as_str().expect("batch id")).expect("batch id")
}

async fn check(cluster: &Cluster, key: &str, batch: &BatchId) {
    run_python(
        &cluster.origin,
        None,
        "crash_check.py",
        &[
            ("NS_API_KEY", key.to_owned()),
            ("NS_LINES", LINES.to_string()),
            ("NS_BATCH", batch.to_string()),
        ],
    )
    .await
    .expect("check phase");
}

/// Polls the live counts until at least `lines` requests finished.
async fn wait_progress(cluster: &Cluster, batch: &BatchId, lines: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let c = cluster.state.counts(batch.as_str()).await.expect("counts");
        if c.completed + c.failed >= lines {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no progress: {c:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn executor_killed_mid_batch() {
    let mut cluster = Cluster::start(sim()).await.expect("cluster");
    let key = cluster.tenant("crash-executor").await.expect("tenant");
    let batch = create(&cluster, &key).await;
    wait_progress(&cluster, &batch, 1_500).await;
    cluster.kill9("executor-1").await.expect("kill");
    // a fresh executor picks up the dead one's chunks (redelivered by RabbitMQ)
    cluster.spawn("executor-2").await.expect("fresh executor");
    check(&cluster, &key, &batch).await;
    cluster.stop().await.expect("stop");
}

#[tokio::test]
async fn scheduler_killed_mid_dispatch() {
    let mut cluster = Cluster::start(sim()).await.expect("cluster");
    let key = cluster.tenant("crash-scheduler").await.expect("tenant");
    let batch = create(&cluster, &key).await;
    wait_progress(&cluster, &batch, 1_500).await;
    cluster.kill9("scheduler").await.expect("kill");
    cluster.spawn("scheduler").await.expect("fresh scheduler");
    check(&cluster, &key, &batch).await;
    cluster.stop().await.expect("stop");
}

#[tokio::test]
async fn finalizer_killed_while_finalizing() {
    let mut cluster = Cluster::start(sim()).await.expect("cluster");
    let key = cluster.tenant("crash-finalizer").await.expect("tenant");
    let batch = create(&cluster, &key).await;
    // strike as soon as the batch is handed to the finalizer
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let b = cluster
            .metadata
            .batch(&batch)
            .await
            .expect("get")
            .expect("exists");
        if b.status == BatchStatus::Finalizing || b.status.is_terminal() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never finalizing: {:?}",
            b.status
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.kill9("finalizer").await.expect("kill");
    cluster.spawn("finalizer").await.expect("fresh finalizer");
    check(&cluster, &key, &batch).await;
    cluster.stop().await.expect("stop");
}
