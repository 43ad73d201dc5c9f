//! The PostgreSQL adapter.

use std::time::Duration;

use async_trait::async_trait;
use nightshift_core::BatchId;
use nightshift_core::batch::{BatchRecord, BatchStatus};
use nightshift_core::chunking::ChunkSpan;
use nightshift_core::file::FileRecord;
use nightshift_core::page::Order;
use nightshift_core::secret::Secret;
use nightshift_core::time::now_unix_micros;
use nightshift_core::{FileId, TenantId};
use serde::{Deserialize, Serialize};
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};

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
/// deadline (`$1` is `now`).
const RUNNING_BATCHES: &str = "SELECT id FROM batches WHERE status = 'in_progress' \
     AND ending IS NULL AND expires_at > $1";

impl Columns for PgRow {
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
    /// `JSONB`.
    fn json(&self, col: &str) -> Result<serde_json::Value> {
        get(self, col)
    }
    fn traceparent(&self) -> Result<Option<String>> {
        get(self, "traceparent")
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| MetadataError::Backend(format!("encode: {e}")))
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// How to reach PostgreSQL.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PgConfig {
    /// `postgres://user:password@host:port/database` (a secret: it may hold a password).
    pub url: Secret,
    pub max_connections: u32,
    /// How long a query waits for a free connection before failing.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Schema holding nightshift's tables (created if missing); `None` = the server's default
    /// search path (`public`). Lets several deployments — or parallel tests — share a database.
    pub schema: Option<String>,
}

impl Default for PgConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("postgres://postgres@127.0.0.1:5432/nightshift"),
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
            schema: None,
        }
    }
}

/// [`MetadataStore`] over PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

/// The tables that are listed with cursors.
#[derive(Clone, Copy)]
enum ListTable {
    Files,
    Batches,
}

impl PgStore {
    /// Connects and brings the schema up to date (migrations take an advisory lock, so
    /// several schedulers starting together are safe).
    pub async fn connect(config: &PgConfig) -> Result<Self> {
        let mut options = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.acquire_timeout);
        if let Some(schema) = &config.schema {
            if schema.is_empty()
                || !schema
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(MetadataError::Backend(format!(
                    "metadata.schema must be lowercase letters, digits and '_': {schema:?}"
                )));
            }
            let create = format!("CREATE SCHEMA IF NOT EXISTS {schema}");
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(config.url.expose())
                .await
                .map_err(|e| MetadataError::Backend(format!("connect to postgres: {e}")))?;
            sqlx::query(AssertSqlSafe(create))
                .execute(&mut conn)
                .await
                .map_err(backend)?;
            let set_path = format!("SET search_path TO {schema}");
            options = options.after_connect(move |conn, _| {
                let set_path = set_path.clone();
                Box::pin(async move {
                    sqlx::query(AssertSqlSafe(set_path)).execute(conn).await?;
                    Ok(())
                })
            });
        }
        let pool = options
            .connect(config.url.expose())
            .await
            .map_err(|e| MetadataError::Backend(format!("connect to postgres: {e}")))?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| MetadataError::Backend(format!("migrate: {e}")))?;
        Ok(Self { pool })
    }

    /// The pool, for the scheduler's own transactions in later stages.
    pub fn pool(&self) -> &PgPool {
        &self.pool
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
                "SELECT created_at_us, id FROM files WHERE id = $1 AND tenant_id = $2"
            }
            ListTable::Batches => {
                "SELECT created_at_us, id FROM batches WHERE id = $1 AND tenant_id = $2"
            }
        };
        let row = sqlx::query(sql)
            .bind(after)
            .bind(tenant.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        Ok(match row {
            None => Cursor::Unknown,
            Some(r) => Cursor::After(r.int("created_at_us")?, r.text("id")?),
        })
    }
}

