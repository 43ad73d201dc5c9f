//! The live-state conformance suite against the in-memory adapter, a fresh one per check.

use std::sync::Arc;

use nightshift_state::MemoryState;

async fn run(name: &str) {
    nightshift_state::conformance::run(name, Arc::new(MemoryState::new())).await;
}

nightshift_state::conformance_tests!(run);
