//! End-to-end against a real inference server, not the simulator: llama.cpp's `llama-server`
//! with a small real model (`make test-real` builds and starts it: `deploy/dev/llama.sh`). A
//! chat, a completions and an embeddings batch run through both deployments; the batch usage
//! must be exactly the sum of the lines' real usage, and a prompt longer than the server's
//! context must be the server's own 400 on its own line while the rest of its batch succeeds.
//!
//! `#[ignore]`d, like the chaos suite: the parallel run never needs the server. Run them with
//! `NIGHTSHIFT_REAL_UPSTREAM=http://127.0.0.1:18100/v1 cargo nextest run -p nightshift-e2e
//! --test real --run-ignored only` (what `make test-real` does).

use std::time::Duration;

use nightshift_core::routing::{RoutingConfig, UpstreamConfig};
use nightshift_e2e::{Deployment, Stack, StackOptions};

/// The environment variable naming the server's base URL (its OpenAI API root).
const UPSTREAM_VAR: &str = "NIGHTSHIFT_REAL_UPSTREAM";

async fn real_batches_sum_real_usage_and_keep_an_upstream_400_on_its_line(deployment: Deployment) {
    let base_url = std::env::var(UPSTREAM_VAR).unwrap_or_else(|_| {
        panic!("{UPSTREAM_VAR} must name the real server's base URL (see `make test-real`)")
    });
    let routing = RoutingConfig {
        upstreams: vec![UpstreamConfig {
            // llama-server runs 4 slots: more in flight only queues there.
            max_concurrency: 4,
            initial_concurrency: Some(4),
            timeout: Duration::from_secs(300),
            ..UpstreamConfig::new("llama", base_url, ["*"])
        }],
    };
    let stack = Stack::start(StackOptions {
        routing: Some(routing),
        ..StackOptions::on(deployment)
    })
    .await
    .expect("stack");
    let (_, key) = stack.tenant("real").await.expect("tenant");
    let out = stack
        .python("real_upstream.py", &[("NS_API_KEY", key)])
        .await
        .expect("script");
    stack.stop().await.expect("stop");
    let report: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or_default()).expect("result line");
    assert_eq!(report["ok"], true, "{report}");
}

mod distributed {
    #[tokio::test]
    #[ignore = "needs a real inference server: `make test-real`"]
    async fn real_batches_sum_real_usage_and_keep_an_upstream_400_on_its_line() {
        super::real_batches_sum_real_usage_and_keep_an_upstream_400_on_its_line(
            nightshift_e2e::Deployment::Distributed,
        )
        .await
    }
}

mod standalone {
    #[tokio::test]
    #[ignore = "needs a real inference server: `make test-real`"]
    async fn real_batches_sum_real_usage_and_keep_an_upstream_400_on_its_line() {
        super::real_batches_sum_real_usage_and_keep_an_upstream_400_on_its_line(
            nightshift_e2e::Deployment::Standalone,
        )
        .await
    }
}
