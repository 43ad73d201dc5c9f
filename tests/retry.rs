//! End-to-end: `POST /v1/batches/{id}/retry` (docs/api.md, "Retry failed lines") on both
//! deployments, driven by the official Python SDK (`tests/python/retry_lines.py`): a batch
//! whose lines partly fail (the simulator's `sim` directives) is retried whole and by filter;
//! each retry's input is exactly the failed input lines, it runs to its end, and the two are
//! linked both ways; running, foreign, clean and unmatched retries are refused as documented.

use nightshift_e2e::{Deployment, Stack, StackOptions, for_both_deployments};

async fn a_retry_runs_exactly_the_failed_lines(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let (_, key) = stack.tenant("retry").await.expect("tenant");
    let (_, other) = stack.tenant("retry-other").await.expect("tenant");
    let out = stack
        .python(
            "retry_lines.py",
            &[("NS_API_KEY", key), ("NS_OTHER_KEY", other)],
        )
        .await
        .expect("script");
    let report: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or_default()).expect("report");
    assert_eq!(report["ok"], true, "{report}");
    stack.stop().await.expect("stop");
}

for_both_deployments!(a_retry_runs_exactly_the_failed_lines);
