//! The metadata conformance suite against a real PostgreSQL (`make up` provides one; the
//! database is `NIGHTSHIFT_TEST_DATABASE_URL`, default `nightshift_test` on loopback).

use nightshift_core::secret::Secret;
use nightshift_metadata::{PgConfig, PgStore};

async fn run(name: &str) {
    let url = std::env::var("NIGHTSHIFT_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/nightshift_test".into());
    let store = PgStore::connect(&PgConfig {
        url: Secret::new(url),
        ..PgConfig::default()
    })
    .await
    .expect("connect to postgres");
    nightshift_metadata::conformance::run(name, &store).await;
}

nightshift_metadata::conformance_tests!(run);
