//! End-to-end: `Idempotency-Key` on `POST /v1/files` and `POST /v1/batches` (docs/api.md), on
//! both deployments, driven by the official Python SDK (`tests/python/idem_create.py`): the
//! same key returns the same object and creates nothing — not even a stray object in storage
//! from a loser of a race — a key reused with another request is a 409, and keys survive a
//! gateway restart (they live in the metadata store, behind the scheduler).

use std::collections::BTreeSet;
use std::net::SocketAddr;

use nightshift_e2e::{Deployment, Stack, StackOptions, for_both_deployments, run_python};
use nightshift_gateway::{GatewayConfig, GatewayPorts};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The ids of the `files/<id>` objects in the stack's storage.
async fn stored_file_ids(stack: &Stack) -> BTreeSet<String> {
    stack
        .object_keys("files/")
        .await
        .expect("list objects")
        .into_iter()
        .filter_map(|k| k.rsplit('/').next().map(str::to_owned))
        .collect()
}

async fn the_same_key_makes_one_object(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let (_, key) = stack.tenant("idem").await.expect("tenant");
    let out = stack
        .python(
            "idem_create.py",
            &[("NS_API_KEY", key), ("NS_PHASE", "all".into())],
        )
        .await
        .expect("script");
    let report: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or_default()).expect("report");
    assert_eq!(report["ok"], true, "{report}");
    let listed: BTreeSet<String> = report["file_ids"]
        .as_array()
        .expect("file ids")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    // Every request that lost a race (or was a replay) left no bytes behind: storage holds
    // exactly the files the API lists (this tenant is the stack's only one with files).
    assert_eq!(stored_file_ids(&stack).await, listed);
    stack.stop().await.expect("stop");
}

/// A second gateway, with nothing in memory, on the same scheduler.
async fn second_gateway(stack: &Stack) -> (String, CancellationToken, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ops = TcpListener::bind("127.0.0.1:0").await.expect("bind ops");
    let origin = format!("http://{}", listener.local_addr().expect("addr"));
    let config = GatewayConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        scheduler_url: stack.scheduler_url.clone(),
        internal_token: Some(stack.internal_token.clone()),
        completion_windows: vec!["24h".into()],
        ..GatewayConfig::default()
    };
    let ports = GatewayPorts {
        storage: stack.storage.clone(),
        state: stack.state.clone(),
    };
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        nightshift_gateway::serve(config, ports, listener, ops, token)
            .await
            .expect("second gateway");
    });
    (origin, stop, task)
}

async fn keys_outlive_the_gateway(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let (_, key) = stack.tenant("idem-restart").await.expect("tenant");
    let prefix = uuid::Uuid::new_v4().simple().to_string();
    let env = |phase: &str| {
        vec![
            ("NS_API_KEY", key.clone()),
            ("NS_PHASE", phase.to_owned()),
            ("NS_KEY_PREFIX", prefix.clone()),
        ]
    };
    let first = stack
        .python("idem_create.py", &env("first"))
        .await
        .expect("first");
    let (origin, stop, task) = second_gateway(&stack).await;
    let second = run_python(&origin, None, "idem_create.py", &env("second"))
        .await
        .expect("second");
    stop.cancel();
    task.await.expect("join");
    let last = |out: &str| -> serde_json::Value {
        serde_json::from_str(out.lines().last().unwrap_or_default()).expect("report")
    };
    let (first, second) = (last(&first), last(&second));
    assert_eq!(first["file_id"], second["file_id"], "{first} {second}");
    assert_eq!(first["batch_id"], second["batch_id"], "{first} {second}");
    assert_eq!(
        stored_file_ids(&stack).await,
        BTreeSet::from([first["file_id"].as_str().expect("id").to_owned()])
    );
    stack.stop().await.expect("stop");
}

for_both_deployments!(the_same_key_makes_one_object, keys_outlive_the_gateway);
