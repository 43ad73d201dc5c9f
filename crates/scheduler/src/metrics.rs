//! The scheduler's metrics. Names: `nightshift_scheduler_*`; labels have bounded values.

pub const FILES_REGISTERED: &str = "nightshift_scheduler_files_registered_total";
pub const FILES_DELETED: &str = "nightshift_scheduler_files_deleted_total";
/// Files whose bytes the sweeper removed, by `reason` (`expired` | `deleted`).
pub const FILES_SWEPT: &str = "nightshift_scheduler_files_swept_total";
/// Sweep rounds, by `outcome` (`ok` | `error`).
pub const SWEEPS: &str = "nightshift_scheduler_sweeps_total";
/// Batch status transitions, by the status entered (`to`).
pub const BATCH_TRANSITIONS: &str = "nightshift_scheduler_batch_transitions_total";
/// Validation errors found in batch inputs, by `code`.
pub const VALIDATION_ERRORS: &str = "nightshift_scheduler_validation_errors_total";
/// Chunk tasks handed out to executors.
pub const CHUNKS_DISPATCHED: &str = "nightshift_scheduler_chunks_dispatched_total";
/// Chunks whose result was recorded (each counted once, redeliveries excluded).
pub const CHUNKS_DONE: &str = "nightshift_scheduler_chunks_done_total";
