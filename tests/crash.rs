//! End-to-end with real processes. Crash safety: `kill -9` of an executor, the finalizer or the
//! scheduler in the middle of a 10,000-line batch, then a fresh process — the batch completes
//! with every custom_id exactly once and exact counts (architecture invariants 1 and 2).

use std::time::Duration;

use nightshift_core::BatchId;
use nightshift_core::batch::BatchStatus;
use nightshift_e2e::cluster::Cluster;
use nightshift_e2e::{eventually, run_python};
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
    cluster
        .create_embeddings_batch(key, LINES)
        .await
        .expect("create")
}

async fn check(cluster: &Cluster, key: &str, batch: &BatchId) {
    cluster
        .check_embeddings_batch(key, LINES, batch)
        .await
        .expect("every custom_id exactly once");
}

/// Polls the live counts until at least `lines` requests finished.
async fn wait_progress(cluster: &Cluster, batch: &BatchId, lines: u64) {
    eventually("progress", Duration::from_secs(120), || async {
        let c = cluster.state.counts(batch.as_str()).await.expect("counts");
        if c.completed + c.failed >= lines {
            return Ok(());
        }
        Err(format!("{c:?}"))
    })
    .await
    .expect("no progress");
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
    eventually("finalizing", Duration::from_secs(120), || async {
        let b = cluster
            .metadata
            .batch(&batch)
            .await
            .expect("get")
            .expect("exists");
        if b.status == BatchStatus::Finalizing || b.status.is_terminal() {
            return Ok(());
        }
        Err(format!("{:?}", b.status))
    })
    .await
    .expect("never finalizing");
    cluster.kill9("finalizer").await.expect("kill");
    cluster.spawn("finalizer").await.expect("fresh finalizer");
    check(&cluster, &key, &batch).await;
    cluster.stop().await.expect("stop");
}

/// Fetches a service's Prometheus text.
async fn metric_sum(port: u16, family: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut text = String::new();
    conn.read_to_string(&mut text).await.expect("read");
    text.lines()
        .filter(|l| l.starts_with(family))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn executors_share_chunks_and_a_small_batch_is_not_stuck_behind_a_big_one() {
    let mut cluster = Cluster::start(sim()).await.expect("cluster");
    cluster.spawn("executor-2").await.expect("second executor");
    let key_a = cluster.tenant("big").await.expect("tenant a");
    let key_b = cluster.tenant("small").await.expect("tenant b");
    let big = create(&cluster, &key_a).await;
    wait_progress(&cluster, &big, 500).await;
    let out = run_python(
        &cluster.origin,
        None,
        "fair_small.py",
        &[
            ("NS_API_KEY", key_a.clone()),
            ("NS_OTHER_API_KEY", key_b),
            ("NS_BIG_BATCH", big.to_string()),
        ],
    )
    .await
    .expect("small batch");
    eprintln!("fairness: {}", out.lines().last().unwrap_or_default());
    check(&cluster, &key_a, &big).await;
    // both executors ran chunks of the batch
    for name in ["executor-1", "executor-2"] {
        let done = metric_sum(
            cluster.port(name),
            "nightshift_executor_chunks_total{outcome=\"completed\"}",
        )
        .await;
        assert!(done > 0.0, "{name} ran no chunk");
    }
    cluster.stop().await.expect("stop");
}
