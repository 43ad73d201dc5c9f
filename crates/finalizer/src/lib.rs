//! The nightshift finalizer: ends batches.
//!
//! When every chunk of a batch is done or given up — or the batch was cancelled or expired —
//! the scheduler publishes a finalize job. The finalizer takes it, asks the scheduler for the
//! batch's [`FinalizePlan`], takes the batch's finalization lease (one finalizer at a time),
//! streams the result parts (and, for chunks that did not finish, the input lines: each one
//! without a result line becomes an error line) into the batch's output and error files, and
//! commits files, counts, usage and the terminal status through the scheduler in one call.
//! Then it deletes the parts and the batch's live state. It owns nothing durable; every step
//! is safe to repeat.
//!
//! - [`plan`]: the plan the scheduler sends, checked.
//! - [`assemble`]: building the two files from the parts, in bounded memory.
//! - [`service`]: the finalize-job handler run by the shared queue worker, the scheduler calls
//!   and the finalization lease, clean-up, `serve`.
//! - [`metrics`]: the names of every metric this crate exports.

pub mod assemble;
pub mod metrics;
pub mod plan;
pub mod service;

pub use assemble::{
    AssembleSettings, BatchFiles, DEFAULT_MAX_LINE_BYTES, FinalizeError, ProducedFile, finalize,
};
pub use plan::{Ending, FinalizePlan, MissingResult, PlanError, PlannedChunk};
pub use service::{FinalizerConfig, FinalizerPorts, SCHEMA_VERSION, ServeError, serve};
