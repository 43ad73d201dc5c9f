//! The metadata port: tenants, API keys and files (batches join them in the pipeline).
//!
//! Only the scheduler holds a [`MetadataStore`]; every other service reaches metadata through
//! the scheduler's gRPC API. Two adapters, one schema (`migrations/postgres` and its SQLite
//! twin `migrations/sqlite`), both passing the whole [`conformance`] suite:
//! - [`PgStore`]: PostgreSQL, for production (several schedulers may share it);
//! - [`SqliteStore`]: an SQLite file, for the single-process `nightshift standalone`
//!   deployment and fast tests (one process per file).
//!
//! Contract:
//! - every read and write of a tenant's object is scoped by its tenant id: another tenant's
//!   object is indistinguishable from a missing one;
//! - a file is *visible* while it is neither deleted nor past `expires_at` (evaluated at the
//!   `now` the caller passes, so tests and sweeps agree on one clock);
//! - lists are ordered by `(created_at_us, id)`, and `after` is an exclusive cursor naming the
//!   last id of the previous page; an unknown cursor yields an empty page.

use std::fmt;

use async_trait::async_trait;
use nightshift_core::batch::{BatchRecord, BatchStatus};
use nightshift_core::chunking::ChunkSpan;
use nightshift_core::file::{FileRecord, Purpose};
use nightshift_core::page::Order;
use nightshift_core::validation::BatchError;
use nightshift_core::{BatchId, FileId, TenantId};

pub mod conformance;
mod postgres;
mod rows;
mod sqlite;

pub use postgres::{PgConfig, PgStore};
pub use sqlite::{SqliteConfig, SqliteStore, SqliteSync};

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// A uniqueness rule was broken (an id or key hash that already exists).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database failed or is unreachable.
    #[error("metadata store error: {0}")]
    Backend(String),
}

pub type Result<T, E = MetadataError> = std::result::Result<T, E>;

/// A tenant: the unit of isolation and (later) of fair scheduling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
}

/// A `GET /v1/files` query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileQuery {
    pub purpose: Option<Purpose>,
    pub limit: u32,
    pub order: Order,
    pub after: Option<FileId>,
}

/// One page of files, in the requested order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePage {
    pub files: Vec<FileRecord>,
    /// Whether at least one more visible file follows the last one.
    pub has_more: bool,
}

/// A page of batches, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPage {
    pub batches: Vec<BatchRecord>,
    pub has_more: bool,
}

/// How validation ended for a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum ValidationOutcome {
    /// The input is bad: the batch fails with these errors.
    Failed { errors: Vec<BatchError> },
    /// The input is good: the batch runs `total` requests of `model`, cut into `chunks`.
    Ready {
        model: String,
        total: u64,
        chunks: Vec<ChunkSpan>,
    },
}

/// The answer to a cancel request.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// The batch moved to `cancelling` now.
    Cancelling(BatchRecord),
    /// It was already cancelling or cancelled: nothing changed (cancel is idempotent).
    AlreadyCancelled(BatchRecord),
    /// It ended otherwise (completed, failed, expired) and cannot be cancelled.
    Terminal(BatchRecord),
}

/// How a finished batch ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Completed,
    Expired,
    Cancelled,
}

impl Ending {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }

    /// The ending of a batch that is being finalized.
    pub fn of(batch: &BatchRecord, expiring: bool) -> Self {
        if batch.status == BatchStatus::Cancelling {
            Self::Cancelled
        } else if expiring {
            Self::Expired
        } else {
            Self::Completed
        }
    }
}

/// A batch with work left to hand out, as the dispatcher sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchCandidate {
    pub batch: BatchRecord,
    /// Chunks handed out and not yet done.
    pub in_flight: u32,
    /// Chunks not yet handed out.
    pub pending: u32,
}

/// A chunk and whether its result part exists.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkState {
    pub span: ChunkSpan,
    pub done: bool,
}

/// A file produced by finalization.
#[derive(Debug, Clone, PartialEq)]
pub struct ProducedFile {
    pub id: FileId,
    pub bytes: u64,
}

/// What the finalizer commits.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchCommit {
    pub batch: BatchId,
    pub output_file: Option<ProducedFile>,
    pub error_file: Option<ProducedFile>,
    pub completed: u64,
    pub failed: u64,
    pub usage: nightshift_core::results::Usage,
}

