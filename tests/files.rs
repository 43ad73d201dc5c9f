//! End-to-end: the Files API through the official OpenAI Python SDK, against the real
//! scheduler and gateway over PostgreSQL and S3 (Garage).

use nightshift_core::page::Order;
use nightshift_core::{FileId, TenantId};
use nightshift_e2e::{Deployment, Stack, StackOptions};
use nightshift_metadata::FileQuery;

/// The JSON object a script printed last.
fn emitted(stdout: &str) -> serde_json::Value {
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("no JSON result line ({e}): {stdout}"))
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

async fn visible_files(stack: &Stack, tenant: &str) -> Vec<String> {
    let tenant = TenantId::parse(tenant).expect("tenant id");
    let q = FileQuery {
        purpose: None,
        limit: 10_000,
        order: Order::Asc,
        after: None,
    };
    stack
        .metadata
        .list_files(&tenant, &q, nightshift_core::time::now_unix())
        .await
        .expect("list")
        .files
        .into_iter()
        .map(|f| f.id.to_string())
        .collect()
}

async fn upload_list_retrieve_download_delete(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let (tenant, key) = stack.tenant("roundtrip").await.expect("tenant");
    let out = stack
        .python("files_roundtrip.py", &[("NS_API_KEY", key)])
        .await
        .expect("script");
    let result = emitted(&out);
    // Deleted files lose their bytes at once; the others are stored under files/<id>.
    let mut expected: Vec<String> = ids(&result["remaining"])
        .iter()
        .map(|id| format!("files/{id}"))
        .collect();
    expected.sort();
    assert_eq!(stack.object_keys("files/").await.expect("list"), expected);
    let mut remaining = ids(&result["remaining"]);
    remaining.sort();
    let mut visible = visible_files(&stack, &tenant).await;
    visible.sort();
    assert_eq!(visible, remaining);
    stack.stop().await.expect("stop");
}

async fn bad_input_is_a_4xx_and_leaves_nothing_behind(deployment: Deployment) {
    let max = 1024 * 1024;
    let stack = Stack::start(StackOptions {
        max_upload_bytes: max,
        ..StackOptions::on(deployment)
    })
    .await
    .expect("stack");
    let (tenant, key) = stack.tenant("errors").await.expect("tenant");
    let out = stack
        .python(
            "files_errors.py",
            &[("NS_API_KEY", key), ("NS_MAX_UPLOAD", max.to_string())],
        )
        .await
        .expect("script");
    let kept = ids(&emitted(&out)["kept"]);
    assert_eq!(kept.len(), 1);
    // Only the one accepted upload exists: no record and no object for any refused one.
    assert_eq!(visible_files(&stack, &tenant).await, kept);
    assert_eq!(
        stack.object_keys("").await.expect("list"),
        vec![format!("files/{}", kept[0])]
    );
    stack.stop().await.expect("stop");
}

async fn tenants_are_isolated(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let (_, key_a) = stack.tenant("a").await.expect("tenant a");
    let (_, key_b) = stack.tenant("b").await.expect("tenant b");
    stack
        .python(
            "files_isolation.py",
            &[("NS_API_KEY", key_a), ("NS_OTHER_API_KEY", key_b)],
        )
        .await
        .expect("script");
    stack.stop().await.expect("stop");
}

async fn expired_files_disappear_and_the_sweeper_deletes_their_bytes(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let (tenant, key) = stack.tenant("expiry").await.expect("tenant");
    let out = stack
        .python(
            "files_expiry.py",
            &[("NS_API_KEY", key.clone()), ("NS_PHASE", "upload".into())],
        )
        .await
        .expect("upload phase");
    let r = emitted(&out);
    let expiring = r["expiring"].as_str().expect("id").to_owned();
    let keep = r["keep"].as_str().expect("id").to_owned();

    // Let an hour pass for this file: move its expiry into the past.
    stack.age_file(&expiring, 3601).await.expect("age the file");
    stack
        .python(
            "files_expiry.py",
            &[
                ("NS_API_KEY", key),
                ("NS_PHASE", "check".into()),
                ("NS_EXPIRED", expiring.clone()),
                ("NS_KEEP", keep.clone()),
            ],
        )
        .await
        .expect("check phase");

    // The bytes stay until the sweeper runs; then they and the record are gone.
    assert!(
        stack
            .object_keys("files/")
            .await
            .expect("list")
            .contains(&format!("files/{expiring}"))
    );
    nightshift_scheduler::sweep_once(&stack.ports, nightshift_core::time::now_unix(), 10_000)
        .await
        .expect("sweep");
    assert_eq!(
        stack.object_keys("files/").await.expect("list"),
        vec![format!("files/{keep}")]
    );
    let gone = FileId::parse(&expiring).expect("id");
    let tenant = TenantId::parse(&tenant).expect("tenant");
    assert!(
        stack
            .metadata
            .get_file(&tenant, &gone, 0)
            .await
            .expect("get")
            .is_none()
    );
    stack.stop().await.expect("stop");
}

nightshift_e2e::for_both_deployments!(
    upload_list_retrieve_download_delete,
    bad_input_is_a_4xx_and_leaves_nothing_behind,
    tenants_are_isolated,
    expired_files_disappear_and_the_sweeper_deletes_their_bytes,
);
