//! Per-tenant quotas (`migrations/*/0009_tenant_quotas.sql`), as statements both databases run
//! (see [`crate::sql`] for the conventions).
//!
//! A check runs inside the transaction that would pass the quota: it first takes the tenant's
//! quota lock ([`lock_tenant`]: a row lock on the tenant in Postgres, the single writer in
//! SQLite), then counts and decides. Two creates of one tenant therefore count one after the
//! other, each seeing what the other committed: concurrent creates cannot overshoot a quota.
//! Inserts that never check (the finalizer's result files) do not take the lock, and Postgres'
//! `FOR NO KEY UPDATE` does not block the foreign-key checks of their inserts.

use nightshift_core::TenantId;
use sqlx::{AssertSqlSafe, Encode, Executor, Pool, Transaction, Type};

use crate::rows::{Columns, backend, to_i64};
use crate::sql::Backend;
use crate::{Quota, QuotaExceeded, QuotaOverrides, QuotaUsage, Quotas, Result};

/// Statuses of an active batch: it counts toward `max_active_batches` and its lines toward
/// `max_enqueued_requests` until it is terminal.
const ACTIVE: &str = "status IN ('validating', 'in_progress', 'finalizing', 'cancelling')";

fn overrides_from_row(row: &impl Columns) -> Result<QuotaOverrides> {
    let limit = |col: &str| -> Result<Option<u64>> {
        Ok(row.opt_int(col)?.map(|v| u64::try_from(v).unwrap_or(0)))
    };
    Ok(QuotaOverrides {
        max_active_batches: limit("max_active_batches")?,
        max_enqueued_requests: limit("max_enqueued_requests")?,
        max_stored_bytes: limit("max_stored_bytes")?,
    })
}

fn opt_i64(v: Option<u64>, what: &str) -> Result<Option<i64>> {
    v.map(|v| to_i64(v, what)).transpose()
}

/// The tenant's overrides; `None` if there is no such tenant.
pub(crate) async fn overrides<'e, DB, E>(
    exec: E,
    tenant: &TenantId,
) -> Result<Option<QuotaOverrides>>
where
    DB: Backend,
    E: Executor<'e, Database = DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
{
    let row = sqlx::query(
        "SELECT q.max_active_batches, q.max_enqueued_requests, q.max_stored_bytes \
         FROM tenants t LEFT JOIN tenant_quotas q ON q.tenant_id = t.id WHERE t.id = $1",
    )
    .bind(tenant.as_str())
    .fetch_optional(exec)
    .await
    .map_err(backend)?;
    row.as_ref().map(overrides_from_row).transpose()
}

/// Replaces the tenant's overrides; `false` if there is no such tenant.
pub(crate) async fn set_overrides<DB>(
    pool: &Pool<DB>,
    tenant: &TenantId,
    q: &QuotaOverrides,
    now_us: i64,
) -> Result<bool>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> Option<i64>: Encode<'a, DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
{
    let done = sqlx::query(
        "INSERT INTO tenant_quotas (tenant_id, max_active_batches, max_enqueued_requests, \
           max_stored_bytes, updated_at_us) \
         SELECT id, $2, $3, $4, $5 FROM tenants WHERE id = $1 \
         ON CONFLICT (tenant_id) DO UPDATE SET max_active_batches = excluded.max_active_batches, \
           max_enqueued_requests = excluded.max_enqueued_requests, \
           max_stored_bytes = excluded.max_stored_bytes, updated_at_us = excluded.updated_at_us",
    )
    .bind(tenant.as_str())
    .bind(opt_i64(q.max_active_batches, "max_active_batches")?)
    .bind(opt_i64(q.max_enqueued_requests, "max_enqueued_requests")?)
    .bind(opt_i64(q.max_stored_bytes, "max_stored_bytes")?)
    .bind(now_us)
    .execute(pool)
    .await
    .map_err(backend)?;
    Ok(DB::rows_affected(&done) > 0)
}