/// The metadata port.
#[async_trait]
pub trait MetadataStore: Send + Sync + fmt::Debug + 'static {
    /// Whether the database answers (readiness).
    async fn ping(&self) -> Result<()>;

    /// Creates a tenant with one API key (its SHA-256 digest).
    async fn create_tenant(&self, name: &str, key_hash: &str) -> Result<Tenant>;

    /// The tenant owning `key_hash`, creating it (named `name`) if no tenant owns it yet.
    /// Idempotent and safe to race: used for the bootstrap key at every start.
    async fn ensure_tenant(&self, name: &str, key_hash: &str) -> Result<Tenant>;

    /// The tenant owning an API key digest.
    async fn tenant_by_key(&self, key_hash: &str) -> Result<Option<Tenant>>;

    /// Records a file. `Conflict` if the id exists.
    async fn insert_file(&self, file: &FileRecord) -> Result<()>;

    /// A visible file of the tenant.
    async fn get_file(
        &self,
        tenant: &TenantId,
        id: &FileId,
        now: i64,
    ) -> Result<Option<FileRecord>>;

    /// A page of the tenant's visible files.
    async fn list_files(&self, tenant: &TenantId, query: &FileQuery, now: i64) -> Result<FilePage>;

    /// Hides a visible file of the tenant (soft delete) and returns it; `None` if it was not
    /// visible. Its bytes are the caller's to delete, then [`MetadataStore::purge_file`].
    async fn delete_file(
        &self,
        tenant: &TenantId,
        id: &FileId,
        now: i64,
    ) -> Result<Option<FileRecord>>;

    /// Files whose bytes should go: deleted ones and those expired at `now`, oldest first.
    async fn sweepable_files(&self, now: i64, limit: u32) -> Result<Vec<FileRecord>>;

    /// Removes a file's record for good (after its bytes were deleted). Idempotent.
    async fn purge_file(&self, id: &FileId) -> Result<()>;

    /// Records a new batch (in `validating`). `Conflict` if the id exists.
    async fn insert_batch(&self, batch: &BatchRecord) -> Result<()>;

    /// A batch of the tenant.
    async fn get_batch(&self, tenant: &TenantId, id: &BatchId) -> Result<Option<BatchRecord>>;

    /// Any batch, whatever its tenant: for the control plane's own work, never for clients.
    async fn batch(&self, id: &BatchId) -> Result<Option<BatchRecord>>;

    /// A page of the tenant's batches, newest first (`created_at_us`, then id, descending);
    /// `after` is exclusive and an unknown one yields an empty page.
    async fn list_batches(
        &self,
        tenant: &TenantId,
        limit: u32,
        after: Option<&BatchId>,
    ) -> Result<BatchPage>;

    /// Every batch in one of `statuses`, oldest first (recovery and sweeps).
    async fn batches_with_status(&self, statuses: &[BatchStatus]) -> Result<Vec<BatchRecord>>;

    /// Ends validation at `now`: `validating` → `failed` (with errors) or → `in_progress`
    /// (model, total, and the chunks inserted in the same transaction). Compare-and-set: a
    /// batch no longer `validating` (cancelled meanwhile) is left alone and `None` returned.
    async fn finish_validation(
        &self,
        id: &BatchId,
        outcome: &ValidationOutcome,
        now: i64,
    ) -> Result<Option<BatchRecord>>;

    /// Cancels a batch of the tenant at `now` (`validating`, `in_progress` or `finalizing`
    /// → `cancelling`); `None` if the tenant has no such batch.
    async fn cancel_batch(
        &self,
        tenant: &TenantId,
        id: &BatchId,
        now: i64,
    ) -> Result<Option<CancelOutcome>>;

    /// A batch's chunks in order.
    async fn chunks(&self, id: &BatchId) -> Result<Vec<ChunkSpan>>;

    /// A batch's chunks in order, with whether each is done.
    async fn chunk_states(&self, id: &BatchId) -> Result<Vec<ChunkState>>;

    /// Every `in_progress` batch with its in-flight and pending chunk counts (those already
    /// ending included, with their in-flight chunks, since they still occupy executors).
    async fn dispatch_candidates(&self) -> Result<Vec<DispatchCandidate>>;

    /// Hands out the batch's next pending chunk (lowest index): `pending` → `dispatched`.
    /// `None` when none is left or the batch no longer runs (cancelled, expiring).
    async fn claim_next_chunk(&self, id: &BatchId) -> Result<Option<ChunkSpan>>;

    /// Puts a handed-out chunk back to `pending` (its task could not be published).
    async fn release_chunk(&self, id: &BatchId, index: u32) -> Result<()>;

    /// Chunks handed out and not done (re-published after a scheduler restart).
    async fn dispatched_chunks(&self, id: &BatchId) -> Result<Vec<ChunkSpan>>;

    /// Marks a chunk done. Idempotent: `false` if it already was (a redelivered result).
    async fn complete_chunk(&self, id: &BatchId, index: u32) -> Result<bool>;

    /// Marks every `in_progress` batch whose deadline has passed as expiring (no more chunks
    /// are handed out) and returns them.
    async fn expire_due(&self, now: i64) -> Result<Vec<BatchRecord>>;

    /// Asks for finalization once no chunk is in flight and nothing more will run: every
    /// chunk done (`in_progress` → `finalizing`), or the batch expiring (→ `finalizing`) or
    /// `cancelling` (stays). At most once per batch: `None` if not ready or already asked.
    /// An `in_progress` batch asked at or after its `expires_at` ends `expired` even if the
    /// expiry sweep has not marked it yet (its late lines were cut as `batch_expired`).
    async fn request_finalize(&self, id: &BatchId, now: i64) -> Result<Option<BatchRecord>>;

    /// Batches asked to finalize and not yet terminal (a restart asks again).
    async fn finalize_requested(&self) -> Result<Vec<BatchRecord>>;

    /// Batches asked to finalize at or before `asked_before` and still not terminal (their job
    /// was lost or dead-lettered): re-stamps them with `now` and returns them, so each stalled
    /// batch is handed out once per grace period.
    async fn claim_stalled_finalizations(
        &self,
        asked_before: i64,
        now: i64,
    ) -> Result<Vec<BatchRecord>>;

    /// How a batch being finalized ends; `None` if it is not being finalized.
    async fn ending(&self, id: &BatchId) -> Result<Option<Ending>>;

    /// Records the result files and the terminal state in one transaction at `now`.
    /// Compare-and-set on `finalizing`/`cancelling`: a batch already terminal is returned
    /// unchanged (a redelivered finalize job).
    async fn commit_batch(&self, commit: &BatchCommit, now: i64) -> Result<Option<BatchRecord>>;
}
