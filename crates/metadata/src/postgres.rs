//! The PostgreSQL adapter: connection setup, and row locks where the shared statements need
//! them ([`crate::sql`]).
//!
//! Several schedulers may share the database. A claim locks the chunk it picks and skips the
//! ones other claims hold (`FOR UPDATE SKIP LOCKED`); a commit locks its batch (`FOR UPDATE`);
//! every other transition is one compare-and-set `UPDATE`, which Postgres re-evaluates on a row
//! that another transaction changed meanwhile. Reads and writes share one pool.

use std::time::Duration;

use nightshift_core::secret::Secret;
use serde::{Deserialize, Serialize};
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgPoolOptions, PgQueryResult, Postgres};

use crate::MetadataError;
use crate::Result;
use crate::rows::backend;
use crate::sql::{Backend, SqlStore};

/// [`MetadataStore`](crate::MetadataStore) over PostgreSQL.
pub type PgStore = SqlStore<Postgres>;

impl Backend for Postgres {
    const BEGIN_WRITE: &'static str = "BEGIN";
    const SKIP_LOCKED: &'static str = "FOR UPDATE OF c SKIP LOCKED";
    const FOR_UPDATE: &'static str = "FOR UPDATE";
    const LOCK_TENANT: &'static str = "FOR NO KEY UPDATE";

    fn rows_affected(done: &PgQueryResult) -> u64 {
        done.rows_affected()
    }
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
        Ok(Self::new(pool.clone(), pool))
    }
}
