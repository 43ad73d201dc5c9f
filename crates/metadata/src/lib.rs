//! The metadata port: tenants, API keys and files (batches join them in the pipeline).
//!
//! Only the scheduler holds a [`MetadataStore`]; every other service reaches metadata through
//! the scheduler's gRPC API. Two adapters, one schema (`migrations/postgres` and its SQLite
//! twin `migrations/sqlite`), both passing the whole conformance suite (`conformance`, built
//! with the `testsuite` feature):
//! - [`PgStore`]: PostgreSQL, for production (several schedulers may share it);
//! - [`SqliteStore`]: an SQLite file, for the single-process `nightshift standalone`
//!   deployment and fast tests (one process per file).
//!
//! Both are one [`SqlStore`]: its statements (`sql.rs`) and row decoding (`rows.rs`) are
//! written once; `postgres.rs` and `sqlite.rs` hold only connection setup and how each
//! database keeps concurrent writers apart (row locks, or SQLite's single writer). A new
//! column is a migration in each folder and its place in `rows.rs` (and in `sql.rs` if a
//! statement writes it).
//!
//! Contract:
//! - every read and write of a tenant's object is scoped by its tenant id: another tenant's
//!   object is indistinguishable from a missing one;
//! - a file is *visible* while it is neither deleted nor past `expires_at` (evaluated at the
//!   `now` the caller passes, so tests and sweeps agree on one clock);
//! - lists are ordered by `(created_at_us, id)`, and `after` is an exclusive cursor naming the
//!   last id of the previous page; an unknown cursor yields an empty page;
//! - an input outlives its batches: a file that a non-terminal batch reads keeps its bytes
//!   (it is never [sweepable](MetadataStore::sweepable_files)) even once deleted or expired;
//! - work is leased: a dispatched chunk is owned until its `lease_until` (renewed by its
//!   executor's heartbeats), a finalization by one holder until its lease expires, so work
//!   whose message or worker was lost is found and driven again
//!   ([`MetadataStore::sweep_chunk_leases`], [`MetadataStore::claim_stalled_finalizations`]).
//!
//! Chunk states: `pending` → `dispatched` (claimed: attempts + 1, leased) → `done` (its part is
//! complete), or → `failed` (given up, with a `failure` message: its lines without a result
//! become `chunk_failed` error lines). A `failed` chunk whose complete part is reported later
//! still becomes `done`.

use std::fmt;

use async_trait::async_trait;
use nightshift_core::batch::{BatchRecord, BatchStatus, PartTally};
use nightshift_core::chunking::ChunkSpan;
use nightshift_core::file::{FileRecord, Purpose};
use nightshift_core::idempotency::IdempotentKind;
use nightshift_core::page::Order;
use nightshift_core::validation::BatchError;
use nightshift_core::{BatchId, FileId, TenantId};

#[cfg(feature = "testsuite")]
pub mod conformance;
mod postgres;
mod quotas;
mod rows;
mod sql;
mod sqlite;
mod webhooks;

pub use postgres::{PgConfig, PgStore};
pub use sql::SqlStore;
pub use sqlite::{SqliteConfig, SqliteStore, SqliteSync};

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// A uniqueness rule was broken (an id or key hash that already exists).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database failed or is unreachable.
    #[error("metadata store error: {0}")]
    Backend(String),
    /// The write would take the tenant past one of its quotas: nothing was written.
    #[error("{0}")]
    QuotaExceeded(QuotaExceeded),
}

/// One of the per-tenant quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// Batches `validating`, `in_progress`, `finalizing` or `cancelling` at once.
    ActiveBatches,
    /// Lines (requests) of those batches together, counted from validation on.
    EnqueuedRequests,
    /// Bytes of the tenant's visible files: uploads and result files.
    StoredBytes,
}

impl Quota {
    pub const ALL: [Self; 3] = [
        Self::ActiveBatches,
        Self::EnqueuedRequests,
        Self::StoredBytes,
    ];

    /// The setting's name (`max_active_batches`...): config key, column and CLI flag.
    pub fn setting(self) -> &'static str {
        match self {
            Self::ActiveBatches => "max_active_batches",
            Self::EnqueuedRequests => "max_enqueued_requests",
            Self::StoredBytes => "max_stored_bytes",
        }
    }
}

