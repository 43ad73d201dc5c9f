//! The metadata conformance suite against the embedded SQLite adapter: each check on a fresh
//! database file in its own temporary directory.

use nightshift_core::batch::{BatchRecord, BatchStatus, RequestCounts};
use nightshift_core::{BatchId, FileId, apikey};
use nightshift_metadata::{MetadataStore, SqliteConfig, SqliteStore};

/// A store on a new file; the directory lives as long as the returned guard.
async fn fresh() -> (tempfile::TempDir, SqliteConfig, SqliteStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = SqliteConfig {
        path: dir.path().join("metadata.sqlite"),
        ..SqliteConfig::default()
    };
    let store = SqliteStore::open(&config).await.expect("open sqlite");
    (dir, config, store)
}

async fn run(name: &str) {
    let (_dir, _, store) = fresh().await;
    nightshift_metadata::conformance::run(name, &store).await;
}

nightshift_metadata::conformance_tests!(run);

#[tokio::test]
async fn data_survives_closing_and_reopening_the_file() {
    let (_dir, config, store) = fresh().await;
    let tenant = store
        .create_tenant("acme", &apikey::digest(&apikey::generate()))
        .await
        .expect("tenant");
    let batch = BatchRecord {
        id: BatchId::generate(),
        tenant_id: tenant.id.clone(),
        endpoint: "/v1/chat/completions".into(),
        input_file_id: FileId::generate().to_string(),
        completion_window: "24h".into(),
        status: BatchStatus::Validating,
        model: None,
        errors: vec![],
        metadata: Some([("team".to_string(), "ml".to_string())].into()),
        output_expires_after_secs: 3600,
        output_file_id: None,
        error_file_id: None,
        created_at_us: 1_800_000_000_000_000,
        in_progress_at: None,
        expires_at: 1_800_086_400,
        finalizing_at: None,
        completed_at: None,
        failed_at: None,
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
        request_counts: RequestCounts::default(),
        usage: Default::default(),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
    };
    store.insert_batch(&batch).await.expect("insert");
    drop(store);

    // Opening again runs the migrations again: already applied, they must be a no-op.
    let store = SqliteStore::open(&config).await.expect("reopen");
    assert_eq!(
        store.get_batch(&tenant.id, &batch.id).await.expect("get"),
        Some(batch)
    );
}
