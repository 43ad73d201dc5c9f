//! End-to-end: `GET /v1/batches/{id}/results` (results while the batch runs, an extension) on
//! both deployments. A batch whose last chunk answers seconds after the others is read mid-run
//! (a non-empty strict subset, every line byte-identical to its line in the final files) and
//! after completion (exactly the output file then the error file), with the `kind` filter,
//! another tenant's 404 and the 400s of bad queries. The official SDK uploads and creates;
//! the reads are raw HTTP, as the SDK has no method for an extension.

use nightshift_e2e::{Deployment, Stack, StackOptions, for_both_deployments};

async fn results_stream_what_is_done_and_then_exactly_the_final_files(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let (_, key) = stack.tenant("results").await.expect("tenant");
    let (_, other) = stack.tenant("someone-else").await.expect("tenant");
    let out = stack
        .python(
            "results_running.py",
            &[("NS_API_KEY", key), ("NS_OTHER_KEY", other)],
        )
        .await
        .expect("script");
    let report: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or_default()).expect("result line");
    assert!(report["mid"].as_u64() > Some(0), "{report}");
    assert!(
        report["mid"].as_u64() < report["total"].as_u64(),
        "{report}"
    );
    stack.stop().await.expect("stop");
}

for_both_deployments!(results_stream_what_is_done_and_then_exactly_the_final_files);
