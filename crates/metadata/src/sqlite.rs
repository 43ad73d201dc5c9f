//! The embedded SQLite adapter, for the single-process `nightshift standalone` deployment.
//!
//! Same tables, columns and units as [`PgStore`](crate::PgStore) (`migrations/sqlite` mirrors
//! `migrations/postgres`), and the same statements and records ([`crate::sql`]); this module
//! opens the file and says how SQLite keeps writers apart.
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
//! sees and changes the database alone, so claims stay atomic and need no locking clause.
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

use serde::{Deserialize, Serialize};
use sqlx::sqlite::{
    Sqlite, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteQueryResult,
    SqliteSynchronous,
};

use crate::sql::{Backend, SqlStore};
use crate::{MetadataError, Result};

/// [`MetadataStore`](crate::MetadataStore) over an SQLite file.
pub type SqliteStore = SqlStore<Sqlite>;

/// The single writer does what row locks do in Postgres.
impl Backend for Sqlite {
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";
    const SKIP_LOCKED: &'static str = "";
    const FOR_UPDATE: &'static str = "";
    const LOCK_TENANT: &'static str = "";

    fn rows_affected(done: &SqliteQueryResult) -> u64 {
        done.rows_affected()
    }
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

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

impl SqliteStore {
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
        Ok(Self::new(writer, reader))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use nightshift_core::batch::{BatchRecord, BatchStatus, RequestCounts};
    use nightshift_core::chunking::ChunkSpan;
    use nightshift_core::{BatchId, FileId, TenantId, apikey};
    use sqlx::AssertSqlSafe;
    use sqlx::sqlite::SqlitePool;

    use super::*;
    use crate::sql::CHUNKS_PER_INSERT;
    use crate::{BatchCommit, MetadataStore, Quotas, ValidationOutcome};

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
            .finish_validation(&b.id, &ready, 1_800_000_001, &Quotas::UNLIMITED)
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
    async fn subscribers_hear_of_each_batch_inserted_once_committed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open_in(&dir).await;
        let t = store
            .create_tenant("t", &apikey::digest(&apikey::generate()))
            .await
            .expect("tenant");
        let mut created = store.subscribe_created();
        drop(store.subscribe_created()); // forgotten, not an error
        let (first, second) = (batch(&t.id), batch(&t.id));
        store.insert_batch(&first).await.expect("insert");
        store.clone().insert_batch(&second).await.expect("insert");
        assert!(store.insert_batch(&first).await.is_err()); // a conflict announces nothing
        assert_eq!(created.try_recv().ok(), Some(first.id));
        assert_eq!(created.try_recv().ok(), Some(second.id));
        assert!(created.try_recv().is_err());
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
            completions.push(tokio::spawn(async move {
                store.complete_chunk(&id, i, None).await
            }));
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