/// Quota limits: the configured defaults, or what applies to one tenant. 0 = unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    pub max_active_batches: u64,
    pub max_enqueued_requests: u64,
    pub max_stored_bytes: u64,
}

impl Quotas {
    /// No limit at all.
    pub const UNLIMITED: Self = Self {
        max_active_batches: 0,
        max_enqueued_requests: 0,
        max_stored_bytes: 0,
    };

    /// The limit of `quota`; `None` when unlimited.
    pub fn limit(&self, quota: Quota) -> Option<u64> {
        let v = match quota {
            Quota::ActiveBatches => self.max_active_batches,
            Quota::EnqueuedRequests => self.max_enqueued_requests,
            Quota::StoredBytes => self.max_stored_bytes,
        };
        (v > 0).then_some(v)
    }
}

/// An operator's per-tenant overrides of the defaults: `None` = the default applies; `Some(0)`
/// = unlimited for this tenant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaOverrides {
    pub max_active_batches: Option<u64>,
    pub max_enqueued_requests: Option<u64>,
    pub max_stored_bytes: Option<u64>,
}

impl QuotaOverrides {
    /// The limits that apply: each override, else its default.
    pub fn over(&self, defaults: &Quotas) -> Quotas {
        Quotas {
            max_active_batches: self
                .max_active_batches
                .unwrap_or(defaults.max_active_batches),
            max_enqueued_requests: self
                .max_enqueued_requests
                .unwrap_or(defaults.max_enqueued_requests),
            max_stored_bytes: self.max_stored_bytes.unwrap_or(defaults.max_stored_bytes),
        }
    }
}

/// What a tenant holds against each quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaUsage {
    pub active_batches: u64,
    pub enqueued_requests: u64,
    pub stored_bytes: u64,
}

impl QuotaUsage {
    pub fn of(&self, quota: Quota) -> u64 {
        match quota {
            Quota::ActiveBatches => self.active_batches,
            Quota::EnqueuedRequests => self.enqueued_requests,
            Quota::StoredBytes => self.stored_bytes,
        }
    }
}

/// A write refused by a quota: the tenant holds `held`, the write adds `adding`, the limit is
/// `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{} exceeded: {held} held + {adding} > {limit}", .quota.setting())]
pub struct QuotaExceeded {
    pub quota: Quota,
    pub limit: u64,
    pub held: u64,
    pub adding: u64,
}

pub type Result<T, E = MetadataError> = std::result::Result<T, E>;

pub use nightshift_core::quota::REQUEST_LIMIT_EXCEEDED;

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
    /// It is being finalized: it ends as it would have (a completed batch never becomes
    /// cancelled by a late cancel). Nothing changed; the batch is returned as it is.
    Finalizing(BatchRecord),
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
    /// Of those, chunks no executor has reported running since they were handed out: their
    /// tasks wait in the queue.
    pub queued: u32,
    /// Chunks not yet handed out.
    pub pending: u32,
}

/// Request lines handed out to a tenant on a model, as the dispatcher's fairness counts them
/// (virtual time: not every line ever, see the scheduler's `pipeline::fairness`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DispatchAccount {
    pub model: String,
    pub tenant: TenantId,
    pub served: u64,
}

/// A chunk, whether its result part is complete, and why it was given up if it was.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkState {
    pub span: ChunkSpan,
    pub done: bool,
    /// Set when the chunk was given up (`failed`): the message of the `chunk_failed` error
    /// lines of its lines without a result line.
    pub failure: Option<String>,
    /// A done chunk's part as the run that wrote it reported it; `None` when unknown.
    pub part: Option<PartTally>,
}

/// A chunk handed out, and which dispatch of it this is (`ChunkTask.attempt`: 1 = the first).
#[derive(Debug, Clone, PartialEq)]
pub struct LeasedChunk {
    pub batch: BatchId,
    pub span: ChunkSpan,
    pub attempt: u32,
}

