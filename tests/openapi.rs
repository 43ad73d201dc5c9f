//! End-to-end: the gateway keeps its OpenAPI document (`/v1/openapi.json`). schemathesis
//! (installed into the e2e virtualenv by `make venv`) reads the document from the live gateway
//! and sends what it describes, valid and invalid (`--mode all`): every documented operation,
//! the operations its links chain (upload → read, download, delete; create batch → read,
//! cancel) on real objects. Every response must be documented (status, content type, body
//! schema), and no request may make the server answer 5xx.
//!
//! The run is bounded and reproducible: `NIGHTSHIFT_OPENAPI_SEED` replays a seed (a failure
//! names the one it ran with), `NIGHTSHIFT_OPENAPI_EXAMPLES` sets the examples per operation.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use nightshift_e2e::{Deployment, Stack, StackOptions, for_both_deployments, python_bin};

/// The checks that say "the document is true": schema, status and content type of every
/// response, and no 5xx. (schemathesis's other checks judge API design, e.g. whether an
/// invalid request is refused, not the document.)
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_schema_conformance";

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn the_document_is_true(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let (_, key) = stack.tenant("openapi").await.expect("tenant");
    let seed = env_or("NIGHTSHIFT_OPENAPI_SEED", 13);
    let examples = env_or("NIGHTSHIFT_OPENAPI_EXAMPLES", 25);
    let result = schemathesis(&stack, &key, seed, examples).await;
    stack.stop().await.expect("stop");
    let (ok, output) = result.expect("schemathesis ran");
    eprintln!("{output}");
    assert!(
        ok,
        "schemathesis found responses the OpenAPI document does not describe (seed {seed}; \
         replay with NIGHTSHIFT_OPENAPI_SEED={seed}):\n{output}"
    );
}

/// Runs schemathesis against `stack`: `(passed, its output)`.
async fn schemathesis(
    stack: &Stack,
    key: &str,
    seed: u64,
    examples: u64,
) -> anyhow::Result<(bool, String)> {
    let python = python_bin()?;
    let bin = python.with_file_name("schemathesis");
    anyhow::ensure!(
        bin.exists(),
        "no schemathesis at {} — run `make venv`",
        bin.display()
    );
    let report = tempfile::tempdir()?;
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.arg("run")
        .arg(format!("{}/v1/openapi.json", stack.origin))
        .args(["--url", &format!("{}/v1", stack.origin)])
        .args(["--checks", CHECKS])
        .args(["--mode", "all"])
        .args(["--max-examples", &examples.to_string()])
        .args(["--seed", &seed.to_string()])
        // One worker: with two, schemathesis draws in threads, and CPython 3.11's AST
        // validator is not thread-safe (hypothesis parses lambdas' source to describe them):
        // a run failed once with "AST constructor recursion depth mismatch", no request sent.
        .args(["--workers", "1"])
        .args(["--request-timeout", "20"])
        .args(["--header", &format!("Authorization: Bearer {key}")])
        .args(["--report-dir", &report.path().display().to_string()])
        .args(["--output-truncate", "false"])
        .env("NO_COLOR", "1")
        .env("SCHEMATHESIS_HOOKS", "")
        .current_dir(report.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(240), cmd.output())
        .await
        .context("schemathesis timed out after 240s")??;
    let output = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), output))
}

for_both_deployments!(the_document_is_true);
