//! The metadata port over SQL, written once for both databases.
//!
//! [`PgStore`](crate::PgStore) and [`SqliteStore`](crate::SqliteStore) are this store over
//! sqlx's Postgres and SQLite drivers. Both schemas have the same tables, columns and units, and
//! every statement below is one text that both run: parameters are `$N` (SQLite binds those
//! too), JSON documents are bound and read as sqlx's JSON type (`JSONB` in Postgres, `TEXT` in
//! SQLite), booleans are written `true`/`false`, and nothing uses a function only one of them
//! has. Rows become records in [`crate::rows`].
//!
//! What does differ is in [`Backend`]: how the two databases keep concurrent writers apart.
//! Postgres has row locks: a claim skips rows another transaction holds, a commit locks the
//! batch it reads. SQLite has a single writer (see [`crate::sqlite`]): a write transaction
//! takes it up front and then sees and changes the database alone. Each adapter's module holds
//! its connection setup and its [`Backend`].
//!
//! Statements that write and return rows (`RETURNING`) are always read with `fetch_all`, even
//! when one row at most comes back: SQLite ends an autocommit statement's transaction only once
//! the statement has run to completion, and `fetch_optional` stops stepping after the first row.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use nightshift_core::batch::{BatchRecord, BatchStatus, PartTally};
use nightshift_core::chunking::ChunkSpan;
use nightshift_core::file::FileRecord;
use nightshift_core::page::Order;
use nightshift_core::time::now_unix_micros;
use nightshift_core::{BatchId, FileId, TenantId};
use sqlx::{
    AssertSqlSafe, Database, Encode, Executor, IntoArguments, Pool, QueryBuilder, Transaction, Type,
};
use tokio::sync::mpsc;

use crate::rows::{
    BATCH_COLUMNS, Columns, Cursor, FILE_COLUMNS, LEASED_COLUMNS, SPAN_COLUMNS, account_from_row,
    backend, batch_from_row, file_from_row, idempotency_from_row, leased_from_row, opt_json_col,
    retry_from_row, span_from_row, split_page, tenant_from_row, to_i64,
};
use crate::{
    BatchCommit, BatchPage, CancelOutcome, ChunkState, DispatchAccount, DispatchCandidate, Ending,
    FilePage, FileQuery, FinalizationLease, IdempotencyClaim, IdempotencyRecord, Inserted,
    LeasePolicy, LeaseSweep, LeasedChunk, MetadataError, MetadataStore, Quota, QuotaOverrides,
    QuotaUsage, Quotas, REQUEST_LIMIT_EXCEEDED, Result, RetrySource, Tenant, ValidationOutcome,
};
use nightshift_core::idempotency::IDEMPOTENCY_TTL_SECS;
use nightshift_core::validation::BatchError;

/// How a database keeps concurrent writers apart: the only SQL that differs between them.
pub(crate) trait Backend: Database<Row: Columns, Arguments: IntoArguments<Self>> {
    /// Begins a read-modify-write transaction.
    const BEGIN_WRITE: &'static str;
    /// Ends the `SELECT` that picks the chunk a claim takes: locks it, skipping chunks that
    /// another claim holds, so concurrent claims take different chunks.
    const SKIP_LOCKED: &'static str;
    /// Ends the `SELECT` that reads a batch a transaction then changes: nothing else changes
    /// it meanwhile.
    const FOR_UPDATE: &'static str;
    /// Ends the `SELECT` of a tenant row that serializes the tenant's quota checks (see
    /// [`crate::quotas`]): a second check of the tenant waits for the first transaction to end.
    const LOCK_TENANT: &'static str;

    /// How many rows a statement changed (each driver has its own result type).
    fn rows_affected(done: &Self::QueryResult) -> u64;
}

/// The batches whose chunks the lease sweep looks after: running, not ending, before their
/// deadline (`$1` is `now`).
const RUNNING_BATCHES: &str = "SELECT id FROM batches WHERE status = 'in_progress' \
     AND ending IS NULL AND expires_at > $1";

/// Chunks inserted per statement by [`MetadataStore::finish_validation`]: 6 parameters each,
/// well under SQLite's 32766 and Postgres' 65535 parameters per statement.
pub(crate) const CHUNKS_PER_INSERT: usize = 1000;

/// A value as a JSON document column.
fn to_json<T: serde::Serialize>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| MetadataError::Backend(format!("encode: {e}")))
}

/// [`MetadataStore`] over an SQL database.
pub struct SqlStore<DB: Database> {
    /// The connections that write.
    pub(crate) writer: Pool<DB>,
    /// The connections that only read: the writer's pool in Postgres; in SQLite, `query_only`
    /// connections that WAL lets run alongside its single writer.
    pub(crate) reader: Pool<DB>,
    /// Where [`SqlStore::subscribe_created`] receivers hear of each batch inserted; shared by
    /// clones.
    created: Arc<Mutex<Vec<mpsc::UnboundedSender<BatchId>>>>,
}

impl<DB: Database> Clone for SqlStore<DB> {
    fn clone(&self) -> Self {
        Self {
            writer: self.writer.clone(),
            reader: self.reader.clone(),
            created: self.created.clone(),
        }
    }
}

impl<DB: Database> fmt::Debug for SqlStore<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlStore")
            .field("database", &DB::NAME)
            .field("writer", &self.writer)
            .field("reader", &self.reader)
            .finish_non_exhaustive()
    }
}

impl<DB: Database> SqlStore<DB> {
    pub(crate) fn new(writer: Pool<DB>, reader: Pool<DB>) -> Self {
        Self {
            writer,
            reader,
            created: Arc::default(),
        }
    }

    /// The writing pool: direct SQL for tools and tests (in SQLite, writes queue with the
    /// store's own, so they never see `SQLITE_BUSY`).
    pub fn pool(&self) -> &Pool<DB> {
        &self.writer
    }

    /// The id of every batch inserted from now on through this store (or a clone of it), in
    /// order, once its insert has committed. Lets a watcher see a batch that is created and
    /// ends between two of its looks. A receiver dropped is forgotten at the next insert.
    pub fn subscribe_created(&self) -> mpsc::UnboundedReceiver<BatchId> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.listeners().push(tx);
        rx
    }

    fn announce_created(&self, id: &BatchId) {
        self.listeners().retain(|tx| tx.send(id.clone()).is_ok());
    }

    fn listeners(&self) -> std::sync::MutexGuard<'_, Vec<mpsc::UnboundedSender<BatchId>>> {
        // A panic while holding the lock cannot leave the list half-changed.
        self.created.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The tables that are listed with cursors.
#[derive(Clone, Copy)]
enum ListTable {
    Files,
    Batches,
}

/// Begins a transaction that reads, then writes what it read.
async fn begin_write<DB: Backend>(pool: &Pool<DB>) -> Result<Transaction<'static, DB>> {
    pool.begin_with(DB::BEGIN_WRITE).await.map_err(backend)
}

