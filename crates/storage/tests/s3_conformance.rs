//! The object-storage conformance suite against a real S3 service (the dev Garage by default:
//! `make up` or `deploy/dev/infra.sh up` starts it). Each check runs under its own prefix.

use nightshift_storage::{ObjectStore, S3Config, S3Store};

fn config() -> S3Config {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    S3Config {
        endpoint: Some(env("NIGHTSHIFT_STORAGE__ENDPOINT", "http://127.0.0.1:3900")),
        region: env("NIGHTSHIFT_STORAGE__REGION", "us-east-1"),
        bucket: env("NIGHTSHIFT_STORAGE__BUCKET", "nightshift"),
        access_key_id: Some(env(
            "NIGHTSHIFT_STORAGE__ACCESS_KEY_ID",
            "GK1d224b85150aaabc7eadd95e",
        )),
        secret_access_key: Some(nightshift_core::secret::Secret::new(env(
            "NIGHTSHIFT_STORAGE__SECRET_ACCESS_KEY",
            "04b99fcef4651778881fd9e7d7cab01ed1df0241b092249abb2a27e8c90516e5",
        ))),
        prefix: format!("test/conformance-{}", uuid::Uuid::new_v4()),
        part_size: 5 * 1024 * 1024,
        ..S3Config::default()
    }
}

async fn run(name: &str) {
    let store = S3Store::new(&config()).await.expect("s3 client");
    nightshift_storage::conformance::run(name, &store).await;
    // leave the bucket as we found it
    store.delete_prefix("").await.expect("cleanup");
}

nightshift_storage::conformance_tests!(run);