/// The SQL of what a tenant (`$1`) holds against `quota`; stored bytes at `$2` (unix seconds:
/// files past their expiry no longer count).
fn held_sql(quota: Quota) -> String {
    match quota {
        Quota::ActiveBatches => {
            format!("SELECT COUNT(*) FROM batches WHERE tenant_id = $1 AND {ACTIVE}")
        }
        Quota::EnqueuedRequests => format!(
            "SELECT CAST(COALESCE(SUM(total), 0) AS BIGINT) FROM batches \
             WHERE tenant_id = $1 AND {ACTIVE}"
        ),
        Quota::StoredBytes => "SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM files \
             WHERE tenant_id = $1 AND deleted_at IS NULL \
             AND (expires_at IS NULL OR expires_at > $2)"
            .to_owned(),
    }
}

/// What the tenant holds now against each quota (at `now`, unix seconds).
pub(crate) async fn usage<'e, DB, E>(exec: E, tenant: &TenantId, now: i64) -> Result<QuotaUsage>
where
    DB: Backend,
    E: Executor<'e, Database = DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
{
    let [active, enqueued, stored] = Quota::ALL.map(held_sql);
    let sql =
        format!("SELECT ({active}) AS active, ({enqueued}) AS enqueued, ({stored}) AS stored");
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(tenant.as_str())
        .bind(now)
        .fetch_one(exec)
        .await
        .map_err(backend)?;
    let count = |col: &str| -> Result<u64> { Ok(u64::try_from(row.int(col)?).unwrap_or(0)) };
    Ok(QuotaUsage {
        active_batches: count("active")?,
        enqueued_requests: count("enqueued")?,
        stored_bytes: count("stored")?,
    })
}

/// What the tenant holds now against one quota (at `now`, unix seconds).
async fn held<'e, DB, E>(exec: E, tenant: &TenantId, quota: Quota, now: i64) -> Result<u64>
where
    DB: Backend,
    E: Executor<'e, Database = DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
{
    let sql = format!("SELECT ({}) AS held", held_sql(quota));
    let query = sqlx::query(AssertSqlSafe(sql)).bind(tenant.as_str());
    // `$2` (now) only where the statement reads it: Postgres refuses an unused parameter.
    let query = match quota {
        Quota::StoredBytes => query.bind(now),
        Quota::ActiveBatches | Quota::EnqueuedRequests => query,
    };
    let row = query.fetch_one(exec).await.map_err(backend)?;
    Ok(u64::try_from(row.int("held")?).unwrap_or(0))
}

/// Takes the tenant's quota lock for the rest of `tx` and returns the limit of `quota` that
/// applies to it (its override, else `defaults`); `None` when unlimited. Taken only when a
/// limit applies, so unlimited tenants' creates never wait on each other.
async fn lock_tenant<DB>(
    tx: &mut Transaction<'static, DB>,
    tenant: &TenantId,
    quota: Quota,
    defaults: &Quotas,
) -> Result<Option<u64>>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
{
    let Some(overrides) = overrides(&mut **tx, tenant).await? else {
        // No such tenant: the insert's foreign key refuses it.
        return Ok(None);
    };
    let Some(limit) = overrides.over(defaults).limit(quota) else {
        return Ok(None);
    };
    let sql = format!("SELECT id FROM tenants WHERE id = $1 {}", DB::LOCK_TENANT);
    sqlx::query(AssertSqlSafe(sql))
        .bind(tenant.as_str())
        .fetch_all(&mut **tx)
        .await
        .map_err(backend)?;
    Ok(Some(limit))
}

/// Refuses, inside `tx`, what would take the tenant past the limit of `quota`: `adding` more
/// (one batch, a batch's lines, a file's bytes) on top of what it holds now. Nothing is
/// refused when the tenant holds no more than the limit afterwards.
pub(crate) async fn check<DB>(
    tx: &mut Transaction<'static, DB>,
    tenant: &TenantId,
    quota: Quota,
    adding: u64,
    defaults: &Quotas,
    now: i64,
) -> Result<std::result::Result<(), QuotaExceeded>>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
{
    let Some(limit) = lock_tenant(tx, tenant, quota, defaults).await? else {
        return Ok(Ok(()));
    };
    let held = held(&mut **tx, tenant, quota, now).await?;
    if held.saturating_add(adding) > limit {
        return Ok(Err(QuotaExceeded {
            quota,
            limit,
            held,
            adding,
        }));
    }
    Ok(Ok(()))
}