/// The position of `after` among the tenant's rows of `table`, looked up even if that row has
/// since been deleted or has expired, so paging through a list that shrinks meanwhile still
/// moves forward.
async fn cursor<DB>(
    reader: &Pool<DB>,
    table: ListTable,
    tenant: &TenantId,
    after: Option<&str>,
) -> Result<Cursor>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
{
    let Some(after) = after else {
        return Ok(Cursor::Start);
    };
    let sql = match table {
        ListTable::Files => "SELECT created_at_us, id FROM files WHERE id = $1 AND tenant_id = $2",
        ListTable::Batches => {
            "SELECT created_at_us, id FROM batches WHERE id = $1 AND tenant_id = $2"
        }
    };
    let row = sqlx::query(sql)
        .bind(after)
        .bind(tenant.as_str())
        .fetch_optional(reader)
        .await
        .map_err(backend)?;
    Ok(match row {
        None => Cursor::Unknown,
        Some(r) => Cursor::After(r.int("created_at_us")?, r.text("id")?),
    })
}

/// Claims `claim` for `object_id` in `tx`: `None` when claimed (the key was free, or held by a
/// request more than 24 h old, which it replaces), else the live key's record — the caller
/// then records nothing. In Postgres a concurrent claim of the same key waits here for this
/// transaction to end (the primary key's row lock), then sees its row.
async fn claim_key<DB>(
    tx: &mut Transaction<'static, DB>,
    tenant: &TenantId,
    claim: &IdempotencyClaim,
    object_id: &str,
) -> Result<Option<IdempotencyRecord>>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
{
    let claimed = sqlx::query(
        "INSERT INTO idempotency_keys (tenant_id, idem_key, kind, request_hash, object_id, \
           created_at) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (tenant_id, idem_key) DO UPDATE SET kind = excluded.kind, \
           request_hash = excluded.request_hash, object_id = excluded.object_id, \
           created_at = excluded.created_at \
         WHERE idempotency_keys.created_at <= $7 \
         RETURNING object_id",
    )
    .bind(tenant.as_str())
    .bind(claim.key.as_str())
    .bind(claim.kind.as_str())
    .bind(claim.request_hash.as_str())
    .bind(object_id)
    .bind(claim.created_at)
    .bind(claim.created_at - IDEMPOTENCY_TTL_SECS)
    .fetch_all(&mut **tx)
    .await
    .map_err(backend)?;
    if !claimed.is_empty() {
        return Ok(None);
    }
    let row = sqlx::query(
        "SELECT idem_key, kind, request_hash, object_id, created_at FROM idempotency_keys \
         WHERE tenant_id = $1 AND idem_key = $2",
    )
    .bind(tenant.as_str())
    .bind(claim.key.as_str())
    .fetch_one(&mut **tx)
    .await
    .map_err(backend)?;
    idempotency_from_row(&row).map(Some)
}

