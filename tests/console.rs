//! End-to-end: the batch console at `/console` in a real headless Chromium (Debian's
//! `chromium`, driven by Playwright from `tests/python/console_browser.py`), against both
//! deployments. The script signs in, creates batches by uploading files through the page,
//! watches one complete and downloads its output and errors, reads a failed batch's
//! validation errors, cancels one, and checks the list; this side then checks that what the
//! page showed is what the metadata store holds.

use std::path::PathBuf;

use nightshift_core::BatchId;
use nightshift_core::batch::BatchStatus;
use nightshift_e2e::{Deployment, Stack, StackOptions, for_both_deployments};

/// The browser: `NIGHTSHIFT_E2E_CHROMIUM`, else Debian's (`make test` installs it).
fn chromium() -> PathBuf {
    let path = std::env::var("NIGHTSHIFT_E2E_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "no Chromium at {} — run `make test` (it installs Debian's) or set NIGHTSHIFT_E2E_CHROMIUM",
        path.display()
    );
    path
}

async fn a_user_runs_batches_from_the_browser(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let (_, key) = stack.tenant("console").await.expect("tenant");
    let work = tempfile::tempdir().expect("tempdir");
    // The list page with a few batches; docs/console.png is a copy of one of these.
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "console-{}.png",
        format!("{deployment:?}").to_lowercase()
    ));
    let _ = std::fs::remove_file(&shot);
    let out = stack
        .python(
            "console_browser.py",
            &[
                ("NS_API_KEY", key),
                ("NS_CHROMIUM", chromium().display().to_string()),
                ("NS_SCREENSHOT", shot.display().to_string()),
                ("NS_WORK_DIR", work.path().display().to_string()),
            ],
        )
        .await
        .expect("the browser script");
    let ids: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or_default()).expect("result line");
    for (name, status) in [
        ("completed", BatchStatus::Completed),
        ("failed", BatchStatus::Failed),
        ("cancelled", BatchStatus::Cancelled),
    ] {
        let id = BatchId::parse(ids[name].as_str().expect("id")).expect("batch id");
        let batch = stack
            .metadata
            .batch(&id)
            .await
            .expect("read")
            .expect("exists");
        assert_eq!(batch.status, status, "{name}: {batch:?}");
    }
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    stack.stop().await.expect("stop");
}

for_both_deployments!(a_user_runs_batches_from_the_browser);
