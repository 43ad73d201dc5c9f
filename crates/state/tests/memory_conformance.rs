//! The live-state conformance suite against the in-memory adapter, a fresh one per check.

use std::sync::Arc;

use nightshift_state::MemoryState;
use nightshift_state::conformance::CHECKS;

async fn run(name: &str) {
    let (_, check) = CHECKS
        .iter()
        .find(|(n, _)| *n == name)
        .expect("known check");
    check(Arc::new(MemoryState::new())).await;
}

macro_rules! checks {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { run(stringify!($name)).await }
        )*

        #[test]
        fn every_check_is_run() {
            let ran = [$(stringify!($name)),*];
            for (name, _) in CHECKS {
                assert!(ran.contains(name), "conformance check {name} is not run in memory");
            }
        }
    };
}

checks!(
    record_then_counts,
    duplicates_within_one_call,
    duplicates_across_calls,
    concurrent_records_count_once,
    usage_sums_every_field,
    unknown_batch_is_empty,
    counts_many_keeps_order,
    cancel_flag,
    clear_removes_everything,
    batches_are_independent,
    invalid_input_is_refused_whole,
    large_calls_and_high_lines,
    ping,
);
