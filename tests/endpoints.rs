//! End-to-end: a batch per endpoint beyond chat and embeddings (`tests/pipeline.rs`) —
//! `/v1/responses`, `/v1/moderations` and `/v1/completions` — runs through the whole pipeline
//! on both deployments against the simulator, checked with the official Python SDK's own
//! types: every line once, an upstream 400 on its own line, and the batch `usage` the sum of
//! the lines' (Responses' `input_tokens`/`output_tokens` shape; nothing for moderations).

use std::time::Duration;

use nightshift_core::routing::{RoutingConfig, UpstreamConfig};
use nightshift_e2e::{Deployment, Stack, StackOptions, TEST_MODELS, for_both_deployments};
use nightshift_inference_sim::SimConfig;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The model a moderations batch names, as OpenAI's users write it.
const MODERATION_MODEL: &str = "omni-moderation-latest";

/// A simulator of this test's own, routed the test models and [`MODERATION_MODEL`] (the
/// harness's simulator is routed the test models only).
struct Upstream {
    routing: RoutingConfig,
    stop: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Upstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let origin = format!("http://{}", listener.local_addr().expect("addr"));
        let stop = CancellationToken::new();
        let task = tokio::spawn(nightshift_inference_sim::serve(
            SimConfig::default(),
            listener,
            stop.clone(),
        ));
        let models = TEST_MODELS.iter().copied().chain([MODERATION_MODEL]);
        let routing = RoutingConfig {
            upstreams: vec![UpstreamConfig {
                backoff_base: Duration::from_millis(5),
                backoff_max: Duration::from_millis(50),
                ..UpstreamConfig::new("sim", format!("{origin}/v1"), models)
            }],
        };
        Self {
            routing,
            stop,
            task,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("join").expect("simulator");
    }
}

/// Runs `endpoints_batch.py` for `endpoint`; returns what it reported.
async fn run_batch(deployment: Deployment, endpoint: &str) -> serde_json::Value {
    let upstream = Upstream::start().await;
    let stack = Stack::start(StackOptions {
        routing: Some(upstream.routing.clone()),
        ..StackOptions::on(deployment)
    })
    .await
    .expect("stack");
    let (_, key) = stack.tenant("endpoints").await.expect("tenant");
    let out = stack
        .python(
            "endpoints_batch.py",
            &[("NS_API_KEY", key), ("NS_ENDPOINT", endpoint.to_owned())],
        )
        .await
        .expect("script");
    stack.stop().await.expect("stop");
    upstream.stop().await;
    serde_json::from_str(out.lines().last().unwrap_or_default()).expect("result line")
}

async fn a_responses_batch_sums_responses_usage(deployment: Deployment) {
    let report = run_batch(deployment, "/v1/responses").await;
    assert_eq!(report["ok"], true, "{report}");
    assert!(
        report["usage"]["input_tokens"].as_u64() > Some(0),
        "{report}"
    );
    assert!(
        report["usage"]["output_tokens"].as_u64() > Some(0),
        "{report}"
    );
}

async fn a_moderations_batch_completes_with_zero_usage(deployment: Deployment) {
    let report = run_batch(deployment, "/v1/moderations").await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["usage"]["total_tokens"], 0, "{report}");
}

async fn a_completions_batch_sums_completions_usage(deployment: Deployment) {
    let report = run_batch(deployment, "/v1/completions").await;
    assert_eq!(report["ok"], true, "{report}");
    assert!(
        report["usage"]["output_tokens"].as_u64() > Some(0),
        "{report}"
    );
}

/// The model the declared-endpoint batches name, routed to an upstream that declares vLLM's
/// `/v1/rerank` and `/v1/score` (the test models go to one that declares nothing).
const RERANK_MODEL: &str = "sim-rerank";

async fn declared_endpoints_run_verbatim_only_where_declared(deployment: Deployment) {
    let upstream = Upstream::start().await;
    let sim = upstream.routing.upstreams[0].clone();
    let routing = RoutingConfig {
        upstreams: vec![
            UpstreamConfig {
                name: "rerankers".into(),
                models: vec![RERANK_MODEL.into()],
                endpoints: vec!["/v1/rerank".into(), "/v1/score".into()],
                ..sim.clone()
            },
            sim,
        ],
    };
    routing.validate().expect("a valid table");
    let stack = Stack::start(StackOptions {
        routing: Some(routing),
        ..StackOptions::on(deployment)
    })
    .await
    .expect("stack");
    let (_, key) = stack.tenant("declared").await.expect("tenant");
    let out = stack
        .python("endpoints_declared.py", &[("NS_API_KEY", key)])
        .await
        .expect("script");
    stack.stop().await.expect("stop");
    upstream.stop().await;
    let report: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or_default()).expect("result line");
    assert_eq!(report["ok"], true, "{report}");
}

for_both_deployments!(
    declared_endpoints_run_verbatim_only_where_declared,
    a_responses_batch_sums_responses_usage,
    a_moderations_batch_completes_with_zero_usage,
    a_completions_batch_sums_completions_usage,
);