/// How [`MetadataStore::sweep_chunk_leases`] treats dispatched chunks whose lease expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeasePolicy {
    /// A lease renewed or re-driven lasts this long from `now` (seconds).
    pub lease_secs: i64,
    /// Dispatches of a chunk (claims and counted re-drives) after which a chunk whose
    /// executors stopped reporting is given up.
    pub max_attempts: u32,
    /// Whether chunk tasks are waiting in the queue (its ready depth is not 0, or unknown): a
    /// chunk no executor started is then probably one of them, and only its lease is
    /// extended; otherwise its task was lost and it is re-driven.
    pub tasks_waiting: bool,
}

/// What a lease sweep did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LeaseSweep {
    /// Chunks whose task must be published again, with the attempt number to send. Their
    /// lease was renewed (and `started` reset), so a lost publish is found again.
    pub redrive: Vec<LeasedChunk>,
    /// Chunks given up (`failed`), with the number of attempts they had.
    pub failed: Vec<LeasedChunk>,
    /// Leases extended because tasks are waiting in the queue.
    pub extended: u64,
}

/// The answer to a finalization lease request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalizationLease {
    /// The caller holds the lease (until `expires_at`).
    pub granted: bool,
    /// When the lease ends (unix seconds): the caller's if granted, else the other holder's.
    pub expires_at: Option<i64>,
    /// Who holds the lease when it was not granted (`None`: nobody — the batch is not being
    /// finalized, is terminal, or does not exist).
    pub holder: Option<String>,
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

/// A webhook delivery claimed for one attempt: where it goes, how to sign it, what to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookDelivery {
    /// The event's id: the `webhook-id` of every attempt, so receivers can deduplicate.
    pub event_id: nightshift_core::EventId,
    pub endpoint_id: nightshift_core::WebhookEndpointId,
    /// `batch.completed`, ...
    pub event_type: String,
    pub url: String,
    /// The endpoint's current signing secret (`whsec_…`).
    pub secret: String,
    /// The secret before a rotation that kept it active, while it is: the delivery carries a
    /// second signature made with it.
    pub previous_secret: Option<String>,
    /// The exact bytes to send.
    pub body: String,
    /// When the event happened (unix seconds): retries stop at the configured max age.
    pub event_created_at: i64,
    /// Attempts so far, this one included.
    pub attempts: u32,
}

/// Where one delivery of a batch's event stands (operators' view, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookDeliveryState {
    pub event_id: nightshift_core::EventId,
    pub endpoint_id: nightshift_core::WebhookEndpointId,
    pub event_type: String,
    /// `pending`, `delivered` or `failed` (given up).
    pub state: String,
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// How a webhook delivery attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The receiver answered 2xx.
    Delivered,
    /// It failed (`error`); try again at `at` (unix seconds).
    Retry { at: i64, error: String },
    /// It failed and the event is too old to try again: recorded as `failed`.
    GaveUp { error: String },
}

/// An `Idempotency-Key` claimed by a create (`POST /v1/files`, `POST /v1/batches`, a retry):
/// recorded with the object, in the same transaction, for
/// [`IDEMPOTENCY_TTL_SECS`](nightshift_core::idempotency::IDEMPOTENCY_TTL_SECS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyClaim {
    pub key: String,
    pub kind: IdempotentKind,
    /// The request's fingerprint ([`RequestHash`](nightshift_core::idempotency::RequestHash)).
    pub request_hash: String,
    /// When the key is claimed (unix seconds): it is live until `created_at + TTL`.
    pub created_at: i64,
}

/// A live `Idempotency-Key` of a tenant: what its first request created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub key: String,
    pub kind: IdempotentKind,
    pub request_hash: String,
    /// The file or batch id.
    pub object_id: String,
    pub created_at: i64,
}

/// What an insert with an optional [`IdempotencyClaim`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// The object was recorded (and the key, if any, claimed for it).
    Created,
    /// The key is live and names an earlier request: nothing was recorded. The caller answers
    /// with that request's object if the request is the same (kind and hash), else refuses.
    Replayed(IdempotencyRecord),
}

