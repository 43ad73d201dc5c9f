//! Batches: the gRPC service and the asynchronous validation that turns an input file into
//! chunks of work.

mod retry;
mod service;
mod validate;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use retry::{NOTHING_TO_RETRY, RETRY_OF, SOURCE_UNAVAILABLE, recover};
pub use service::BatchesService;
pub use validate::{Validator, validate_input};

/// Limits of batch inputs and the size of their chunks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchSettings {
    /// Most requests in one batch (`too_many_tasks` beyond).
    pub max_lines: u64,
    /// Largest input file (`file_too_large` beyond).
    pub max_file_bytes: u64,
    /// Largest single line; a longer one is reported without being held in memory.
    pub max_line_bytes: usize,
    /// Most errors listed in a failed batch's `errors.data` (all are counted).
    pub max_errors: usize,
    /// A chunk closes at this many requests...
    pub chunk_max_lines: u32,
    /// ...or this many bytes, whichever comes first. Chunks are the executors' unit of work
    /// and must finish well within RabbitMQ's 30-minute consumer timeout.
    pub chunk_max_bytes: u64,
    /// Inputs validated at the same time; more wait their turn.
    pub validation_concurrency: usize,
    /// Most of those one tenant holds at once. The slots are shared fairly (each freed slot
    /// goes to the waiting tenant running the fewest); below `validation_concurrency`, a
    /// slot stays free for other tenants even while one tenant has a long queue of inputs.
    pub validation_concurrency_per_tenant: usize,
    /// A validation that cannot read its input or record its outcome (S3 or the metadata
    /// store unreachable) is retried after 1 s, doubling up to this, until the batch's
    /// deadline (then it expires).
    #[serde(with = "humantime_serde")]
    pub validation_retry_max: Duration,
}

impl Default for BatchSettings {
    fn default() -> Self {
        let limits = nightshift_core::validation::ValidationLimits::default();
        Self {
            max_lines: 1_000_000,
            max_file_bytes: 2 * 1024 * 1024 * 1024,
            max_line_bytes: limits.max_line_bytes,
            max_errors: limits.max_errors,
            chunk_max_lines: 500,
            chunk_max_bytes: 4 * 1024 * 1024,
            validation_concurrency: 4,
            validation_concurrency_per_tenant: 3,
            validation_retry_max: Duration::from_secs(30),
        }
    }
}
