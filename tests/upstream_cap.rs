//! One cap across executors (issue 10): an upstream's `max_concurrency` bounds the requests in
//! flight to it from *every* executor together, not from each one.
//!
//! Three executors share one simulator whose own capacity (1000) is far above the configured
//! cap: nothing but nightshift's permit leases keeps the simulator's in-flight peak — which the
//! simulator measures itself — at or below the cap. Before the leases each executor had its
//! own limit, starting at the cap: the peak was up to three times it.

use nightshift_e2e::{Deployment, Stack, StackOptions, for_both_deployments};
use nightshift_inference_sim::SimConfig;
use serde_json::Value;

/// The upstream's `max_concurrency`, shared by the executors.
const CAP: u32 = 8;
/// Executors sharing the chunk queue and the upstream.
const EXECUTORS: usize = 3;
/// Lines of the batch: 40 chunks of 10, so every executor has chunks to run at once.
const LINES: usize = 400;

async fn executors_share_one_cap(deployment: Deployment) {
    let stack = Stack::start(StackOptions {
        executors: EXECUTORS,
        upstream_max_concurrency: CAP,
        sim: SimConfig {
            base_latency_ms: 20,
            max_concurrency: 1000,
            ..SimConfig::default()
        },
        ..StackOptions::on(deployment)
    })
    .await
    .expect("stack");
    let (_, key) = stack.tenant("cap").await.expect("tenant");
    let out = stack
        .python(
            "crash_create.py",
            &[("NS_API_KEY", key.clone()), ("NS_LINES", LINES.to_string())],
        )
        .await
        .expect("create");
    let created: Value =
        serde_json::from_str(out.lines().last().unwrap_or_default()).expect("result line");
    let batch = created["batch"].as_str().expect("batch id").to_owned();
    // Every line completes (throughput is not collapsed by the sharing), exactly once.
    stack
        .python(
            "crash_check.py",
            &[
                ("NS_API_KEY", key),
                ("NS_LINES", LINES.to_string()),
                ("NS_BATCH", batch),
            ],
        )
        .await
        .expect("the batch completes with every line once");

    let stats: Value = reqwest::get(format!("{}/sim/stats", stack.sim_origin))
        .await
        .expect("sim stats")
        .json()
        .await
        .expect("sim stats json");
    let peak = stats["max_in_flight"].as_u64().expect("max_in_flight");
    let requests = stats["requests"]["embeddings"].as_u64().expect("requests");
    assert!(requests >= LINES as u64, "{stats}");
    assert!(
        peak <= u64::from(CAP),
        "{EXECUTORS} executors had {peak} requests in flight at once to an upstream whose \
         max_concurrency is {CAP}: {stats}"
    );
    // The cap is used, not just respected: more than one executor's worth of idling.
    assert!(
        peak > u64::from(CAP / 2),
        "the executors never used more than {peak} of {CAP} permits: {stats}"
    );
    stack.stop().await.expect("stop");
}

for_both_deployments!(executors_share_one_cap);