#[async_trait]
impl MetadataStore for PgStore {
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn create_tenant(&self, name: &str, key_hash: &str) -> Result<Tenant> {
        let id = TenantId::generate();
        let now = now_unix_micros();
        let mut tx = self.pool.begin().await.map_err(backend)?;
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
            // Another scheduler won the race: its tenant is the one.
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
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)?;
        row.as_ref().map(tenant_from_row).transpose()
    }

    async fn insert_file(&self, f: &FileRecord) -> Result<()> {
        let bytes = i64::try_from(f.bytes)
            .map_err(|_| MetadataError::Backend("file size out of range".into()))?;
        sqlx::query(
            "INSERT INTO files (id, tenant_id, bytes, created_at_us, expires_at, filename, \
             purpose, storage_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(f.id.as_str())
        .bind(f.tenant_id.as_str())
        .bind(bytes)
        .bind(f.created_at_us)
        .bind(f.expires_at)
        .bind(&f.filename)
        .bind(f.purpose.as_str())
        .bind(&f.storage_key)
        .execute(&self.pool)
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
        let row = sqlx::query(
            "SELECT id, tenant_id, bytes, created_at_us, expires_at, filename, purpose, \
             storage_key FROM files WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL \
             AND (expires_at IS NULL OR expires_at > $3)",
        )
        .bind(id.as_str())
        .bind(tenant.as_str())
        .bind(now)
        .fetch_optional(&self.pool)
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
        let row = sqlx::query(
            "SELECT id, tenant_id, bytes, created_at_us, expires_at, filename, purpose, \
             storage_key FROM files WHERE id = $1 AND tenant_id = $2 \
             AND (deleted_at IS NULL OR deleted_at >= $3) \
             AND (expires_at IS NULL OR expires_at > $3)",
        )
        .bind(id.as_str())
        .bind(tenant.as_str())
        .bind(at)
        .fetch_optional(&self.pool)
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
        // Static statements (one per order) rather than string-built SQL.
        let sql = match q.order {
            Order::Desc => {
                "SELECT id, tenant_id, bytes, created_at_us, expires_at, filename, purpose, \
                 storage_key FROM files WHERE tenant_id = $1 AND deleted_at IS NULL \
                 AND (expires_at IS NULL OR expires_at > $2) AND ($3::text IS NULL OR purpose = $3) \
                 AND ($4::bigint IS NULL OR (created_at_us, id) < ($4, $5)) \
                 ORDER BY created_at_us DESC, id DESC LIMIT $6"
            }
            Order::Asc => {
                "SELECT id, tenant_id, bytes, created_at_us, expires_at, filename, purpose, \
                 storage_key FROM files WHERE tenant_id = $1 AND deleted_at IS NULL \
                 AND (expires_at IS NULL OR expires_at > $2) AND ($3::text IS NULL OR purpose = $3) \
                 AND ($4::bigint IS NULL OR (created_at_us, id) > ($4, $5)) \
                 ORDER BY created_at_us ASC, id ASC LIMIT $6"
            }
        };
        let (cursor_us, cursor_id) = cursor.bounds();
        let rows = sqlx::query(sql)
            .bind(tenant.as_str())
            .bind(now)
            .bind(q.purpose.map(|p| p.as_str()))
            .bind(cursor_us)
            .bind(cursor_id)
            .bind(i64::from(q.limit) + 1)
            .fetch_all(&self.pool)
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
        let row = sqlx::query(
            "UPDATE files SET deleted_at = $3 WHERE id = $1 AND tenant_id = $2 \
             AND deleted_at IS NULL AND (expires_at IS NULL OR expires_at > $3) \
             RETURNING id, tenant_id, bytes, created_at_us, expires_at, filename, purpose, storage_key",
        )
        .bind(id.as_str())
        .bind(tenant.as_str())
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)?;
        row.as_ref().map(file_from_row).transpose()
    }

    async fn sweepable_files(&self, now: i64, limit: u32) -> Result<Vec<FileRecord>> {
        let rows = sqlx::query(
            "SELECT id, tenant_id, bytes, created_at_us, expires_at, filename, purpose, \
             storage_key FROM files f WHERE (deleted_at IS NOT NULL \
             OR (expires_at IS NOT NULL AND expires_at <= $1)) \
             AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.input_file_id = f.id \
               AND b.status IN ('validating', 'in_progress', 'finalizing', 'cancelling')) \
             ORDER BY COALESCE(deleted_at, expires_at) LIMIT $2",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
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
        .fetch_one(&self.pool)
        .await
        .map_err(backend)?;
        get(&row, "used")
    }

    async fn purge_file(&self, id: &FileId) -> Result<()> {
        sqlx::query("DELETE FROM files WHERE id = $1")
            .bind(id.as_str())
            .execute(&self.pool)
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
        .bind(&b.endpoint)
        .bind(&b.input_file_id)
        .bind(&b.completion_window)
        .bind(b.status.as_str())
        .bind(to_json(&b.metadata)?)
        .bind(b.output_expires_after_secs)
        .bind(b.created_at_us)
        .bind(b.expires_at)
        .bind(b.traceparent.as_deref())
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn get_batch(&self, tenant: &TenantId, id: &BatchId) -> Result<Option<BatchRecord>> {
        let sql = format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1 AND tenant_id = $2");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id.as_str())
            .bind(tenant.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.as_ref().map(batch_from_row).transpose()
    }

    async fn batch(&self, id: &BatchId) -> Result<Option<BatchRecord>> {
        let sql = format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id.as_str())
            .fetch_optional(&self.pool)
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
            "SELECT {BATCH_COLUMNS} FROM batches WHERE tenant_id = $1 \
             AND ($2::bigint IS NULL OR (created_at_us, id) < ($2, $3)) \
             ORDER BY created_at_us DESC, id DESC LIMIT $4"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(tenant.as_str())
            .bind(cursor_us)
            .bind(cursor_id)
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        let mut batches = rows
            .iter()
            .map(batch_from_row)
            .collect::<Result<Vec<_>>>()?;
        let has_more = batches.len() > limit as usize;
        batches.truncate(limit as usize);
        Ok(BatchPage { batches, has_more })
    }

    async fn batches_with_status(&self, statuses: &[BatchStatus]) -> Result<Vec<BatchRecord>> {
        let names: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
        let sql = format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE status = ANY($1) ORDER BY created_at_us, id"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(&names)
            .fetch_all(&self.pool)
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
        let mut tx = self.pool.begin().await.map_err(backend)?;
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
                query.bind(model.clone()).bind(to_i64(*total, "total")?)
            }
        };
        let Some(row) = query.fetch_optional(&mut *tx).await.map_err(backend)? else {
            return Ok(None);
        };
        if let ValidationOutcome::Ready { chunks, .. } = outcome {
            // One statement per 1000 chunks (UNNEST of arrays), not one per chunk.
            for part in chunks.chunks(1000) {
                let idx: Vec<i32> = part.iter().map(|c| c.index as i32).collect();
                let start: Vec<i64> = part.iter().map(|c| c.byte_start as i64).collect();
                let end: Vec<i64> = part.iter().map(|c| c.byte_end as i64).collect();
                let first: Vec<i64> = part.iter().map(|c| c.first_line as i64).collect();
                let count: Vec<i32> = part.iter().map(|c| c.line_count as i32).collect();
                sqlx::query(
                    "INSERT INTO chunks (batch_id, idx, byte_start, byte_end, first_line, line_count) \
                     SELECT $1, * FROM UNNEST($2::int[], $3::bigint[], $4::bigint[], $5::bigint[], $6::int[])",
                )
                .bind(id.as_str())
                .bind(&idx)
                .bind(&start)
                .bind(&end)
                .bind(&first)
                .bind(&count)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
            }
        }
        tx.commit().await.map_err(backend)?;
        batch_from_row(&row).map(Some)
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
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id.as_str())
            .bind(tenant.as_str())
            .bind(now)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        if let Some(row) = row {
            return batch_from_row(&row).map(|b| Some(CancelOutcome::Cancelling(b)));
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
             WHERE batch_id = $1 ORDER BY idx",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        rows.iter().map(span_from_row).collect()
    }

    async fn chunk_states(&self, id: &BatchId) -> Result<Vec<ChunkState>> {
        let rows = sqlx::query(
            "SELECT idx, byte_start, byte_end, first_line, line_count, state, failure FROM chunks \
             WHERE batch_id = $1 ORDER BY idx",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
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
            .fetch_all(&self.pool)
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
        let sql = format!(
            "UPDATE chunks SET state = 'dispatched', attempts = attempts + 1, \
               lease_until = $2 + $3, started = false WHERE (batch_id, idx) = ( \
               SELECT c.batch_id, c.idx FROM chunks c JOIN batches b ON b.id = c.batch_id \
               WHERE c.batch_id = $1 AND c.state = 'pending' AND b.status = 'in_progress' \
               AND b.ending IS NULL AND b.expires_at > $2 \
               ORDER BY c.idx LIMIT 1 FOR UPDATE OF c SKIP LOCKED) \
             RETURNING {LEASED_COLUMNS}"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id.as_str())
            .bind(now)
            .bind(lease_secs)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.as_ref().map(leased_from_row).transpose()
    }

    async fn release_chunk(&self, id: &BatchId, index: u32) -> Result<()> {
        sqlx::query(
            "UPDATE chunks SET state = 'pending', attempts = GREATEST(attempts - 1, 0), \
             lease_until = NULL, started = false \
             WHERE batch_id = $1 AND idx = $2 AND state = 'dispatched'",
        )
        .bind(id.as_str())
        .bind(index as i32)
        .execute(&self.pool)
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
            .fetch_all(&self.pool)
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
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(renewed.rows_affected() == 1)
    }

    async fn extend_chunk_lease(&self, id: &BatchId, index: u32, until: i64) -> Result<bool> {
        let extended = sqlx::query(
            "UPDATE chunks SET lease_until = GREATEST(COALESCE(lease_until, $3), $3) \
             WHERE batch_id = $1 AND idx = $2 AND state = 'dispatched'",
        )
        .bind(id.as_str())
        .bind(index as i32)
        .bind(until)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(extended.rows_affected() == 1)
    }

    async fn complete_chunk(&self, id: &BatchId, index: u32) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE chunks SET state = 'done', lease_until = NULL, failure = NULL \
             WHERE batch_id = $1 AND idx = $2 AND state <> 'done'",
        )
        .bind(id.as_str())
        .bind(index as i32)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn fail_chunk(&self, id: &BatchId, index: u32, failure: &str) -> Result<bool> {
        let failed = sqlx::query(
            "UPDATE chunks SET state = 'failed', failure = $3, lease_until = NULL \
             WHERE batch_id = $1 AND idx = $2 AND state IN ('pending', 'dispatched')",
        )
        .bind(id.as_str())
        .bind(index as i32)
        .bind(failure)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(failed.rows_affected() == 1)
    }

    async fn sweep_chunk_leases(&self, now: i64, policy: &LeasePolicy) -> Result<LeaseSweep> {
        // Every statement re-checks the expired lease on the row it updates (Postgres
        // re-evaluates the WHERE clause on a row another transaction changed meanwhile), so a
        // heartbeat or another scheduler's sweep that got there first wins.
        let expired = "state = 'dispatched' AND COALESCE(lease_until, 0) <= $1";
        let max_attempts = i32::try_from(policy.max_attempts).unwrap_or(i32::MAX);
        let mut tx = self.pool.begin().await.map_err(backend)?;
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
            "UPDATE chunks SET lease_until = $1 + $2, attempts = GREATEST(attempts, 1) \
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
        let mut extended = 0;
        if policy.tasks_waiting {
            extended = unstarted.len() as u64;
        } else {
            for r in &unstarted {
                redrive.push(leased_from_row(r)?);
            }
        }
        Ok(LeaseSweep {
            redrive,
            failed: failed
                .iter()
                .map(leased_from_row)
                .collect::<Result<Vec<_>>>()?,
            extended,
        })
    }

    async fn expire_due(&self, now: i64) -> Result<Vec<BatchRecord>> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
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
        rows.extend(
            sqlx::query(AssertSqlSafe(sql))
                .bind(now)
                .fetch_all(&mut *tx)
                .await
                .map_err(backend)?,
        );
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
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id.as_str())
            .bind(now)
            .bind(ending_grace_secs)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.as_ref().map(batch_from_row).transpose()
    }

    async fn finalize_requested(&self) -> Result<Vec<BatchRecord>> {
        let sql = format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE finalize_requested_at IS NOT NULL \
             AND status IN ('finalizing', 'cancelling') ORDER BY finalize_requested_at"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
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
            .fetch_all(&self.pool)
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
        let row = sqlx::query(
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
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)?;
        if let Some(row) = row {
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
        .fetch_optional(&self.pool)
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
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(released.rows_affected() == 1)
    }

    async fn ending(&self, id: &BatchId) -> Result<Option<Ending>> {
        let row = sqlx::query("SELECT status, ending FROM batches WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
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
        let mut tx = self.pool.begin().await.map_err(backend)?;
        let sql = format!("SELECT {BATCH_COLUMNS}, ending FROM batches WHERE id = $1 FOR UPDATE");
        let Some(row) = sqlx::query(AssertSqlSafe(sql))
            .bind(c.batch.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend)?
        else {
            return Ok(None);
        };
        let batch = batch_from_row(&row)?;
        if batch.status.is_terminal() {
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
        let created_at_us = nightshift_core::time::now_unix_micros();
        for (file, kind) in [(&c.output_file, "output"), (&c.error_file, "error")] {
            let Some(file) = file else { continue };
            sqlx::query(
                "INSERT INTO files (id, tenant_id, bytes, created_at_us, expires_at, filename, \
                 purpose, storage_key) VALUES ($1, $2, $3, $4, $5, $6, 'batch_output', $7) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(file.id.as_str())
            .bind(batch.tenant_id.as_str())
            .bind(to_i64(file.bytes, "file size")?)
            .bind(created_at_us)
            .bind(now + batch.output_expires_after_secs)
            .bind(format!("{}_{kind}.jsonl", batch.id))
            .bind(nightshift_core::file::FileRecord::storage_key_for(&file.id))
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        }
        let sql = format!(
            "UPDATE batches SET status = $2, {stamp_col} = $3, output_file_id = $4, \
             error_file_id = $5, completed = $6, failed = $7, usage = $8 WHERE id = $1 \
             RETURNING {BATCH_COLUMNS}"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(c.batch.as_str())
            .bind(status)
            .bind(now)
            .bind(c.output_file.as_ref().map(|f| f.id.to_string()))
            .bind(c.error_file.as_ref().map(|f| f.id.to_string()))
            .bind(to_i64(c.completed, "completed")?)
            .bind(to_i64(c.failed, "failed")?)
            .bind(to_json(&c.usage)?)
            .fetch_one(&mut *tx)
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        batch_from_row(&row).map(Some)
    }
}
