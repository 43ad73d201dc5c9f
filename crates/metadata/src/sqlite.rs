//! The embedded SQLite adapter, for the single-process `nightshift standalone` deployment.
//!
//! Same tables, columns and units as [`PgStore`](crate::PgStore) (`migrations/sqlite` mirrors
//! `migrations/postgres`), same statements where SQLite allows, and the same records out: row
//! decoding is shared ([`crate::rows`]).
//!
//! Concurrency. SQLite lets one connection write at a time. Every write goes through a pool of
//! exactly one connection, so writers in this process queue for it in order, asynchronously,
//! instead of racing for the file lock and sleeping in SQLite's busy handler (which can give
//! up with `SQLITE_BUSY`). Reads go through a separate pool of `query_only` connections, which
//! WAL lets run alongside the writer; each read sees every transaction committed before it
//! started. Multi-statement writes begin with `BEGIN IMMEDIATE`: the write lock is taken up
//! front, where the busy timeout can wait for it, rather than on the first write after a read,
//! where a concurrent writer (another process: a `sqlite3` shell, a second nightshift by
//! mistake) makes the upgrade fail at once. What Postgres gets from row locks (`FOR UPDATE`,
//! `SKIP LOCKED`) SQLite gets from that single writer: a statement or transaction holding it
//! sees and changes the database alone, so claims stay atomic.
//!
//! Durability. WAL journal, with `synchronous` configurable ([`SqliteSync`]). The default,
//! `full`, syncs the WAL at every commit: a committed transaction survives `kill -9` and a
//! power cut. `normal` skips that sync: a committed transaction still survives the process
//! being killed (it is in the OS's cache once commit returns), but the last ones may be lost —
//! never half-applied — if the machine itself goes down. The control plane commits a few
//! times per chunk, so `full` costs little and is what a batch acknowledged to a client
//! deserves.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use nightshift_core::BatchId;
use nightshift_core::batch::{BatchRecord, BatchStatus};
use nightshift_core::chunking::ChunkSpan;
use nightshift_core::file::FileRecord;
use nightshift_core::page::Order;
use nightshift_core::time::now_unix_micros;
use nightshift_core::{FileId, TenantId};
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{
    Sqlite, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, QueryBuilder};

use crate::rows::{
    BATCH_COLUMNS, Columns, Cursor, LEASED_COLUMNS, backend, batch_from_row, file_from_row, get,
    leased_from_row, span_from_row, split_page, tenant_from_row, to_i64,
};
use crate::{
    BatchCommit, BatchPage, CancelOutcome, ChunkState, DispatchCandidate, Ending, FilePage,
    FileQuery, FinalizationLease, LeasePolicy, LeaseSweep, LeasedChunk, MetadataError,
    MetadataStore, Result, Tenant, ValidationOutcome,
};

/// The batches whose chunks the lease sweep looks after: running, not ending, before their
/// deadline (`?1` is `now`).
const RUNNING_BATCHES: &str = "SELECT id FROM batches WHERE status = 'in_progress' \
     AND ending IS NULL AND expires_at > ?1";

impl Columns for SqliteRow {
    fn text(&self, col: &str) -> Result<String> {
        get(self, col)
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>> {
        get(self, col)
    }
    fn int(&self, col: &str) -> Result<i64> {
        get(self, col)
    }
    fn opt_int(&self, col: &str) -> Result<Option<i64>> {
        get(self, col)
    }
    fn int4(&self, col: &str) -> Result<i32> {
        get(self, col)
    }
    /// `TEXT` holding JSON.
    fn json(&self, col: &str) -> Result<serde_json::Value> {
        let text: String = get(self, col)?;
        serde_json::from_str(&text).map_err(|e| crate::rows::corrupt(col, &e.to_string()))
    }
    fn traceparent(&self) -> Result<Option<String>> {
        get(self, "traceparent")
    }
}

/// A value as the JSON text stored in a `TEXT` column (where Postgres has `JSONB`).
fn to_json_text<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| MetadataError::Backend(format!("encode: {e}")))
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The columns of a file, as [`file_from_row`] reads them.
const FILE_COLUMNS: &str =
    "id, tenant_id, bytes, created_at_us, expires_at, filename, purpose, storage_key";

/// Chunks inserted per statement by [`MetadataStore::finish_validation`]: 6 parameters each,
/// well under SQLite's 32766 parameters per statement.
const CHUNKS_PER_INSERT: usize = 1000;

/// When a commit is synced to disk (SQLite's `synchronous` in WAL mode); see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSync {
    /// Survives the process being killed; the last commits may be lost on a power cut.
    Normal,
    /// Every commit is on disk before it returns: survives a power cut too.
    #[default]
    Full,
}

