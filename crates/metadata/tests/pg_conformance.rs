//! The metadata conformance suite against a real PostgreSQL (`make up` provides one; the
//! database is `NIGHTSHIFT_TEST_DATABASE_URL`, default `nightshift_test` on loopback).

use nightshift_core::secret::Secret;
use nightshift_metadata::conformance::CHECKS;
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
    let (_, check) = CHECKS
        .iter()
        .find(|(n, _)| *n == name)
        .expect("known check");
    check(&store).await;
}

macro_rules! checks {
    ($($name:ident),* $(,)?) => {
        $( #[tokio::test] async fn $name() { run(stringify!($name)).await } )*

        #[test]
        fn every_check_is_run() {
            let ran = [$(stringify!($name)),*];
            for (name, _) in CHECKS {
                assert!(ran.contains(name), "conformance check {name} is not run against postgres");
            }
        }
    };
}

checks!(
    tenants_and_keys,
    files_are_scoped_to_their_tenant,
    list_pages_and_cursors,
    expiry_delete_and_sweep,
    ping,
    batch_validation_and_cancel,
    batch_list_pages,
    a_batch_finished_after_its_deadline_expires,
    batch_keeps_its_trace_context,
    stalled_finalizations_are_claimed_once_per_period,
);
