//! The nightshift executor: runs chunks of batch requests against upstream inference servers.
//!
//! - [`upstream`]: calling the upstreams of the routing table well — one pooled HTTP client,
//!   retries with backoff, an adaptive (AIMD) concurrency limit per upstream, deadlines and
//!   cancellation — and turning each call into a result line.
//! - [`metrics`]: the names of every metric this crate exports.

pub mod metrics;
pub mod upstream;