impl From<SqliteSync> for SqliteSynchronous {
    fn from(s: SqliteSync) -> Self {
        match s {
            SqliteSync::Normal => SqliteSynchronous::Normal,
            SqliteSync::Full => SqliteSynchronous::Full,
        }
    }
}

/// Where the embedded database lives and how it is used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SqliteConfig {
    /// The database file, created (with its directory) if missing. SQLite keeps two more files
    /// next to it while open (`-wal`, `-shm`): a backup must copy all three, or use
    /// `sqlite3 <path> .backup`.
    pub path: PathBuf,
    /// Connections that read; writes have one connection of their own.
    pub max_connections: u32,
    /// How long a query waits for a free connection (writes: for their turn) before failing.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// How long a connection waits for a lock held by another process before `SQLITE_BUSY`.
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
    /// When commits reach the disk.
    pub synchronous: SqliteSync,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data/metadata.sqlite"),
            max_connections: 4,
            acquire_timeout: Duration::from_secs(5),
            busy_timeout: Duration::from_secs(5),
            synchronous: SqliteSync::Full,
        }
    }
}

/// [`MetadataStore`] over an SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The one connection that writes: writers of this process queue for it.
    writer: SqlitePool,
    /// Connections that only read (`query_only`), running alongside the writer thanks to WAL.
    reader: SqlitePool,
}

/// The tables that are listed with cursors.
#[derive(Clone, Copy)]
enum ListTable {
    Files,
    Batches,
}

impl SqliteStore {
    /// The writing connection: direct SQL for tools and tests (writes queue with the store's
    /// own, so they never see `SQLITE_BUSY`).
    pub fn pool(&self) -> &SqlitePool {
        &self.writer
    }

    /// Opens the database (creating the file and its directory if missing) and brings the
    /// schema up to date. One process only: migrations take no cross-process lock.
    pub async fn open(config: &SqliteConfig) -> Result<Self> {
        if config.max_connections == 0 {
            return Err(MetadataError::Backend(
                "metadata.sqlite.max_connections must be at least 1".into(),
            ));
        }
        if let Some(dir) = config.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await.map_err(|e| {
                MetadataError::Backend(format!("create directory {}: {e}", dir.display()))
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(&config.path)
            .foreign_keys(true)
            .busy_timeout(config.busy_timeout);
        let open_error =
            |e: sqlx::Error| MetadataError::Backend(format!("open {}: {e}", config.path.display()));
        // WAL is a property of the file, set once by the writer; readers find it there.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(config.acquire_timeout)
            .connect_with(
                options
                    .clone()
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(config.synchronous.into()),
            )
            .await
            .map_err(open_error)?;
        MIGRATOR
            .run(&writer)
            .await
            .map_err(|e| MetadataError::Backend(format!("migrate: {e}")))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.acquire_timeout)
            .connect_with(options.pragma("query_only", "ON"))
            .await
            .map_err(open_error)?;
        Ok(Self { writer, reader })
    }

    /// Begins a read-modify-write transaction holding the write lock from its first statement.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Sqlite>> {
        self.writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)
    }

    /// The position of `after` among the tenant's rows of `table`, looked up even if that row
    /// has since been deleted or has expired, so paging through a list that shrinks meanwhile
    /// still moves forward.
    async fn cursor(
        &self,
        table: ListTable,
        tenant: &TenantId,
        after: Option<&str>,
    ) -> Result<Cursor> {
        let Some(after) = after else {
            return Ok(Cursor::Start);
        };
        let sql = match table {
            ListTable::Files => {
                "SELECT created_at_us, id FROM files WHERE id = ?1 AND tenant_id = ?2"
            }
            ListTable::Batches => {
                "SELECT created_at_us, id FROM batches WHERE id = ?1 AND tenant_id = ?2"
            }
        };
        let row = sqlx::query(sql)
            .bind(after)
            .bind(tenant.as_str())
            .fetch_optional(&self.reader)
            .await
            .map_err(backend)?;
        Ok(match row {
            None => Cursor::Unknown,
            Some(r) => Cursor::After(r.int("created_at_us")?, r.text("id")?),
        })
    }
}

// Statements that write and return rows (`RETURNING`) are always read with `fetch_all`, even
// when one row at most comes back: SQLite ends an autocommit statement's transaction only once
// the statement has run to completion, and `fetch_optional` stops stepping after the first row.

