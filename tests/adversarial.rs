//! End-to-end: an adversarial suite, on both deployments (issue 11). One tenant armed with
//! another's ids learns nothing and changes nothing: every route answers 404 as for an id
//! that never existed (`adversarial_tenants.py`; `files_isolation.py` in `tests/files.rs`
//! covers an uploaded file on the file routes). Wrong, missing and malformed keys are a 401
//! in OpenAI's envelope on every route, and oversized bodies are refused
//! (`adversarial_keys.py`). Driven by the official OpenAI SDK and raw HTTP.

use nightshift_e2e::{Deployment, Stack, StackOptions, for_both_deployments};
use nightshift_gateway::GatewayConfig;

async fn another_tenants_ids_are_404_everywhere(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let (_, key_a) = stack.tenant("victim").await.expect("tenant a");
    let (_, key_b) = stack.tenant("attacker").await.expect("tenant b");
    stack
        .python(
            "adversarial_tenants.py",
            &[("NS_API_KEY", key_a), ("NS_OTHER_API_KEY", key_b)],
        )
        .await
        .expect("script");
    stack.stop().await.expect("stop");
}

async fn bad_keys_are_401_and_big_bodies_refused(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let (_, key) = stack.tenant("keys").await.expect("tenant");
    stack
        .python(
            "adversarial_keys.py",
            &[
                ("NS_API_KEY", key),
                (
                    "NS_MAX_JSON",
                    GatewayConfig::default().max_json_body_bytes.to_string(),
                ),
            ],
        )
        .await
        .expect("script");
    // Nothing any of the refused requests sent was stored.
    assert_eq!(
        stack.object_keys("").await.expect("list"),
        Vec::<String>::new()
    );
    stack.stop().await.expect("stop");
}

for_both_deployments!(
    another_tenants_ids_are_404_everywhere,
    bad_keys_are_401_and_big_bodies_refused,
);
