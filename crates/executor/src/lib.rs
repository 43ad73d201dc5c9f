//! The nightshift executor: runs chunks of batch requests against upstream inference servers.
//!
//! - [`service`]: the service — [`serve`] consumes chunk tasks from the work queue, runs them,
//!   publishes their results and only then acks them; ops endpoints; graceful shutdown.
//! - [`runner`]: one chunk — [`run_chunk`] reads its byte range of the input, runs its
//!   requests concurrently, records live counts, and writes its result part.
//! - [`request`]: one input line — its `custom_id` and its `body`, byte for byte.
//! - [`upstream`]: calling the upstreams of the routing table well — one pooled HTTP client,
//!   retries with backoff, an adaptive (AIMD) concurrency limit per upstream, deadlines and
//!   cancellation — and turning each call into a result line.
//! - [`metrics`]: the names of every metric this crate exports.

pub mod metrics;
pub mod request;
pub mod runner;
pub mod service;
pub mod upstream;

pub use runner::{ChunkDeps, ChunkError, ChunkOutcome, RunnerSettings, run_chunk};
pub use service::{ExecutorConfig, ExecutorPorts, ServeError, serve};
