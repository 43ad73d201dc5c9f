//! End-to-end with the real `nightshift executor` process: graceful shutdown honours the
//! service's `shutdown_grace` (issue 9, finding 7). SIGTERM in the middle of a slow chunk:
//! the process ends on its own within its grace (the chunk finished, or was handed back),
//! and the batch completes with every custom_id exactly once; a second signal ends the
//! process at once.

use std::time::Duration;

use nightshift_core::BatchId;
use nightshift_e2e::cluster::{Cluster, ClusterOptions};
use nightshift_e2e::eventually;
use nightshift_inference_sim::SimConfig;
use nightshift_state::LiveState;

/// One chunk of this many lines, run one request at a time.
const LINES: u64 = 40;
/// `run.rs`'s margin past the grace for the last settlements.
const SETTLE_MARGIN: Duration = Duration::from_secs(15);

/// One executor that holds one chunk and runs its requests one by one: with a simulator
/// answering in `latency_ms`, the chunk takes `LINES × latency_ms`.
fn options(latency_ms: u64, grace: Duration) -> ClusterOptions {
    ClusterOptions::new(SimConfig {
        base_latency_ms: latency_ms,
        ..SimConfig::default()
    })
    .set("NIGHTSHIFT_SCHEDULER__BATCHES__CHUNK_MAX_LINES", LINES)
    .set("NIGHTSHIFT_EXECUTOR__PREFETCH", 1)
    .set("NIGHTSHIFT_EXECUTOR__CHUNK_CONCURRENCY", 1)
    .set(
        "NIGHTSHIFT_EXECUTOR__SHUTDOWN_GRACE",
        format!("{}s", grace.as_secs()),
    )
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

/// Polls the live counts until `lines` requests of the batch finished: its chunk is running.
async fn wait_running(cluster: &Cluster, batch: &BatchId, lines: u64) {
    eventually("progress", Duration::from_secs(120), || async {
        let c = cluster.state.counts(batch.as_str()).await.expect("counts");
        if c.completed + c.failed >= lines {
            assert!(
                c.completed + c.failed < LINES,
                "the chunk ended before the test could strike: {c:?}"
            );
            return Ok(());
        }
        Err(format!("{c:?}"))
    })
    .await
    .expect("no progress");
}

/// The chunk needs ~38 s more when SIGTERM arrives: longer than the old fixed 30 s hard
/// stop, well within the configured 45 s grace. The executor must end on its own (exit 0)
/// within the grace, not be cut off.
#[tokio::test]
async fn sigterm_mid_chunk_ends_within_the_configured_grace() {
    let grace = Duration::from_secs(45);
    let mut cluster = Cluster::start_with(options(1_000, grace))
        .await
        .expect("cluster");
    let key = cluster.tenant("shutdown-grace").await.expect("tenant");
    let batch = create(&cluster, &key).await;
    wait_running(&cluster, &batch, 2).await;

    let signalled = tokio::time::Instant::now();
    cluster.signal("executor-1", "TERM").expect("SIGTERM");
    let status = cluster
        .wait_exit(
            "executor-1",
            grace + SETTLE_MARGIN + Duration::from_secs(10),
        )
        .await
        .expect("wait")
        .expect("the executor did not exit within its grace and the settle margin");
    let took = signalled.elapsed();
    eprintln!("executor exited {status} {took:?} after SIGTERM (grace {grace:?})");
    assert!(
        status.success(),
        "the executor was cut off instead of draining within its {grace:?} grace: {status} after {took:?}"
    );
    assert!(
        took <= grace + SETTLE_MARGIN,
        "exited after {took:?}, past its grace {grace:?} + {SETTLE_MARGIN:?}"
    );
    // Whatever the executor did not finish came back to the queue: a fresh one runs it.
    cluster.spawn("executor-2").await.expect("fresh executor");
    check(&cluster, &key, &batch).await;
    cluster.stop().await.expect("stop");
}

/// After the first SIGTERM (the executor is draining its chunk), a second one ends the
/// process at once; the chunk comes back and the batch still completes exactly once.
#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let log_dir = tempfile::tempdir().expect("log dir");
    let mut options =
        options(200, Duration::from_secs(60)).set("NIGHTSHIFT_TELEMETRY__LOG_FILTER", "info");
    options.log_dir = Some(log_dir.path().to_path_buf());
    let mut cluster = Cluster::start_with(options).await.expect("cluster");
    let key = cluster.tenant("shutdown-twice").await.expect("tenant");
    let batch = create(&cluster, &key).await;
    wait_running(&cluster, &batch, 2).await;

    cluster.signal("executor-1", "TERM").expect("first SIGTERM");
    // Two signals close together are one to the process: wait until it is draining.
    let log = log_dir.path().join("executor-1.log");
    eventually(
        "the executor logs its shutdown",
        Duration::from_secs(30),
        || async {
            let logged = std::fs::read_to_string(&log).unwrap_or_default();
            if logged.contains("a second signal exits at once") {
                return Ok(());
            }
            Err(format!("\n{}", cluster.log_tail("executor-1", 20)))
        },
    )
    .await
    .expect("the executor never logged its shutdown");
    cluster
        .signal("executor-1", "TERM")
        .expect("second SIGTERM");
    let status = cluster
        .wait_exit("executor-1", Duration::from_secs(5))
        .await
        .expect("wait")
        .expect("the executor did not exit at the second signal");
    assert_eq!(status.code(), Some(130), "exit status {status}");

    cluster.spawn("executor-2").await.expect("fresh executor");
    check(&cluster, &key, &batch).await;
    cluster.stop().await.expect("stop");
}