#[async_trait]
impl MetadataStore for SqliteStore {
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
        let mut tx = self.begin_write().await?;
        sqlx::query("INSERT INTO tenants (id, name, created_at_us) VALUES (?1, ?2, ?3)")
            .bind(id.as_str())
            .bind(name)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        sqlx::query(
            "INSERT INTO api_keys (key_hash, tenant_id, created_at_us) VALUES (?1, ?2, ?3)",
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
            // Another caller won the race: its tenant is the one.
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
             WHERE k.key_hash = ?1",
        )
        .bind(key_hash)
        .fetch_optional(&self.reader)
        .await
        .map_err(backend)?;
        row.as_ref().map(tenant_from_row).transpose()
    }

    async fn insert_file(&self, f: &FileRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO files (id, tenant_id, bytes, created_at_us, expires_at, filename, \
             purpose, storage_key) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .bind(f.id.as_str())
        .bind(f.tenant_id.as_str())
        .bind(to_i64(f.bytes, "file size")?)
        .bind(f.created_at_us)
        .bind(f.expires_at)
        .bind(&f.filename)
        .bind(f.purpose.as_str())
        .bind(&f.storage_key)
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
            "SELECT {FILE_COLUMNS} FROM files WHERE id = ?1 AND tenant_id = ?2 \
             AND deleted_at IS NULL AND (expires_at IS NULL OR expires_at > ?3)"
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
            "SELECT {FILE_COLUMNS} FROM files WHERE id = ?1 AND tenant_id = ?2 \
             AND (deleted_at IS NULL OR deleted_at >= ?3) \
             AND (expires_at IS NULL OR expires_at > ?3)"
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
        let cursor = self
            .cursor(
                ListTable::Files,
                tenant,
                q.after.as_ref().map(FileId::as_str),
            )
            .await?;
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
            "SELECT {FILE_COLUMNS} FROM files WHERE tenant_id = ?1 AND deleted_at IS NULL \
             AND (expires_at IS NULL OR expires_at > ?2) AND (?3 IS NULL OR purpose = ?3) \
             AND (?4 IS NULL OR (created_at_us, id) {cmp} (?4, ?5)) \
             ORDER BY created_at_us {dir}, id {dir} LIMIT ?6"
        );
        let (cursor_us, cursor_id) = cursor.bounds();
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(tenant.as_str())
            .bind(now)
            .bind(q.purpose.map(|p| p.as_str()))
            .bind(cursor_us)
            .bind(cursor_id)
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
            "UPDATE files SET deleted_at = ?3 WHERE id = ?1 AND tenant_id = ?2 \
             AND deleted_at IS NULL AND (expires_at IS NULL OR expires_at > ?3) \
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
             OR (expires_at IS NOT NULL AND expires_at <= ?1)) \
             AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.input_file_id = f.id \
               AND b.status IN ('validating', 'in_progress', 'finalizing', 'cancelling')) \
             ORDER BY COALESCE(deleted_at, expires_at) LIMIT ?2"
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
            "SELECT EXISTS (SELECT 1 FROM batches WHERE input_file_id = ?1 \
             AND status IN ('validating', 'in_progress', 'finalizing', 'cancelling')) AS used",
        )
        .bind(id.as_str())
        .fetch_one(&self.reader)
        .await
        .map_err(backend)?;
        Ok(row.int("used")? != 0)
    }

    async fn purge_file(&self, id: &FileId) -> Result<()> {
        sqlx::query("DELETE FROM files WHERE id = ?1")
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
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )
        .bind(b.id.as_str())
        .bind(b.tenant_id.as_str())
        .bind(&b.endpoint)
        .bind(&b.input_file_id)
        .bind(&b.completion_window)
        .bind(b.status.as_str())
        .bind(to_json_text(&b.metadata)?)
        .bind(b.output_expires_after_secs)
        .bind(b.created_at_us)
        .bind(b.expires_at)
        .bind(b.traceparent.as_deref())
        .execute(&self.writer)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn get_batch(&self, tenant: &TenantId, id: &BatchId) -> Result<Option<BatchRecord>> {
        let sql = format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1 AND tenant_id = ?2");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id.as_str())
            .bind(tenant.as_str())
            .fetch_optional(&self.reader)
            .await
            .map_err(backend)?;
        row.as_ref().map(batch_from_row).transpose()
    }

    async fn batch(&self, id: &BatchId) -> Result<Option<BatchRecord>> {
        let sql = format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1");
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
        let cursor = self
            .cursor(ListTable::Batches, tenant, after.map(BatchId::as_str))
            .await?;
        if matches!(cursor, Cursor::Unknown) {
            return Ok(BatchPage {
                batches: vec![],
                has_more: false,
            });
        }
        let (cursor_us, cursor_id) = cursor.bounds();
        let sql = format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE tenant_id = ?1 \
             AND (?2 IS NULL OR (created_at_us, id) < (?2, ?3)) \
             ORDER BY created_at_us DESC, id DESC LIMIT ?4"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(tenant.as_str())
            .bind(cursor_us)
            .bind(cursor_id)
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
        // No arrays in SQLite: the statuses travel as one JSON array, unpacked by json_each.
        let names: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
        let sql = format!(
            "SELECT {BATCH_COLUMNS} FROM batches \
             WHERE status IN (SELECT value FROM json_each(?1)) ORDER BY created_at_us, id"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(to_json_text(&names)?)
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
    ) -> Result<Option<BatchRecord>> {
        let mut tx = self.begin_write().await?;
        let sql = match outcome {
            ValidationOutcome::Failed { .. } => format!(
                "UPDATE batches SET status = 'failed', failed_at = ?2, errors = ?3 \
                 WHERE id = ?1 AND status = 'validating' RETURNING {BATCH_COLUMNS}"
            ),
            ValidationOutcome::Ready { .. } => format!(
                "UPDATE batches SET status = 'in_progress', in_progress_at = ?2, model = ?3, \
                 total = ?4 WHERE id = ?1 AND status = 'validating' RETURNING {BATCH_COLUMNS}"
            ),
        };
        let query = sqlx::query(AssertSqlSafe(sql)).bind(id.as_str()).bind(now);
        let query = match outcome {
            ValidationOutcome::Failed { errors } => query.bind(to_json_text(errors)?),
            ValidationOutcome::Ready { model, total, .. } => {
                query.bind(model.clone()).bind(to_i64(*total, "total")?)
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
                let mut insert = QueryBuilder::<Sqlite>::new(
                    "INSERT INTO chunks (batch_id, idx, byte_start, byte_end, first_line, \
                     line_count) ",
                );
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
            "UPDATE batches SET status = 'cancelling', cancelling_at = ?3 WHERE id = ?1 \
             AND tenant_id = ?2 AND status IN ('validating', 'in_progress') \
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
        let rows = sqlx::query(
            "SELECT idx, byte_start, byte_end, first_line, line_count FROM chunks \
             WHERE batch_id = ?1 ORDER BY idx",
        )
        .bind(id.as_str())
        .fetch_all(&self.reader)
        .await
        .map_err(backend)?;
        rows.iter().map(span_from_row).collect()
    }

    async fn chunk_states(&self, id: &BatchId) -> Result<Vec<ChunkState>> {
        let rows = sqlx::query(
            "SELECT idx, byte_start, byte_end, first_line, line_count, state, failure FROM chunks \
             WHERE batch_id = ?1 ORDER BY idx",
        )
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
                })
            })
            .collect()
    }

    async fn dispatch_candidates(&self) -> Result<Vec<DispatchCandidate>> {
        let sql = format!(
            "SELECT {BATCH_COLUMNS}, ending, \
             (SELECT count(*) FROM chunks c WHERE c.batch_id = b.id AND c.state = 'dispatched') AS in_flight, \
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
                let pending = r.int("pending")?;
                let ending = r.opt_text("ending")?;
                Ok(DispatchCandidate {
                    batch: batch_from_row(r)?,
                    in_flight: in_flight as u32,
                    // an expiring batch hands out nothing more
                    pending: if ending.is_some() { 0 } else { pending as u32 },
                })
            })
            .collect()
    }

    async fn claim_next_chunk(
        &self,
        id: &BatchId,
        now: i64,
        lease_secs: i64,
    ) -> Result<Option<LeasedChunk>> {
        // One statement under the single write lock: no other claim can pick the same chunk
        // between the choice and the update (Postgres needs FOR UPDATE SKIP LOCKED for that).
        let sql = format!(
            "UPDATE chunks SET state = 'dispatched', attempts = attempts + 1, \
               lease_until = ?2 + ?3, started = 0 WHERE batch_id = ?1 AND state = 'pending' \
             AND idx = (SELECT c.idx FROM chunks c JOIN batches b ON b.id = c.batch_id \
               WHERE c.batch_id = ?1 AND c.state = 'pending' AND b.status = 'in_progress' \
               AND b.ending IS NULL AND b.expires_at > ?2 ORDER BY c.idx LIMIT 1) \
             RETURNING {LEASED_COLUMNS}"
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
            "UPDATE chunks SET state = 'pending', attempts = max(attempts - 1, 0), \
             lease_until = NULL, started = 0 \
             WHERE batch_id = ?1 AND idx = ?2 AND state = 'dispatched'",
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
             WHERE batch_id = ?1 AND state = 'dispatched' ORDER BY idx"
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
            "UPDATE chunks SET lease_until = ?3 + ?4, started = 1 \
             WHERE batch_id = ?1 AND idx = ?2 AND state = 'dispatched'",
        )
        .bind(id.as_str())
        .bind(index as i32)
        .bind(now)
        .bind(lease_secs)
        .execute(&self.writer)
        .await
        .map_err(backend)?;
        Ok(renewed.rows_affected() == 1)
    }

    async fn extend_chunk_lease(&self, id: &BatchId, index: u32, until: i64) -> Result<bool> {
        let extended = sqlx::query(
            "UPDATE chunks SET lease_until = max(COALESCE(lease_until, ?3), ?3) \
             WHERE batch_id = ?1 AND idx = ?2 AND state = 'dispatched'",
        )
        .bind(id.as_str())
        .bind(index as i32)
        .bind(until)
        .execute(&self.writer)
        .await
        .map_err(backend)?;
        Ok(extended.rows_affected() == 1)
    }

    async fn complete_chunk(&self, id: &BatchId, index: u32) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE chunks SET state = 'done', lease_until = NULL, failure = NULL \
             WHERE batch_id = ?1 AND idx = ?2 AND state <> 'done'",
        )
        .bind(id.as_str())
        .bind(index as i32)
        .execute(&self.writer)
        .await
        .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn fail_chunk(&self, id: &BatchId, index: u32, failure: &str) -> Result<bool> {
        let failed = sqlx::query(
            "UPDATE chunks SET state = 'failed', failure = ?3, lease_until = NULL \
             WHERE batch_id = ?1 AND idx = ?2 AND state IN ('pending', 'dispatched')",
        )
        .bind(id.as_str())
        .bind(index as i32)
        .bind(failure)
        .execute(&self.writer)
        .await
        .map_err(backend)?;
        Ok(failed.rows_affected() == 1)
    }

    async fn sweep_chunk_leases(&self, now: i64, policy: &LeasePolicy) -> Result<LeaseSweep> {
        // One write transaction: nothing else writes between the three steps.
        let expired = "state = 'dispatched' AND COALESCE(lease_until, 0) <= ?1";
        let max_attempts = i64::from(policy.max_attempts);
        let mut tx = self.begin_write().await?;
        let sql = format!(
            "UPDATE chunks SET state = 'failed', lease_until = NULL, \
               failure = 'the chunk was given up after ' || attempts \
                 || ' attempts (its executors stopped reporting)' \
             WHERE {expired} AND started = 1 AND attempts >= ?2 \
               AND batch_id IN ({RUNNING_BATCHES}) RETURNING {LEASED_COLUMNS}"
        );
        let failed = sqlx::query(AssertSqlSafe(sql))
            .bind(now)
            .bind(max_attempts)
            .fetch_all(&mut *tx)
            .await
            .map_err(backend)?
            .iter()
            .map(leased_from_row)
            .collect::<Result<Vec<_>>>()?;
        let sql = format!(
            "UPDATE chunks SET attempts = attempts + 1, lease_until = ?1 + ?3, started = 0 \
             WHERE {expired} AND started = 1 AND attempts < ?2 \
               AND batch_id IN ({RUNNING_BATCHES}) RETURNING {LEASED_COLUMNS}"
        );
        let mut redrive = sqlx::query(AssertSqlSafe(sql))
            .bind(now)
            .bind(max_attempts)
            .bind(policy.lease_secs)
            .fetch_all(&mut *tx)
            .await
            .map_err(backend)?
            .iter()
            .map(leased_from_row)
            .collect::<Result<Vec<_>>>()?;
        // Not started: waiting in the queue (extend), or lost (re-drive, uncounted).
        let sql = format!(
            "UPDATE chunks SET lease_until = ?1 + ?2, attempts = max(attempts, 1) \
             WHERE {expired} AND started = 0 \
               AND batch_id IN ({RUNNING_BATCHES}) RETURNING {LEASED_COLUMNS}"
        );
        let unstarted = sqlx::query(AssertSqlSafe(sql))
            .bind(now)
            .bind(policy.lease_secs)
            .fetch_all(&mut *tx)
            .await
            .map_err(backend)?
            .iter()
            .map(leased_from_row)
            .collect::<Result<Vec<_>>>()?;
        tx.commit().await.map_err(backend)?;
        let mut extended = 0;
        if policy.tasks_waiting {
            extended = unstarted.len() as u64;
        } else {
            redrive.extend(unstarted);
        }
        Ok(LeaseSweep {
            redrive,
            failed,
            extended,
        })
    }

    async fn expire_due(&self, now: i64) -> Result<Vec<BatchRecord>> {
        let mut tx = self.begin_write().await?;
        let sql = format!(
            "UPDATE batches SET ending = 'expired' WHERE status = 'in_progress' \
             AND ending IS NULL AND expires_at <= ?1 RETURNING {BATCH_COLUMNS}"
        );
        let mut rows = sqlx::query(AssertSqlSafe(sql))
            .bind(now)
            .fetch_all(&mut *tx)
            .await
            .map_err(backend)?;
        let sql = format!(
            "UPDATE batches SET status = 'expired', expired_at = ?1 WHERE status = 'validating' \
             AND expires_at <= ?1 RETURNING {BATCH_COLUMNS}"
        );
        rows.extend(
            sqlx::query(AssertSqlSafe(sql))
                .bind(now)
                .fetch_all(&mut *tx)
                .await
                .map_err(backend)?,
        );
        let batches = rows
            .iter()
            .map(batch_from_row)
            .collect::<Result<Vec<_>>>()?;
        tx.commit().await.map_err(backend)?;
        Ok(batches)
    }

    async fn request_finalize(
        &self,
        id: &BatchId,
        now: i64,
        ending_grace_secs: i64,
    ) -> Result<Option<BatchRecord>> {
        // As in Postgres, every SET expression reads the row as it was before the update.
        let sql = format!(
            "UPDATE batches SET finalize_requested_at = ?2, \
               finalizing_at = CASE WHEN status = 'in_progress' THEN ?2 ELSE finalizing_at END, \
               status = CASE WHEN status = 'in_progress' THEN 'finalizing' ELSE status END, \
               ending = CASE WHEN status = 'in_progress' AND ending IS NULL AND expires_at <= ?2 \
                 THEN 'expired' ELSE ending END \
             WHERE id = ?1 AND finalize_requested_at IS NULL \
               AND status IN ('in_progress', 'cancelling') \
               AND ( \
                 ((status = 'cancelling' OR ending IS NOT NULL OR expires_at <= ?2) \
                  AND (NOT EXISTS (SELECT 1 FROM chunks WHERE batch_id = ?1 \
                         AND state = 'dispatched' AND COALESCE(lease_until, 0) > ?2) \
                       OR expires_at + ?3 <= ?2 \
                       OR (status = 'cancelling' AND cancelling_at + ?3 <= ?2))) \
                 OR NOT EXISTS (SELECT 1 FROM chunks WHERE batch_id = ?1 \
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
            "UPDATE batches SET finalize_requested_at = ?2 WHERE finalize_requested_at <= ?1 \
             AND status IN ('finalizing', 'cancelling') \
             AND COALESCE(finalize_lease_until, 0) <= ?2 RETURNING {BATCH_COLUMNS}"
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
            "UPDATE batches SET finalize_holder = ?2, finalize_lease_until = ?3 + ?4 \
             WHERE id = ?1 AND status IN ('finalizing', 'cancelling') \
             AND finalize_requested_at IS NOT NULL \
             AND (finalize_holder IS NULL OR finalize_holder = ?2 \
                  OR COALESCE(finalize_lease_until, 0) <= ?3) \
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
            "SELECT finalize_holder, finalize_lease_until FROM batches WHERE id = ?1 \
             AND status IN ('finalizing', 'cancelling') AND finalize_lease_until > ?2",
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
             WHERE id = ?1 AND finalize_holder = ?2",
        )
        .bind(id.as_str())
        .bind(holder)
        .execute(&self.writer)
        .await
        .map_err(backend)?;
        Ok(released.rows_affected() == 1)
    }

    async fn ending(&self, id: &BatchId) -> Result<Option<Ending>> {
        let row = sqlx::query("SELECT status, ending FROM batches WHERE id = ?1")
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
        // BEGIN IMMEDIATE stands for Postgres' SELECT ... FOR UPDATE: nothing else writes
        // between reading the status and ending the batch.
        let mut tx = self.begin_write().await?;
        let sql = format!("SELECT {BATCH_COLUMNS}, ending FROM batches WHERE id = ?1");
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
            sqlx::query(
                "INSERT INTO files (id, tenant_id, bytes, created_at_us, expires_at, filename, \
                 purpose, storage_key) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'batch_output', ?7) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(file.id.as_str())
            .bind(batch.tenant_id.as_str())
            .bind(to_i64(file.bytes, "file size")?)
            .bind(created_at_us)
            .bind(now + batch.output_expires_after_secs)
            .bind(format!("{}_{kind}.jsonl", batch.id))
            .bind(FileRecord::storage_key_for(&file.id))
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        }
        let sql = format!(
            "UPDATE batches SET status = ?2, {stamp_col} = ?3, output_file_id = ?4, \
             error_file_id = ?5, completed = ?6, failed = ?7, usage = ?8 WHERE id = ?1 \
             RETURNING {BATCH_COLUMNS}"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(c.batch.as_str())
            .bind(status)
            .bind(now)
            .bind(c.output_file.as_ref().map(|f| f.id.to_string()))
            .bind(c.error_file.as_ref().map(|f| f.id.to_string()))
            .bind(to_i64(c.completed, "completed")?)
            .bind(to_i64(c.failed, "failed")?)
            .bind(to_json_text(&c.usage)?)
            .fetch_all(&mut *tx)
            .await
            .map_err(backend)?;
        let row = rows
            .first()
            .ok_or_else(|| MetadataError::Backend(format!("batch {} vanished", c.batch)))?;
        let done = batch_from_row(row)?;
        tx.commit().await.map_err(backend)?;
        Ok(Some(done))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use nightshift_core::apikey;
    use nightshift_core::batch::RequestCounts;

    use super::*;
    use crate::BatchCommit;

    async fn open_in(dir: &tempfile::TempDir) -> SqliteStore {
        SqliteStore::open(&SqliteConfig {
            path: dir.path().join("nested/dir/metadata.sqlite"),
            ..SqliteConfig::default()
        })
        .await
        .expect("open")
    }

    async fn pragma(pool: &SqlitePool, name: &str) -> String {
        let row = sqlx::query(AssertSqlSafe(format!("PRAGMA {name}")))
            .fetch_one(pool)
            .await
            .expect("pragma");
        let v: sqlx::Result<String> = sqlx::Row::try_get(&row, 0);
        v.or_else(|_| sqlx::Row::try_get::<i64, _>(&row, 0).map(|i| i.to_string()))
            .expect("pragma value")
    }

    fn batch(tenant: &TenantId) -> BatchRecord {
        BatchRecord {
            id: BatchId::generate(),
            tenant_id: tenant.clone(),
            endpoint: "/v1/chat/completions".into(),
            input_file_id: FileId::generate().to_string(),
            completion_window: "24h".into(),
            status: BatchStatus::Validating,
            model: None,
            errors: vec![],
            metadata: None,
            output_expires_after_secs: 3600,
            output_file_id: None,
            error_file_id: None,
            created_at_us: 1_800_000_000_000_000,
            in_progress_at: None,
            expires_at: 1_800_086_400,
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: RequestCounts::default(),
            usage: Default::default(),
            traceparent: None,
        }
    }

    fn spans(n: u32) -> Vec<ChunkSpan> {
        (0..n)
            .map(|i| ChunkSpan {
                index: i,
                byte_start: u64::from(i) * 10,
                byte_end: u64::from(i) * 10 + 10,
                first_line: u64::from(i) + 1,
                line_count: 1,
            })
            .collect()
    }

    /// A running batch of `n` one-line chunks.
    async fn running(store: &SqliteStore, n: u32) -> BatchRecord {
        let t = store
            .create_tenant("t", &apikey::digest(&apikey::generate()))
            .await
            .expect("tenant");
        let b = batch(&t.id);
        store.insert_batch(&b).await.expect("insert");
        let ready = ValidationOutcome::Ready {
            model: "m".into(),
            total: u64::from(n),
            chunks: spans(n),
        };
        store
            .finish_validation(&b.id, &ready, 1_800_000_001)
            .await
            .expect("finish")
            .expect("validating")
    }

    #[test]
    fn config_defaults_fill_what_is_not_given() {
        let c: SqliteConfig = serde_json::from_str(
            r#"{"path": "/var/lib/nightshift/m.db", "synchronous": "normal"}"#,
        )
        .expect("parse");
        assert_eq!(c.path, PathBuf::from("/var/lib/nightshift/m.db"));
        assert_eq!(c.synchronous, SqliteSync::Normal);
        assert_eq!(c.max_connections, SqliteConfig::default().max_connections);
        let c: SqliteConfig = serde_json::from_str(r#"{"busy_timeout": "250ms"}"#).expect("parse");
        assert_eq!(c.busy_timeout, Duration::from_millis(250));
        assert_eq!(c.synchronous, SqliteSync::Full);
        assert!(serde_json::from_str::<SqliteConfig>(r#"{"pth": "x"}"#).is_err());
        assert!(serde_json::from_str::<SqliteConfig>(r#"{"synchronous": "off"}"#).is_err());
    }

    #[tokio::test]
    async fn open_creates_the_file_in_wal_mode_with_durable_commits() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open_in(&dir).await;
        assert!(dir.path().join("nested/dir/metadata.sqlite").is_file());
        assert_eq!(pragma(&store.writer, "journal_mode").await, "wal");
        assert_eq!(pragma(&store.writer, "synchronous").await, "2"); // FULL
        assert_eq!(pragma(&store.writer, "foreign_keys").await, "1");
        assert_eq!(pragma(&store.writer, "busy_timeout").await, "5000");
        assert_eq!(pragma(&store.reader, "foreign_keys").await, "1");
    }

    #[tokio::test]
    async fn readers_cannot_write() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open_in(&dir).await;
        let write = sqlx::query("DELETE FROM tenants")
            .execute(&store.reader)
            .await;
        assert!(write.is_err(), "{write:?}");
    }

    #[tokio::test]
    async fn zero_readers_is_a_config_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = SqliteStore::open(&SqliteConfig {
            path: dir.path().join("m.sqlite"),
            max_connections: 0,
            ..SqliteConfig::default()
        })
        .await
        .expect_err("rejected");
        assert!(err.to_string().contains("max_connections"), "{err}");
    }

    #[tokio::test]
    async fn a_taken_batch_id_conflicts_and_a_missing_tenant_does_not() {
        // as in Postgres: a unique violation is a conflict, a foreign key violation is not
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open_in(&dir).await;
        let b = running(&store, 1).await;
        let mut again = batch(&b.tenant_id);
        again.id = b.id.clone();
        assert!(matches!(
            store.insert_batch(&again).await,
            Err(MetadataError::Conflict(_))
        ));
        let orphan = batch(&TenantId::generate());
        assert!(matches!(
            store.insert_batch(&orphan).await,
            Err(MetadataError::Backend(_))
        ));
    }

    #[tokio::test]
    async fn chunks_beyond_one_insert_statement_round_trip() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open_in(&dir).await;
        let n = CHUNKS_PER_INSERT as u32 * 2 + 7;
        let b = running(&store, n).await;
        assert_eq!(store.chunks(&b.id).await.expect("chunks"), spans(n));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_neither_fail_nor_double_claim() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open_in(&dir).await;
        let b = running(&store, 40).await;

        // 48 claims race for 40 chunks while other writers open transactions meanwhile
        let mut claims = Vec::new();
        for _ in 0..48 {
            let (store, id) = (store.clone(), b.id.clone());
            claims.push(tokio::spawn(async move {
                store.claim_next_chunk(&id, 1_800_000_050, 120).await
            }));
        }
        let mut tenants = Vec::new();
        for _ in 0..8 {
            let store = store.clone();
            tenants.push(tokio::spawn(async move {
                store
                    .create_tenant("racer", &apikey::digest(&apikey::generate()))
                    .await
            }));
        }
        let mut claimed = Vec::new();
        for c in claims {
            if let Some(leased) = c.await.expect("task").expect("claim") {
                assert_eq!(leased.attempt, 1);
                claimed.push(leased.span.index);
            }
        }
        for t in tenants {
            t.await.expect("task").expect("tenant");
        }
        let distinct: BTreeSet<u32> = claimed.iter().copied().collect();
        assert_eq!((claimed.len(), distinct.len()), (40, 40));
        assert_eq!(distinct, (0..40).collect());

        // every chunk completed twice (a redelivery): exactly one completion counts
        let mut completions = Vec::new();
        for i in (0..40).chain(0..40) {
            let (store, id) = (store.clone(), b.id.clone());
            completions.push(tokio::spawn(
                async move { store.complete_chunk(&id, i).await },
            ));
        }
        let mut counted = 0;
        for c in completions {
            if c.await.expect("task").expect("complete") {
                counted += 1;
            }
        }
        assert_eq!(counted, 40);

        // finalization is asked once, and racing commits agree on one ending
        let mut asks = Vec::new();
        for _ in 0..5 {
            let (store, id) = (store.clone(), b.id.clone());
            asks.push(tokio::spawn(async move {
                store.request_finalize(&id, 1_800_000_100, 60).await
            }));
        }
        let mut asked = 0;
        for a in asks {
            if a.await.expect("task").expect("ask").is_some() {
                asked += 1;
            }
        }
        assert_eq!(asked, 1);
        let mut commits = Vec::new();
        for i in 0..5 {
            let store = store.clone();
            let commit = BatchCommit {
                batch: b.id.clone(),
                output_file: None,
                error_file: None,
                completed: 40,
                failed: 0,
                usage: Default::default(),
            };
            commits.push(tokio::spawn(async move {
                store.commit_batch(&commit, 1_800_000_200 + i).await
            }));
        }
        let mut ends = BTreeSet::new();
        for c in commits {
            let done = c.await.expect("task").expect("commit").expect("exists");
            assert_eq!(done.status, BatchStatus::Completed);
            ends.insert(done.completed_at);
        }
        assert_eq!(ends.len(), 1, "one commit won: {ends:?}");
    }
}