/// Which failed lines a retry runs: every failed line when all lists are empty, else each
/// failed line that matches any entry of any list.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RetryFilter {
    /// `error.code` of an error line (`batch_expired`, `request_timeout`...), or the `code` of
    /// the upstream's error object in a non-2xx response body (`rate_limit_exceeded`...).
    #[serde(default)]
    pub error_codes: Vec<String>,
    /// Exact HTTP statuses of non-2xx responses (429, 500...).
    #[serde(default)]
    pub status_codes: Vec<u16>,
    /// Status classes of non-2xx responses: 4 for `4xx`, 5 for `5xx`.
    #[serde(default)]
    pub status_classes: Vec<u8>,
}

impl RetryFilter {
    /// No list has an entry: every failed line is retried.
    pub fn is_empty(&self) -> bool {
        self.error_codes.is_empty()
            && self.status_codes.is_empty()
            && self.status_classes.is_empty()
    }
}

/// Where a retry batch's input comes from: the failed lines of `retry_of`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySource {
    /// The retry batch.
    pub batch: BatchId,
    pub tenant: TenantId,
    /// The ended batch whose failed lines it runs.
    pub retry_of: BatchId,
    pub filter: RetryFilter,
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

    /// The tenant's file as it was at `at`: visible then (not yet deleted, not yet expired),
    /// whatever happened to it since, as long as its record exists. The input of a batch
    /// created at `at` is read this way: deleting or expiring it afterwards hides it from the
    /// API but not from the batch (inputs outlive their batches).
    async fn file_as_of(
        &self,
        tenant: &TenantId,
        id: &FileId,
        at: i64,
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

    /// Files whose bytes should go: deleted ones and those expired at `now`, oldest first —
    /// except a file that a non-terminal batch reads (its input): it stays hidden from the
    /// API, and its bytes stay until every such batch is terminal.
    async fn sweepable_files(&self, now: i64, limit: u32) -> Result<Vec<FileRecord>>;

    /// Whether a non-terminal batch (`validating`, `in_progress`, `finalizing`, `cancelling`)
    /// reads this file: its bytes must not be deleted yet.
    async fn input_in_use(&self, id: &FileId) -> Result<bool>;

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
    /// A ready batch whose lines would take its tenant's active batches past their
    /// `max_enqueued_requests` (its override, else `quotas`') fails instead, with one error
    /// [`REQUEST_LIMIT_EXCEEDED`].
    async fn finish_validation(
        &self,
        id: &BatchId,
        outcome: &ValidationOutcome,
        now: i64,
        quotas: &Quotas,
    ) -> Result<Option<BatchRecord>>;

    /// Cancels a batch of the tenant at `now` (`validating` or `in_progress` →
    /// `cancelling`); `None` if the tenant has no such batch. A `finalizing` batch is left
    /// unchanged ([`CancelOutcome::Finalizing`]): its ending is already decided.
    async fn cancel_batch(
        &self,
        tenant: &TenantId,
        id: &BatchId,
        now: i64,
    ) -> Result<Option<CancelOutcome>>;

    /// A batch's chunks in order.
    async fn chunks(&self, id: &BatchId) -> Result<Vec<ChunkSpan>>;

    /// A batch's chunks in order, with whether each is done and why it failed if it did.
    async fn chunk_states(&self, id: &BatchId) -> Result<Vec<ChunkState>>;

    /// Every `in_progress` batch with its in-flight (`dispatched`) and pending chunk counts
    /// (those already ending included, with their in-flight chunks, since they still occupy
    /// executors; they have nothing pending any more). Failed chunks count as neither: a
    /// chunk given up frees its model slot.
    async fn dispatch_candidates(&self) -> Result<Vec<DispatchCandidate>>;

    /// The dispatcher's fairness accounts as last [saved](MetadataStore::save_dispatch_accounts),
    /// in no particular order; none on a new database.
    async fn dispatch_accounts(&self) -> Result<Vec<DispatchAccount>>;

    /// Replaces the dispatcher's fairness accounts with `accounts` (at most one per model and
    /// tenant), in one transaction: an account left out is forgotten. Their owner is the one
    /// dispatcher of a deployment; two writing at once leave the accounts of one of them.
    async fn save_dispatch_accounts(&self, accounts: &[DispatchAccount]) -> Result<()>;

    /// Hands out the batch's next pending chunk (lowest index) at `now`: `pending` →
    /// `dispatched`, attempts + 1, leased until `now + lease_secs`, not started. `None` when
    /// none is left or the batch no longer runs (cancelled, expiring, past its deadline).
    async fn claim_next_chunk(
        &self,
        id: &BatchId,
        now: i64,
        lease_secs: i64,
    ) -> Result<Option<LeasedChunk>>;

    /// Puts a handed-out chunk back to `pending` (its task could not be published): the
    /// claim's attempt is not counted, the lease is dropped. A no-op for a chunk no longer
    /// `dispatched`.
    async fn release_chunk(&self, id: &BatchId, index: u32) -> Result<()>;

    /// Chunks handed out and not done, with their current attempt (re-published after a
    /// scheduler restart).
    async fn dispatched_chunks(&self, id: &BatchId) -> Result<Vec<LeasedChunk>>;

    /// An executor reports the chunk running (a heartbeat) at `now`: a `dispatched` chunk is
    /// leased until `now + lease_secs` and marked started. `false` (nothing changed) for a
    /// chunk in any other state (done, failed: a late heartbeat). Idempotent.
    async fn renew_chunk_lease(
        &self,
        id: &BatchId,
        index: u32,
        now: i64,
        lease_secs: i64,
    ) -> Result<bool>;

    /// Extends a `dispatched` chunk's lease to `until` if it ends earlier (or has none),
    /// without marking it started: a task re-published at a scheduler restart waits a whole
    /// lease for an executor's heartbeat. `false` if the chunk is not dispatched.
    async fn extend_chunk_lease(&self, id: &BatchId, index: u32, until: i64) -> Result<bool>;

    /// Marks a chunk done (its part is complete), from any other state — a chunk given up
    /// whose part is reported complete after all is done too — keeping `part`, the tally of
    /// its part, when the report has one. Idempotent: `false` if it already was (a redelivered
    /// result, or another run's: the first report's tally stays).
    async fn complete_chunk(
        &self,
        id: &BatchId,
        index: u32,
        part: Option<&PartTally>,
    ) -> Result<bool>;

    /// Gives a chunk up (`pending`/`dispatched` → `failed`, with `failure`): it can never run.
    /// `false` (nothing changed) if it is already done or failed.
    async fn fail_chunk(&self, id: &BatchId, index: u32, failure: &str) -> Result<bool>;

    /// The lease sweep at `now`: every `dispatched` chunk of an `in_progress` batch that
    /// still runs (not ending, before its deadline) whose lease expired (or that has none) is
    /// - *started* (an executor reported it since its last dispatch), with fewer than
    ///   `max_attempts` attempts: re-driven — attempts + 1, leased anew, not started — and
    ///   returned in [`LeaseSweep::redrive`] with its new attempt number;
    /// - *started*, with `max_attempts` attempts or more: given up (`failed`, failure "the chunk
    ///   was given up after N attempts (its executors stopped reporting)"), in
    ///   [`LeaseSweep::failed`];
    /// - *not started* (its task is probably still queued): if `tasks_waiting`, its lease is
    ///   extended ([`LeaseSweep::extended`]); otherwise its task was lost: re-driven without
    ///   counting an attempt.
    ///
    /// Chunks of ending (cancelling, expiring) and terminal batches are left alone: their
    /// leases simply run out and [`request_finalize`](Self::request_finalize) ends the batch.
    /// Each transition is a compare-and-set on the expired lease: a heartbeat that renewed a
    /// lease meanwhile wins, and two schedulers sweeping together re-drive a chunk once.
    async fn sweep_chunk_leases(&self, now: i64, policy: &LeasePolicy) -> Result<LeaseSweep>;

    /// Applies deadlines at `now`: every `in_progress` batch past its deadline is marked
    /// expiring (no more chunks are handed out) and returned (still `in_progress`); every
    /// `validating` batch past its deadline becomes `expired` at once (no chunks, no files)
    /// and is returned as such.
    async fn expire_due(&self, now: i64) -> Result<Vec<BatchRecord>>;

    /// Asks for finalization at `now` once nothing more will run. At most once per batch:
    /// `None` if not ready or already asked. Ready means:
    /// - the batch runs to its end (`in_progress`, not expiring): no chunk is `pending` or
    ///   `dispatched` (every one done or failed) → `finalizing`;
    /// - it ends early — `cancelling` (stays so), or expiring (`in_progress` with its
    ///   deadline passed → `finalizing`, ending `expired`, even if the expiry sweep has not
    ///   marked it yet) — and no dispatched chunk holds a live lease, or `ending_grace_secs`
    ///   have passed since `cancelling_at` / `expires_at`: a batch ends within the grace
    ///   whatever its chunks do (the finalizer uses whatever part exists).
    async fn request_finalize(
        &self,
        id: &BatchId,
        now: i64,
        ending_grace_secs: i64,
    ) -> Result<Option<BatchRecord>>;

    /// Batches asked to finalize and not yet terminal (a restart asks again).
    async fn finalize_requested(&self) -> Result<Vec<BatchRecord>>;

    /// Batches asked to finalize (or last re-published) at or before `asked_before`, still
    /// not terminal, and whose finalization lease is absent or expired at `now` (their job
    /// was lost or dead-lettered, or their finalizer died): re-stamps them with `now` and
    /// returns them, so each stalled batch is handed out once per grace period and a slow
    /// finalization that keeps its lease is never duplicated.
    async fn claim_stalled_finalizations(
        &self,
        asked_before: i64,
        now: i64,
    ) -> Result<Vec<BatchRecord>>;

    /// Takes or renews the finalization lease of a batch for `holder` at `now`, until
    /// `now + ttl_secs`. Granted when the batch is being finalized (`finalizing` or
    /// `cancelling`, asked to finalize) and the lease is free, already `holder`'s, or expired.
    async fn lease_finalization(
        &self,
        id: &BatchId,
        holder: &str,
        now: i64,
        ttl_secs: i64,
    ) -> Result<FinalizationLease>;

    /// Gives the finalization lease up if `holder` has it; `false` otherwise.
    async fn release_finalization(&self, id: &BatchId, holder: &str) -> Result<bool>;

    /// How a batch being finalized ends; `None` if it is not being finalized.
    async fn ending(&self, id: &BatchId) -> Result<Option<Ending>>;

    /// Records the result files and the terminal state in one transaction at `now`.
    /// Compare-and-set on `finalizing`/`cancelling`: a batch already terminal is returned
    /// unchanged (a redelivered finalize job).
    async fn commit_batch(&self, commit: &BatchCommit, now: i64) -> Result<Option<BatchRecord>>;

    /// Records a webhook endpoint. `Conflict` if the id exists.
    async fn create_webhook_endpoint(
        &self,
        endpoint: &nightshift_core::webhook::WebhookEndpointRecord,
    ) -> Result<()>;

    /// The tenant's webhook endpoints, oldest first.
    async fn list_webhook_endpoints(
        &self,
        tenant: &TenantId,
    ) -> Result<Vec<nightshift_core::webhook::WebhookEndpointRecord>>;

    /// A webhook endpoint of the tenant.
    async fn webhook_endpoint(
        &self,
        tenant: &TenantId,
        id: &nightshift_core::WebhookEndpointId,
    ) -> Result<Option<nightshift_core::webhook::WebhookEndpointRecord>>;

    /// Deletes a webhook endpoint of the tenant, and its deliveries; returns what it was.
    async fn delete_webhook_endpoint(
        &self,
        tenant: &TenantId,
        id: &nightshift_core::WebhookEndpointId,
    ) -> Result<Option<nightshift_core::webhook::WebhookEndpointRecord>>;

    /// Replaces the signing secret of a webhook endpoint of the tenant at `now`; the old one
    /// keeps signing (a second signature) until `keep_old_until` if given.
    async fn rotate_webhook_secret(
        &self,
        tenant: &TenantId,
        id: &nightshift_core::WebhookEndpointId,
        secret: &str,
        keep_old_until: Option<i64>,
        now: i64,
    ) -> Result<Option<nightshift_core::webhook::WebhookEndpointRecord>>;

    /// Claims up to `limit` webhook deliveries due at `now` (pending, not leased or lease
    /// expired): each gets an attempt counted and a lease until `now + lease_secs`, so a
    /// delivery whose worker died is claimed again once its lease expires (at-least-once).
    async fn claim_webhook_deliveries(
        &self,
        now: i64,
        lease_secs: i64,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>>;

    /// Records how a claimed delivery's attempt ended at `now`. Only a pending delivery
    /// changes.
    async fn finish_webhook_delivery(
        &self,
        delivery: &WebhookDelivery,
        outcome: &DeliveryOutcome,
        now: i64,
    ) -> Result<()>;

    /// Every webhook delivery of a batch's events, oldest event first.
    async fn webhook_deliveries_of(&self, batch: &BatchId) -> Result<Vec<WebhookDeliveryState>>;

    /// Webhook deliveries still pending (the outbox backlog).
    async fn pending_webhook_deliveries(&self) -> Result<u64>;

    /// Forgets webhook deliveries that ended before `before` and events left without any;
    /// returns the deliveries removed.
    async fn purge_webhook_history(&self, before: i64) -> Result<u64>;

    /// Records a file, and claims `idempotency` for it in the same transaction if given:
    /// [`Inserted::Replayed`] (nothing recorded) when that key is live for the tenant.
    /// `Conflict` if the file id exists. `QuotaExceeded` (nothing recorded) if its bytes would
    /// take the tenant's visible files past its `max_stored_bytes` (its override, else
    /// `quotas`'); checked after the key, so a replay is never refused.
    async fn insert_file_once(
        &self,
        file: &FileRecord,
        idempotency: Option<&IdempotencyClaim>,
        quotas: &Quotas,
    ) -> Result<Inserted>;

    /// Records a new batch (in `validating`) like [`insert_batch`](Self::insert_batch), with
    /// the source of its input if it is a retry, and claims `idempotency` for it, all in one
    /// transaction: [`Inserted::Replayed`] (nothing recorded) when that key is live.
    /// `QuotaExceeded` (nothing recorded) if the tenant already has its `max_active_batches`
    /// (its override, else `quotas`') active batches.
    async fn insert_batch_once(
        &self,
        batch: &BatchRecord,
        retry: Option<&RetrySource>,
        idempotency: Option<&IdempotencyClaim>,
        quotas: &Quotas,
    ) -> Result<Inserted>;

    /// The tenant's quota overrides; `None` if there is no such tenant.
    async fn tenant_quotas(&self, tenant: &TenantId) -> Result<Option<QuotaOverrides>>;

    /// Replaces the tenant's quota overrides (each `None` = back to the default) at `now_us`;
    /// `false` if there is no such tenant. Writes already admitted are not undone.
    async fn set_tenant_quotas(
        &self,
        tenant: &TenantId,
        quotas: &QuotaOverrides,
        now_us: i64,
    ) -> Result<bool>;

    /// What the tenant holds against each quota at `now` (unix seconds).
    async fn quota_usage(&self, tenant: &TenantId, now: i64) -> Result<QuotaUsage>;

    /// Every tenant, oldest first (operators' listing).
    async fn list_tenants(&self) -> Result<Vec<Tenant>>;

    /// The tenant's `key` if it is live at `now` (claimed less than 24 h before).
    async fn idempotency_record(
        &self,
        tenant: &TenantId,
        key: &str,
        now: i64,
    ) -> Result<Option<IdempotencyRecord>>;

    /// Deletes keys no longer live at `now`, at most `limit`; returns how many.
    async fn sweep_idempotency_keys(&self, now: i64, limit: u32) -> Result<u64>;

    /// Where a retry batch's input comes from; `None` for a batch that is not a retry.
    async fn retry_source(&self, batch: &BatchId) -> Result<Option<RetrySource>>;

    /// A page of the tenant's retries of `parent`, newest first, like
    /// [`list_batches`](Self::list_batches).
    async fn list_retries(
        &self,
        tenant: &TenantId,
        parent: &BatchId,
        limit: u32,
        after: Option<&BatchId>,
    ) -> Result<BatchPage>;
}