// Besides `Backend`: transactions run statements, and the driver encodes every type the
// statements bind (both drivers do; sqlx has no single trait that says so).
#[async_trait]
impl<DB> MetadataStore for SqlStore<DB>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> Option<&'a str>: Encode<'a, DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
    for<'a> Option<i64>: Encode<'a, DB>,
    for<'a> i32: Encode<'a, DB> + Type<DB>,
    for<'a> serde_json::Value: Encode<'a, DB> + Type<DB>,
    for<'a> Option<serde_json::Value>: Encode<'a, DB>,
{
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.reader)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn create_tenant(&self, name: &str, key_hash: &str) -> Result<Tenant> {
        let id = TenantId::generate();
        let now = now_unix_micros();
        let mut tx = begin_write(&self.writer).await?;
        sqlx::query("INSERT INTO tenants (id, name, created_at_us) VALUES ($1, $2, $3)")
            .bind(id.as_str())
            .bind(name)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        sqlx::query(
            "INSERT INTO api_keys (key_hash, tenant_id, created_at_us) VALUES ($1, $2, $3)",
        )
        .bind(key_hash)
        .bind(id.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(Tenant {
            id,
            name: name.to_owned(),
        })
    }

    async fn ensure_tenant(&self, name: &str, key_hash: &str) -> Result<Tenant> {
        if let Some(t) = self.tenant_by_key(key_hash).await? {
            return Ok(t);
        }
        match self.create_tenant(name, key_hash).await {
            Ok(t) => Ok(t),
            // Another caller (a second scheduler) won the race: its tenant is the one.
            Err(MetadataError::Conflict(_)) => self
                .tenant_by_key(key_hash)
                .await?
                .ok_or_else(|| MetadataError::Backend("bootstrap key vanished".into())),
            Err(e) => Err(e),
        }
    }

    async fn tenant_by_key(&self, key_hash: &str) -> Result<Option<Tenant>> {
        let row = sqlx::query(
            "SELECT t.id, t.name FROM api_keys k JOIN tenants t ON t.id = k.tenant_id \
             WHERE k.key_hash = $1",
        )
        .bind(key_hash)
        .fetch_optional(&self.reader)
        .await
        .map_err(backend)?;
        row.as_ref().map(tenant_from_row).transpose()
    }

    async fn insert_file(&self, f: &FileRecord) -> Result<()> {
        let sql =
            format!("INSERT INTO files ({FILE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)");
        sqlx::query(AssertSqlSafe(sql))
            .bind(f.id.as_str())
            .bind(f.tenant_id.as_str())
            .bind(to_i64(f.bytes, "file size")?)
            .bind(f.created_at_us)
            .bind(f.expires_at)
            .bind(f.filename.as_str())
            .bind(f.purpose.as_str())
            .bind(f.storage_key.as_str())
            .execute(&self.writer)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn get_file(
        &self,
        tenant: &TenantId,
        id: &FileId,
        now: i64,
    ) -> Result<Option<FileRecord>> {
        let sql = format!(
            "SELECT {FILE_COLUMNS} FROM files WHERE id = $1 AND tenant_id = $2 \
             AND deleted_at IS NULL AND (expires_at IS NULL OR expires_at > $3)"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id.as_str())
            .bind(tenant.as_str())
            .bind(now)
            .fetch_optional(&self.reader)
            .await
            .map_err(backend)?;
        row.as_ref().map(file_from_row).transpose()
    }

    async fn file_as_of(
        &self,
        tenant: &TenantId,
        id: &FileId,
        at: i64,
    ) -> Result<Option<FileRecord>> {
        let sql = format!(
            "SELECT {FILE_COLUMNS} FROM files WHERE id = $1 AND tenant_id = $2 \
             AND (deleted_at IS NULL OR deleted_at >= $3) \
             AND (expires_at IS NULL OR expires_at > $3)"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id.as_str())
            .bind(tenant.as_str())
            .bind(at)
            .fetch_optional(&self.reader)
            .await
            .map_err(backend)?;
        row.as_ref().map(file_from_row).transpose()
    }

    async fn list_files(&self, tenant: &TenantId, q: &FileQuery, now: i64) -> Result<FilePage> {
        let after = q.after.as_ref().map(FileId::as_str);
        let cursor = cursor(&self.reader, ListTable::Files, tenant, after).await?;
        if matches!(cursor, Cursor::Unknown) {
            return Ok(FilePage {
                files: vec![],
                has_more: false,
            });
        }
        let (cmp, dir) = match q.order {
            Order::Desc => ("<", "DESC"),
            Order::Asc => (">", "ASC"),
        };
        let sql = format!(
            "SELECT {FILE_COLUMNS} FROM files WHERE tenant_id = $1 AND deleted_at IS NULL \
             AND (expires_at IS NULL OR expires_at > $2) AND ($3 IS NULL OR purpose = $3) \
             AND ($4 IS NULL OR (created_at_us, id) {cmp} ($4, $5)) \
             ORDER BY created_at_us {dir}, id {dir} LIMIT $6"
        );
        let (cursor_us, cursor_id) = cursor.bounds();
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(tenant.as_str())
            .bind(now)
            .bind(q.purpose.map(|p| p.as_str()))
            .bind(cursor_us)
            .bind(cursor_id.as_deref())
            .bind(i64::from(q.limit) + 1)
            .fetch_all(&self.reader)
            .await
            .map_err(backend)?;
        let files = rows.iter().map(file_from_row).collect::<Result<Vec<_>>>()?;
        let (files, has_more) = split_page(files, q.limit);
        Ok(FilePage { files, has_more })
    }

    async fn delete_file(
        &self,
        tenant: &TenantId,
        id: &FileId,
        now: i64,
    ) -> Result<Option<FileRecord>> {
        let sql = format!(
            "UPDATE files SET deleted_at = $3 WHERE id = $1 AND tenant_id = $2 \
             AND deleted_at IS NULL AND (expires_at IS NULL OR expires_at > $3) \
             RETURNING {FILE_COLUMNS}"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(id.as_str())
            .bind(tenant.as_str())
            .bind(now)
            .fetch_all(&self.writer)
            .await
            .map_err(backend)?;
        rows.first().map(file_from_row).transpose()
    }

    async fn sweepable_files(&self, now: i64, limit: u32) -> Result<Vec<FileRecord>> {
        let sql = format!(
            "SELECT {FILE_COLUMNS} FROM files f WHERE (deleted_at IS NOT NULL \
             OR (expires_at IS NOT NULL AND expires_at <= $1)) \
             AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.input_file_id = f.id \
               AND b.status IN ('validating', 'in_progress', 'finalizing', 'cancelling')) \
             ORDER BY COALESCE(deleted_at, expires_at) LIMIT $2"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await
            .map_err(backend)?;
        rows.iter().map(file_from_row).collect()
    }

    async fn input_in_use(&self, id: &FileId) -> Result<bool> {
        let row = sqlx::query(
            "SELECT EXISTS (SELECT 1 FROM batches WHERE input_file_id = $1 \
             AND status IN ('validating', 'in_progress', 'finalizing', 'cancelling')) AS used",
        )
        .bind(id.as_str())
        .fetch_one(&self.reader)
        .await
        .map_err(backend)?;
        row.flag("used")
    }

    async fn purge_file(&self, id: &FileId) -> Result<()> {
        sqlx::query("DELETE FROM files WHERE id = $1")
            .bind(id.as_str())
            .execute(&self.writer)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn insert_batch(&self, b: &BatchRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO batches (id, tenant_id, endpoint, input_file_id, completion_window, \
             status, metadata, output_expires_after, created_at_us, expires_at, traceparent) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(b.id.as_str())
        .bind(b.tenant_id.as_str())
        .bind(b.endpoint.as_str())
        .bind(b.input_file_id.as_str())
        .bind(b.completion_window.as_str())
        .bind(b.status.as_str())
        .bind(to_json(&b.metadata)?)
        .bind(b.output_expires_after_secs)
        .bind(b.created_at_us)
        .bind(b.expires_at)
        .bind(b.traceparent.as_deref())
        .execute(&self.writer)
        .await
        .map_err(backend)?;
        self.announce_created(&b.id);
        Ok(())
    }

    async fn get_batch(&self, tenant: &TenantId, id: &BatchId) -> Result<Option<BatchRecord>> {
        let sql = format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1 AND tenant_id = $2");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id.as_str())
            .bind(tenant.as_str())
            .fetch_optional(&self.reader)
            .await
            .map_err(backend)?;
        row.as_ref().map(batch_from_row).transpose()
    }

    async fn batch(&self, id: &BatchId) -> Result<Option<BatchRecord>> {
        let sql = format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id.as_str())
            .fetch_optional(&self.reader)
            .await
            .map_err(backend)?;
        row.as_ref().map(batch_from_row).transpose()
    }

    async fn list_batches(
        &self,
        tenant: &TenantId,
        limit: u32,
        after: Option<&BatchId>,
    ) -> Result<BatchPage> {
        let after = after.map(BatchId::as_str);
        let cursor = cursor(&self.reader, ListTable::Batches, tenant, after).await?;
        if matches!(cursor, Cursor::Unknown) {
            return Ok(BatchPage {
                batches: vec![],
                has_more: false,
            });
        }
        let (cursor_us, cursor_id) = cursor.bounds();
        let sql = format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE tenant_id = $1 \
             AND ($2 IS NULL OR (created_at_us, id) < ($2, $3)) \
             ORDER BY created_at_us DESC, id DESC LIMIT $4"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(tenant.as_str())
            .bind(cursor_us)
            .bind(cursor_id.as_deref())
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.reader)
            .await
            .map_err(backend)?;
        let batches = rows
            .iter()
            .map(batch_from_row)
            .collect::<Result<Vec<_>>>()?;
        let (batches, has_more) = split_page(batches, limit);
        Ok(BatchPage { batches, has_more })
    }

    async fn batches_with_status(&self, statuses: &[BatchStatus]) -> Result<Vec<BatchRecord>> {
        if statuses.is_empty() {
            return Ok(vec![]);
        }
        let mut select = QueryBuilder::<DB>::new(format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE status IN ("
        ));
        let mut names = select.separated(", ");
        for status in statuses {
            names.push_bind(status.as_str());
        }
        select.push(") ORDER BY created_at_us, id");
        let rows = select
            .build()
            .fetch_all(&self.reader)
            .await
            .map_err(backend)?;
        rows.iter().map(batch_from_row).collect()
    }

    async fn finish_validation(
        &self,
        id: &BatchId,
        outcome: &ValidationOutcome,
        now: i64,
        quotas: &Quotas,
    ) -> Result<Option<BatchRecord>> {
        let mut tx = begin_write(&self.writer).await?;
        let over_quota;
        let outcome = match outcome {
            ValidationOutcome::Ready { total, .. } => {
                let tenant = sqlx::query(
                    "SELECT tenant_id FROM batches WHERE id = $1 AND status = 'validating'",
                )
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(backend)?;
                let Some(tenant) = tenant else {
                    tx.rollback().await.map_err(backend)?;
                    return Ok(None);
                };
                let tenant = tenant.text("tenant_id")?;
                let tenant = TenantId::parse(&tenant)
                    .map_err(|_| crate::rows::corrupt("tenant id", &tenant))?;
                let checked = crate::quotas::check(
                    &mut tx,
                    &tenant,
                    Quota::EnqueuedRequests,
                    *total,
                    quotas,
                    now,
                )
                .await?;
                match checked {
                    Ok(()) => outcome,
                    Err(e) => {
                        over_quota = ValidationOutcome::Failed {
                            errors: vec![BatchError {
                                code: REQUEST_LIMIT_EXCEEDED.to_owned(),
                                line: None,
                                message: nightshift_core::quota::request_limit_message(
                                    e.adding, e.held, e.limit,
                                ),
                                param: None,
                            }],
                        };
                        &over_quota
                    }
                }
            }
            ValidationOutcome::Failed { .. } => outcome,
        };
        let sql = match outcome {
            ValidationOutcome::Failed { .. } => format!(
                "UPDATE batches SET status = 'failed', failed_at = $2, errors = $3 \
                 WHERE id = $1 AND status = 'validating' RETURNING {BATCH_COLUMNS}"
            ),
            ValidationOutcome::Ready { .. } => format!(
                "UPDATE batches SET status = 'in_progress', in_progress_at = $2, model = $3, \
                 total = $4 WHERE id = $1 AND status = 'validating' RETURNING {BATCH_COLUMNS}"
            ),
        };
        let query = sqlx::query(AssertSqlSafe(sql)).bind(id.as_str()).bind(now);
        let query = match outcome {
            ValidationOutcome::Failed { errors } => query.bind(to_json(errors)?),
            ValidationOutcome::Ready { model, total, .. } => {
                query.bind(model.as_str()).bind(to_i64(*total, "total")?)
            }
        };
        let rows = query.fetch_all(&mut *tx).await.map_err(backend)?;
        let Some(row) = rows.first() else {
            tx.rollback().await.map_err(backend)?;
            return Ok(None);
        };
        if let ValidationOutcome::Ready { chunks, .. } = outcome {
            // One statement per CHUNKS_PER_INSERT chunks, not one per chunk.
            for part in chunks.chunks(CHUNKS_PER_INSERT) {
                let mut spans = Vec::with_capacity(part.len());
                for c in part {
                    spans.push((
                        c.index as i32,
                        to_i64(c.byte_start, "chunk start")?,
                        to_i64(c.byte_end, "chunk end")?,
                        to_i64(c.first_line, "chunk first line")?,
                        c.line_count as i32,
                    ));
                }
                let mut insert = QueryBuilder::<DB>::new(format!(
                    "INSERT INTO chunks (batch_id, {SPAN_COLUMNS}) "
                ));
                insert.push_values(spans, |mut row, (idx, start, end, first, count)| {
                    row.push_bind(id.as_str())
                        .push_bind(idx)
                        .push_bind(start)
                        .push_bind(end)
                        .push_bind(first)
                        .push_bind(count);
                });
                insert.build().execute(&mut *tx).await.map_err(backend)?;
            }
        }
        let batch = batch_from_row(row)?;
        // A failed validation is terminal: its webhook event commits with it.
        crate::webhooks::enqueue_event(&mut tx, &batch, now).await?;
        tx.commit().await.map_err(backend)?;
        Ok(Some(batch))
    }

    async fn cancel_batch(
        &self,
        tenant: &TenantId,
        id: &BatchId,
        now: i64,
    ) -> Result<Option<CancelOutcome>> {
        let sql = format!(
            "UPDATE batches SET status = 'cancelling', cancelling_at = $3 WHERE id = $1 \
             AND tenant_id = $2 AND status IN ('validating', 'in_progress') \
             RETURNING {BATCH_COLUMNS}"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(id.as_str())
            .bind(tenant.as_str())
            .bind(now)
            .fetch_all(&self.writer)
            .await
            .map_err(backend)?;
        if let Some(row) = rows.first() {
            return batch_from_row(row).map(|b| Some(CancelOutcome::Cancelling(b)));
        }
        Ok(self.get_batch(tenant, id).await?.map(|b| match b.status {
            BatchStatus::Cancelling | BatchStatus::Cancelled => CancelOutcome::AlreadyCancelled(b),
            BatchStatus::Finalizing => CancelOutcome::Finalizing(b),
            _ => CancelOutcome::Terminal(b),
        }))
    }

    async fn chunks(&self, id: &BatchId) -> Result<Vec<ChunkSpan>> {
        let sql = format!("SELECT {SPAN_COLUMNS} FROM chunks WHERE batch_id = $1 ORDER BY idx");
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(id.as_str())
            .fetch_all(&self.reader)
            .await
            .map_err(backend)?;
        rows.iter().map(span_from_row).collect()
    }

    async fn chunk_states(&self, id: &BatchId) -> Result<Vec<ChunkState>> {
        let sql = format!(
            "SELECT {SPAN_COLUMNS}, state, failure, part_tally FROM chunks WHERE batch_id = $1 \
             ORDER BY idx"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(id.as_str())
            .fetch_all(&self.reader)
            .await
            .map_err(backend)?;
        rows.iter()
            .map(|r| {
                let state = r.text("state")?;
                Ok(ChunkState {
                    span: span_from_row(r)?,
                    done: state == "done",
                    failure: r.opt_text("failure")?.filter(|_| state == "failed"),
                    part: opt_json_col(r, "part_tally")?.filter(|_| state == "done"),
                })
            })
            .collect()
    }

    async fn dispatch_candidates(&self) -> Result<Vec<DispatchCandidate>> {
        let sql = format!(
            "SELECT {BATCH_COLUMNS}, ending, \
             (SELECT count(*) FROM chunks c WHERE c.batch_id = b.id AND c.state = 'dispatched') AS in_flight, \
             (SELECT count(*) FROM chunks c WHERE c.batch_id = b.id AND c.state = 'dispatched' \
                AND NOT c.started) AS queued, \
             (SELECT count(*) FROM chunks c WHERE c.batch_id = b.id AND c.state = 'pending') AS pending \
             FROM batches b WHERE status = 'in_progress' ORDER BY created_at_us, id"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.reader)
            .await
            .map_err(backend)?;
        rows.iter()
            .map(|r| {
                let in_flight = r.int("in_flight")?;
                let queued = r.int("queued")?;
                let pending = r.int("pending")?;
                let ending = r.opt_text("ending")?;
                Ok(DispatchCandidate {
                    batch: batch_from_row(r)?,
                    in_flight: in_flight as u32,
                    queued: queued as u32,
                    // an expiring batch hands out nothing more
                    pending: if ending.is_some() { 0 } else { pending as u32 },
                })
            })
            .collect()
    }

    async fn dispatch_accounts(&self) -> Result<Vec<DispatchAccount>> {
        let rows = sqlx::query("SELECT model, tenant_id, served FROM dispatch_accounts")
            .fetch_all(&self.reader)
            .await
            .map_err(backend)?;
        rows.iter().map(account_from_row).collect()
    }

    async fn save_dispatch_accounts(&self, accounts: &[DispatchAccount]) -> Result<()> {
        let mut tx = begin_write(&self.writer).await?;
        sqlx::query("DELETE FROM dispatch_accounts")
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        // 3 parameters a row: as many rows per statement as chunks in `finish_validation`
        for part in accounts.chunks(CHUNKS_PER_INSERT) {
            let mut rows = Vec::with_capacity(part.len());
            for a in part {
                rows.push((a, to_i64(a.served, "served lines")?));
            }
            let mut insert = QueryBuilder::<DB>::new(
                "INSERT INTO dispatch_accounts (model, tenant_id, served) ",
            );
            insert.push_values(rows, |mut row, (a, served)| {
                row.push_bind(a.model.as_str())
                    .push_bind(a.tenant.as_str())
                    .push_bind(served);
            });
            insert.build().execute(&mut *tx).await.map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(())
    }

    async fn claim_next_chunk(
        &self,
        id: &BatchId,
        now: i64,
        lease_secs: i64,
    ) -> Result<Option<LeasedChunk>> {
        // The choice and the update are one statement, and the chosen chunk is locked
        // (`SKIP_LOCKED`), so no other claim picks it in between.
        let sql = format!(
            "UPDATE chunks SET state = 'dispatched', attempts = attempts + 1, \
               lease_until = $2 + $3, started = false WHERE batch_id = $1 AND state = 'pending' \
             AND idx = (SELECT c.idx FROM chunks c JOIN batches b ON b.id = c.batch_id \
               WHERE c.batch_id = $1 AND c.state = 'pending' AND b.status = 'in_progress' \
               AND b.ending IS NULL AND b.expires_at > $2 ORDER BY c.idx LIMIT 1 {}) \
             RETURNING {LEASED_COLUMNS}",
            DB::SKIP_LOCKED
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(id.as_str())
            .bind(now)
            .bind(lease_secs)
            .fetch_all(&self.writer)
            .await
            .map_err(backend)?;
        rows.first().map(leased_from_row).transpose()
    }

    async fn release_chunk(&self, id: &BatchId, index: u32) -> Result<()> {
        sqlx::query(
            "UPDATE chunks SET state = 'pending', \
             attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, \
             lease_until = NULL, started = false \
             WHERE batch_id = $1 AND idx = $2 AND state = 'dispatched'",
        )
        .bind(id.as_str())
        .bind(index as i32)
        .execute(&self.writer)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn dispatched_chunks(&self, id: &BatchId) -> Result<Vec<LeasedChunk>> {
        let sql = format!(
            "SELECT {LEASED_COLUMNS} FROM chunks \
             WHERE batch_id = $1 AND state = 'dispatched' ORDER BY idx"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(id.as_str())
            .fetch_all(&self.reader)
            .await
            .map_err(backend)?;
        rows.iter().map(leased_from_row).collect()
    }

    async fn renew_chunk_lease(
        &self,
        id: &BatchId,
        index: u32,
        now: i64,
        lease_secs: i64,
    ) -> Result<bool> {
        let renewed = sqlx::query(
            "UPDATE chunks SET lease_until = $3 + $4, started = true \
             WHERE batch_id = $1 AND idx = $2 AND state = 'dispatched'",
        )
        .bind(id.as_str())
        .bind(index as i32)
        .bind(now)
        .bind(lease_secs)
        .execute(&self.writer)
        .await
        .map_err(backend)?;
        Ok(DB::rows_affected(&renewed) == 1)
    }

    async fn extend_chunk_lease(&self, id: &BatchId, index: u32, until: i64) -> Result<bool> {
        // A missing lease (NULL) compares as unknown: it becomes `until` too.
        let extended = sqlx::query(
            "UPDATE chunks SET lease_until = CASE WHEN lease_until > $3 THEN lease_until \
               ELSE $3 END \
             WHERE batch_id = $1 AND idx = $2 AND state = 'dispatched'",
        )
        .bind(id.as_str())
        .bind(index as i32)
        .bind(until)
        .execute(&self.writer)
        .await
        .map_err(backend)?;
        Ok(DB::rows_affected(&extended) == 1)
    }

    async fn complete_chunk(
        &self,
        id: &BatchId,
        index: u32,
        part: Option<&PartTally>,
    ) -> Result<bool> {
        let part = part.map(to_json).transpose()?;
        let done = sqlx::query(
            "UPDATE chunks SET state = 'done', lease_until = NULL, failure = NULL, \
               part_tally = $3 \
             WHERE batch_id = $1 AND idx = $2 AND state <> 'done'",
        )
        .bind(id.as_str())
        .bind(index as i32)
        .bind(part)
        .execute(&self.writer)
        .await
        .map_err(backend)?;
        Ok(DB::rows_affected(&done) == 1)
    }

    async fn fail_chunk(&self, id: &BatchId, index: u32, failure: &str) -> Result<bool> {
        let failed = sqlx::query(
            "UPDATE chunks SET state = 'failed', failure = $3, lease_until = NULL \
             WHERE batch_id = $1 AND idx = $2 AND state IN ('pending', 'dispatched')",
        )
        .bind(id.as_str())
        .bind(index as i32)
        .bind(failure)
        .execute(&self.writer)
        .await
        .map_err(backend)?;
        Ok(DB::rows_affected(&failed) == 1)
    }

    async fn sweep_chunk_leases(&self, now: i64, policy: &LeasePolicy) -> Result<LeaseSweep> {
        // Every statement re-checks the expired lease on the row it updates, so a heartbeat or
        // another scheduler's sweep that got there first wins (Postgres re-evaluates the WHERE
        // clause on a row another transaction changed meanwhile; in SQLite nothing else writes
        // during the transaction).
        let expired = "state = 'dispatched' AND COALESCE(lease_until, 0) <= $1";
        let max_attempts = i64::from(policy.max_attempts);
        let mut tx = begin_write(&self.writer).await?;
        let sql = format!(
            "UPDATE chunks SET state = 'failed', lease_until = NULL, \
               failure = 'the chunk was given up after ' || attempts \
                 || ' attempts (its executors stopped reporting)' \
             WHERE {expired} AND started AND attempts >= $2 \
               AND batch_id IN ({RUNNING_BATCHES}) RETURNING {LEASED_COLUMNS}"
        );
        let failed = sqlx::query(AssertSqlSafe(sql))
            .bind(now)
            .bind(max_attempts)
            .fetch_all(&mut *tx)
            .await
            .map_err(backend)?;
        let sql = format!(
            "UPDATE chunks SET attempts = attempts + 1, lease_until = $1 + $3, started = false \
             WHERE {expired} AND started AND attempts < $2 \
               AND batch_id IN ({RUNNING_BATCHES}) RETURNING {LEASED_COLUMNS}"
        );
        let redriven = sqlx::query(AssertSqlSafe(sql))
            .bind(now)
            .bind(max_attempts)
            .bind(policy.lease_secs)
            .fetch_all(&mut *tx)
            .await
            .map_err(backend)?;
        // Not started: waiting in the queue (extend), or lost (re-drive, uncounted).
        let sql = format!(
            "UPDATE chunks SET lease_until = $1 + $2, \
               attempts = CASE WHEN attempts < 1 THEN 1 ELSE attempts END \
             WHERE {expired} AND NOT started \
               AND batch_id IN ({RUNNING_BATCHES}) RETURNING {LEASED_COLUMNS}"
        );
        let unstarted = sqlx::query(AssertSqlSafe(sql))
            .bind(now)
            .bind(policy.lease_secs)
            .fetch_all(&mut *tx)
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        let leased =
            |rows: &[DB::Row]| rows.iter().map(leased_from_row).collect::<Result<Vec<_>>>();
        let mut sweep = LeaseSweep {
            redrive: leased(&redriven)?,
            failed: leased(&failed)?,
            extended: 0,
        };
        if policy.tasks_waiting {
            sweep.extended = unstarted.len() as u64;
        } else {
            sweep.redrive.extend(leased(&unstarted)?);
        }
        Ok(sweep)
    }

    async fn expire_due(&self, now: i64) -> Result<Vec<BatchRecord>> {
        let mut tx = begin_write(&self.writer).await?;
        let sql = format!(
            "UPDATE batches SET ending = 'expired' WHERE status = 'in_progress' \
             AND ending IS NULL AND expires_at <= $1 RETURNING {BATCH_COLUMNS}"
        );
        let mut rows = sqlx::query(AssertSqlSafe(sql))
            .bind(now)
            .fetch_all(&mut *tx)
            .await
            .map_err(backend)?;
        let sql = format!(
            "UPDATE batches SET status = 'expired', expired_at = $1 WHERE status = 'validating' \
             AND expires_at <= $1 RETURNING {BATCH_COLUMNS}"
        );
        let expired = sqlx::query(AssertSqlSafe(sql))
            .bind(now)
            .fetch_all(&mut *tx)
            .await
            .map_err(backend)?;
        // Validating batches expire here for good: their webhook events commit with them.
        for row in &expired {
            crate::webhooks::enqueue_event(&mut tx, &batch_from_row(row)?, now).await?;
        }
        rows.extend(expired);
        tx.commit().await.map_err(backend)?;
        rows.iter().map(batch_from_row).collect()
    }

    async fn request_finalize(
        &self,
        id: &BatchId,
        now: i64,
        ending_grace_secs: i64,
    ) -> Result<Option<BatchRecord>> {
        // Every SET expression reads the row as it was before the update.
        let sql = format!(
            "UPDATE batches SET finalize_requested_at = $2, \
               finalizing_at = CASE WHEN status = 'in_progress' THEN $2 ELSE finalizing_at END, \
               status = CASE WHEN status = 'in_progress' THEN 'finalizing' ELSE status END, \
               ending = CASE WHEN status = 'in_progress' AND ending IS NULL AND expires_at <= $2 \
                 THEN 'expired' ELSE ending END \
             WHERE id = $1 AND finalize_requested_at IS NULL \
               AND status IN ('in_progress', 'cancelling') \
               AND ( \
                 ((status = 'cancelling' OR ending IS NOT NULL OR expires_at <= $2) \
                  AND (NOT EXISTS (SELECT 1 FROM chunks WHERE batch_id = $1 \
                         AND state = 'dispatched' AND COALESCE(lease_until, 0) > $2) \
                       OR expires_at + $3 <= $2 \
                       OR (status = 'cancelling' AND cancelling_at + $3 <= $2))) \
                 OR NOT EXISTS (SELECT 1 FROM chunks WHERE batch_id = $1 \
                   AND state IN ('pending', 'dispatched'))) \
             RETURNING {BATCH_COLUMNS}"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(id.as_str())
            .bind(now)
            .bind(ending_grace_secs)
            .fetch_all(&self.writer)
            .await
            .map_err(backend)?;
        rows.first().map(batch_from_row).transpose()
    }

    async fn finalize_requested(&self) -> Result<Vec<BatchRecord>> {
        let sql = format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE finalize_requested_at IS NOT NULL \
             AND status IN ('finalizing', 'cancelling') ORDER BY finalize_requested_at"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.reader)
            .await
            .map_err(backend)?;
        rows.iter().map(batch_from_row).collect()
    }

    async fn claim_stalled_finalizations(
        &self,
        asked_before: i64,
        now: i64,
    ) -> Result<Vec<BatchRecord>> {
        let sql = format!(
            "UPDATE batches SET finalize_requested_at = $2 WHERE finalize_requested_at <= $1 \
             AND status IN ('finalizing', 'cancelling') \
             AND COALESCE(finalize_lease_until, 0) <= $2 RETURNING {BATCH_COLUMNS}"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(asked_before)
            .bind(now)
            .fetch_all(&self.writer)
            .await
            .map_err(backend)?;
        rows.iter().map(batch_from_row).collect()
    }

    async fn lease_finalization(
        &self,
        id: &BatchId,
        holder: &str,
        now: i64,
        ttl_secs: i64,
    ) -> Result<FinalizationLease> {
        let rows = sqlx::query(
            "UPDATE batches SET finalize_holder = $2, finalize_lease_until = $3 + $4 \
             WHERE id = $1 AND status IN ('finalizing', 'cancelling') \
             AND finalize_requested_at IS NOT NULL \
             AND (finalize_holder IS NULL OR finalize_holder = $2 \
                  OR COALESCE(finalize_lease_until, 0) <= $3) \
             RETURNING finalize_lease_until",
        )
        .bind(id.as_str())
        .bind(holder)
        .bind(now)
        .bind(ttl_secs)
        .fetch_all(&self.writer)
        .await
        .map_err(backend)?;
        if let Some(row) = rows.first() {
            return Ok(FinalizationLease {
                granted: true,
                expires_at: row.opt_int("finalize_lease_until")?,
                holder: None,
            });
        }
        let row = sqlx::query(
            "SELECT finalize_holder, finalize_lease_until FROM batches WHERE id = $1 \
             AND status IN ('finalizing', 'cancelling') AND finalize_lease_until > $2",
        )
        .bind(id.as_str())
        .bind(now)
        .fetch_optional(&self.reader)
        .await
        .map_err(backend)?;
        Ok(match row {
            Some(r) => FinalizationLease {
                granted: false,
                expires_at: r.opt_int("finalize_lease_until")?,
                holder: r.opt_text("finalize_holder")?,
            },
            None => FinalizationLease {
                granted: false,
                expires_at: None,
                holder: None,
            },
        })
    }

    async fn release_finalization(&self, id: &BatchId, holder: &str) -> Result<bool> {
        let released = sqlx::query(
            "UPDATE batches SET finalize_holder = NULL, finalize_lease_until = NULL \
             WHERE id = $1 AND finalize_holder = $2",
        )
        .bind(id.as_str())
        .bind(holder)
        .execute(&self.writer)
        .await
        .map_err(backend)?;
        Ok(DB::rows_affected(&released) == 1)
    }

    async fn ending(&self, id: &BatchId) -> Result<Option<Ending>> {
        let row = sqlx::query("SELECT status, ending FROM batches WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.reader)
            .await
            .map_err(backend)?;
        let Some(row) = row else { return Ok(None) };
        let status = row.text("status")?;
        let ending = row.opt_text("ending")?;
        Ok(match status.as_str() {
            "cancelling" => Some(Ending::Cancelled),
            "finalizing" if ending.as_deref() == Some("expired") => Some(Ending::Expired),
            "finalizing" => Some(Ending::Completed),
            _ => None,
        })
    }

    async fn commit_batch(&self, c: &BatchCommit, now: i64) -> Result<Option<BatchRecord>> {
        // Nothing else writes the batch between reading its status and ending it.
        let mut tx = begin_write(&self.writer).await?;
        let sql = format!(
            "SELECT {BATCH_COLUMNS}, ending FROM batches WHERE id = $1 {}",
            DB::FOR_UPDATE
        );
        let Some(row) = sqlx::query(AssertSqlSafe(sql))
            .bind(c.batch.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend)?
        else {
            tx.rollback().await.map_err(backend)?;
            return Ok(None);
        };
        let batch = batch_from_row(&row)?;
        if batch.status.is_terminal() {
            tx.rollback().await.map_err(backend)?;
            return Ok(Some(batch));
        }
        let ending = row.opt_text("ending")?;
        let (status, stamp_col) = match batch.status {
            BatchStatus::Cancelling => ("cancelled", "cancelled_at"),
            BatchStatus::Finalizing if ending.as_deref() == Some("expired") => {
                ("expired", "expired_at")
            }
            BatchStatus::Finalizing => ("completed", "completed_at"),
            other => {
                return Err(MetadataError::Backend(format!(
                    "commit of batch {} in status {other}",
                    c.batch
                )));
            }
        };
        let created_at_us = now_unix_micros();
        for (file, kind) in [(&c.output_file, "output"), (&c.error_file, "error")] {
            let Some(file) = file else { continue };
            let sql = format!(
                "INSERT INTO files ({FILE_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'batch_output', $7) ON CONFLICT (id) DO NOTHING"
            );
            let filename = format!("{}_{kind}.jsonl", batch.id);
            let storage_key = FileRecord::storage_key_for(&file.id);
            sqlx::query(AssertSqlSafe(sql))
                .bind(file.id.as_str())
                .bind(batch.tenant_id.as_str())
                .bind(to_i64(file.bytes, "file size")?)
                .bind(created_at_us)
                .bind(now + batch.output_expires_after_secs)
                .bind(filename.as_str())
                .bind(storage_key.as_str())
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        let sql = format!(
            "UPDATE batches SET status = $2, {stamp_col} = $3, output_file_id = $4, \
             error_file_id = $5, completed = $6, failed = $7, usage = $8 WHERE id = $1 \
             RETURNING {BATCH_COLUMNS}"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(c.batch.as_str())
            .bind(status)
            .bind(now)
            .bind(c.output_file.as_ref().map(|f| f.id.as_str()))
            .bind(c.error_file.as_ref().map(|f| f.id.as_str()))
            .bind(to_i64(c.completed, "completed")?)
            .bind(to_i64(c.failed, "failed")?)
            .bind(to_json(&c.usage)?)
            .fetch_all(&mut *tx)
            .await
            .map_err(backend)?;
        let row = rows
            .first()
            .ok_or_else(|| MetadataError::Backend(format!("batch {} vanished", c.batch)))?;
        let done = batch_from_row(row)?;
        // The terminal state and its webhook event commit together.
        crate::webhooks::enqueue_event(&mut tx, &done, now).await?;
        tx.commit().await.map_err(backend)?;
        Ok(Some(done))
    }

    async fn create_webhook_endpoint(
        &self,
        endpoint: &nightshift_core::webhook::WebhookEndpointRecord,
    ) -> Result<()> {
        crate::webhooks::insert_endpoint(&self.writer, endpoint).await
    }

    async fn list_webhook_endpoints(
        &self,
        tenant: &TenantId,
    ) -> Result<Vec<nightshift_core::webhook::WebhookEndpointRecord>> {
        crate::webhooks::list_endpoints(&self.reader, tenant).await
    }

    async fn webhook_endpoint(
        &self,
        tenant: &TenantId,
        id: &nightshift_core::WebhookEndpointId,
    ) -> Result<Option<nightshift_core::webhook::WebhookEndpointRecord>> {
        crate::webhooks::get_endpoint(&self.reader, tenant, id).await
    }

    async fn delete_webhook_endpoint(
        &self,
        tenant: &TenantId,
        id: &nightshift_core::WebhookEndpointId,
    ) -> Result<Option<nightshift_core::webhook::WebhookEndpointRecord>> {
        crate::webhooks::delete_endpoint(&self.writer, tenant, id).await
    }

    async fn rotate_webhook_secret(
        &self,
        tenant: &TenantId,
        id: &nightshift_core::WebhookEndpointId,
        secret: &str,
        keep_old_until: Option<i64>,
        now: i64,
    ) -> Result<Option<nightshift_core::webhook::WebhookEndpointRecord>> {
        crate::webhooks::rotate_secret(&self.writer, tenant, id, secret, keep_old_until, now).await
    }

    async fn claim_webhook_deliveries(
        &self,
        now: i64,
        lease_secs: i64,
        limit: u32,
    ) -> Result<Vec<crate::WebhookDelivery>> {
        crate::webhooks::claim_deliveries(&self.writer, now, lease_secs, limit).await
    }

    async fn finish_webhook_delivery(
        &self,
        delivery: &crate::WebhookDelivery,
        outcome: &crate::DeliveryOutcome,
        now: i64,
    ) -> Result<()> {
        crate::webhooks::finish_delivery(&self.writer, delivery, outcome, now).await
    }

    async fn webhook_deliveries_of(
        &self,
        batch: &BatchId,
    ) -> Result<Vec<crate::WebhookDeliveryState>> {
        crate::webhooks::deliveries_of(&self.reader, batch).await
    }

    async fn pending_webhook_deliveries(&self) -> Result<u64> {
        crate::webhooks::pending_deliveries(&self.reader).await
    }

    async fn purge_webhook_history(&self, before: i64) -> Result<u64> {
        crate::webhooks::purge_history(&self.writer, before).await
    }

    async fn insert_file_once(
        &self,
        f: &FileRecord,
        idempotency: Option<&IdempotencyClaim>,
        quotas: &Quotas,
    ) -> Result<Inserted> {
        let mut tx = begin_write(&self.writer).await?;
        if let Some(claim) = idempotency
            && let Some(earlier) = claim_key(&mut tx, &f.tenant_id, claim, f.id.as_str()).await?
        {
            tx.rollback().await.map_err(backend)?;
            return Ok(Inserted::Replayed(earlier));
        }
        let now = f.created_at_us.div_euclid(1_000_000);
        let checked = crate::quotas::check(
            &mut tx,
            &f.tenant_id,
            Quota::StoredBytes,
            f.bytes,
            quotas,
            now,
        )
        .await?;
        if let Err(e) = checked {
            tx.rollback().await.map_err(backend)?;
            return Err(MetadataError::QuotaExceeded(e));
        }
        let sql =
            format!("INSERT INTO files ({FILE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)");
        sqlx::query(AssertSqlSafe(sql))
            .bind(f.id.as_str())
            .bind(f.tenant_id.as_str())
            .bind(to_i64(f.bytes, "file size")?)
            .bind(f.created_at_us)
            .bind(f.expires_at)
            .bind(f.filename.as_str())
            .bind(f.purpose.as_str())
            .bind(f.storage_key.as_str())
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(Inserted::Created)
    }

    async fn insert_batch_once(
        &self,
        b: &BatchRecord,
        retry: Option<&RetrySource>,
        idempotency: Option<&IdempotencyClaim>,
        quotas: &Quotas,
    ) -> Result<Inserted> {
        let mut tx = begin_write(&self.writer).await?;
        if let Some(claim) = idempotency
            && let Some(earlier) = claim_key(&mut tx, &b.tenant_id, claim, b.id.as_str()).await?
        {
            tx.rollback().await.map_err(backend)?;
            return Ok(Inserted::Replayed(earlier));
        }
        let now = b.created_at_us.div_euclid(1_000_000);
        let checked =
            crate::quotas::check(&mut tx, &b.tenant_id, Quota::ActiveBatches, 1, quotas, now)
                .await?;
        if let Err(e) = checked {
            tx.rollback().await.map_err(backend)?;
            return Err(MetadataError::QuotaExceeded(e));
        }
        sqlx::query(
            "INSERT INTO batches (id, tenant_id, endpoint, input_file_id, completion_window, \
             status, metadata, output_expires_after, created_at_us, expires_at, traceparent) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(b.id.as_str())
        .bind(b.tenant_id.as_str())
        .bind(b.endpoint.as_str())
        .bind(b.input_file_id.as_str())
        .bind(b.completion_window.as_str())
        .bind(b.status.as_str())
        .bind(to_json(&b.metadata)?)
        .bind(b.output_expires_after_secs)
        .bind(b.created_at_us)
        .bind(b.expires_at)
        .bind(b.traceparent.as_deref())
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        if let Some(r) = retry {
            sqlx::query(
                "INSERT INTO batch_retries (batch_id, tenant_id, retry_of, filter, created_at_us) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(b.id.as_str())
            .bind(b.tenant_id.as_str())
            .bind(r.retry_of.as_str())
            .bind(to_json(&r.filter)?)
            .bind(b.created_at_us)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        self.announce_created(&b.id);
        Ok(Inserted::Created)
    }

    async fn tenant_quotas(&self, tenant: &TenantId) -> Result<Option<QuotaOverrides>> {
        crate::quotas::overrides(&self.reader, tenant).await
    }

    async fn set_tenant_quotas(
        &self,
        tenant: &TenantId,
        quotas: &QuotaOverrides,
        now_us: i64,
    ) -> Result<bool> {
        crate::quotas::set_overrides(&self.writer, tenant, quotas, now_us).await
    }

    async fn quota_usage(&self, tenant: &TenantId, now: i64) -> Result<QuotaUsage> {
        crate::quotas::usage(&self.reader, tenant, now).await
    }

    async fn list_tenants(&self) -> Result<Vec<Tenant>> {
        let rows = sqlx::query("SELECT id, name FROM tenants ORDER BY created_at_us, id")
            .fetch_all(&self.reader)
            .await
            .map_err(backend)?;
        rows.iter().map(tenant_from_row).collect()
    }

    async fn idempotency_record(
        &self,
        tenant: &TenantId,
        key: &str,
        now: i64,
    ) -> Result<Option<IdempotencyRecord>> {
        let row = sqlx::query(
            "SELECT idem_key, kind, request_hash, object_id, created_at FROM idempotency_keys \
             WHERE tenant_id = $1 AND idem_key = $2 AND created_at > $3",
        )
        .bind(tenant.as_str())
        .bind(key)
        .bind(now - IDEMPOTENCY_TTL_SECS)
        .fetch_optional(&self.reader)
        .await
        .map_err(backend)?;
        row.as_ref().map(idempotency_from_row).transpose()
    }

    async fn sweep_idempotency_keys(&self, now: i64, limit: u32) -> Result<u64> {
        let swept = sqlx::query(
            "DELETE FROM idempotency_keys WHERE (tenant_id, idem_key) IN \
             (SELECT tenant_id, idem_key FROM idempotency_keys WHERE created_at <= $1 \
              ORDER BY created_at LIMIT $2)",
        )
        .bind(now - IDEMPOTENCY_TTL_SECS)
        .bind(i64::from(limit))
        .execute(&self.writer)
        .await
        .map_err(backend)?;
        Ok(DB::rows_affected(&swept))
    }

    async fn retry_source(&self, batch: &BatchId) -> Result<Option<RetrySource>> {
        let row = sqlx::query(
            "SELECT batch_id, tenant_id, retry_of, filter FROM batch_retries WHERE batch_id = $1",
        )
        .bind(batch.as_str())
        .fetch_optional(&self.reader)
        .await
        .map_err(backend)?;
        row.as_ref().map(retry_from_row).transpose()
    }

    async fn list_retries(
        &self,
        tenant: &TenantId,
        parent: &BatchId,
        limit: u32,
        after: Option<&BatchId>,
    ) -> Result<BatchPage> {
        let after = after.map(BatchId::as_str);
        let cursor = cursor(&self.reader, ListTable::Batches, tenant, after).await?;
        if matches!(cursor, Cursor::Unknown) {
            return Ok(BatchPage {
                batches: vec![],
                has_more: false,
            });
        }
        let (cursor_us, cursor_id) = cursor.bounds();
        let columns = BATCH_COLUMNS
            .split(", ")
            .map(|c| format!("b.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {columns} FROM batches b JOIN batch_retries r ON r.batch_id = b.id \
             WHERE r.tenant_id = $1 AND r.retry_of = $2 AND b.tenant_id = $1 \
             AND ($3 IS NULL OR (b.created_at_us, b.id) < ($3, $4)) \
             ORDER BY b.created_at_us DESC, b.id DESC LIMIT $5"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(tenant.as_str())
            .bind(parent.as_str())
            .bind(cursor_us)
            .bind(cursor_id.as_deref())
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.reader)
            .await
            .map_err(backend)?;
        let batches = rows
            .iter()
            .map(batch_from_row)
            .collect::<Result<Vec<_>>>()?;
        let (batches, has_more) = split_page(batches, limit);
        Ok(BatchPage { batches, has_more })
    }
}
