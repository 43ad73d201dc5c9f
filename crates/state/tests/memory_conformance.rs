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

nightshift_state::conformance_tests!(run);
