//! Webhook endpoints and the outbox of batch events (`migrations/*/0006_webhooks.sql`), as
//! statements both databases run (see [`crate::sql`] for the conventions).
//!
//! [`enqueue_event`] runs inside the transaction of every terminal transition of a batch
//! (`finish_validation` failing it, `expire_due` expiring a validating one, `commit_batch`),
//! so an event exists if and only if the transition committed: nothing is lost on a crash
//! between the two, and a transition that did not happen (a compare-and-set that found the
//! batch already terminal) writes nothing.

use nightshift_core::batch::BatchRecord;
use nightshift_core::webhook::{
    EventType, WebhookEndpointRecord, event_body, events_column, events_from_column,
};
use nightshift_core::{BatchId, EventId, TenantId, WebhookEndpointId};
use sqlx::{AssertSqlSafe, Encode, Executor, Pool, Transaction, Type};

use crate::rows::{Columns, backend, corrupt};
use crate::sql::Backend;
use crate::{DeliveryOutcome, Result, WebhookDelivery, WebhookDeliveryState};

const ENDPOINT_COLUMNS: &str = "id, tenant_id, url, events, name, secret, previous_secret, \
     previous_secret_until, created_at_us, updated_at";

fn endpoint_from_row(row: &impl Columns) -> Result<WebhookEndpointRecord> {
    let id = row.text("id")?;
    let tenant = row.text("tenant_id")?;
    Ok(WebhookEndpointRecord {
        id: WebhookEndpointId::parse(&id).map_err(|_| corrupt("webhook endpoint id", &id))?,
        tenant_id: TenantId::parse(&tenant).map_err(|_| corrupt("tenant id", &tenant))?,
        url: row.text("url")?,
        events: events_from_column(&row.text("events")?),
        name: row.text("name")?,
        secret: row.text("secret")?,
        previous_secret: row.opt_text("previous_secret")?,
        previous_secret_until: row.opt_int("previous_secret_until")?,
        created_at_us: row.int("created_at_us")?,
        updated_at: row.int("updated_at")?,
    })
}

/// Writes the event of `batch`'s terminal transition at `now` into the outbox, with one
/// pending delivery per endpoint of its tenant subscribed to it. Nothing when the batch is not
/// terminal or no endpoint subscribes. Runs in the caller's transaction.
pub(crate) async fn enqueue_event<DB>(
    tx: &mut Transaction<'static, DB>,
    batch: &BatchRecord,
    now: i64,
) -> Result<()>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
{
    let Some(kind) = EventType::for_status(batch.status.as_str()) else {
        return Ok(());
    };
    let id = EventId::generate();
    let body = event_body(&id, kind, now, &batch.id);
    let pattern = format!("%,{},%", kind.as_str());
    let inserted = sqlx::query(
        "INSERT INTO webhook_events (id, tenant_id, batch_id, type, created_at, body) \
         SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM webhook_endpoints \
           WHERE tenant_id = $2 AND events LIKE $7)",
    )
    .bind(id.as_str())
    .bind(batch.tenant_id.as_str())
    .bind(batch.id.as_str())
    .bind(kind.as_str())
    .bind(now)
    .bind(body.as_str())
    .bind(pattern.as_str())
    .execute(&mut **tx)
    .await
    .map_err(backend)?;
    if DB::rows_affected(&inserted) == 0 {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO webhook_deliveries (event_id, endpoint_id, next_attempt_at) \
         SELECT $1, id, $3 FROM webhook_endpoints WHERE tenant_id = $2 AND events LIKE $4",
    )
    .bind(id.as_str())
    .bind(batch.tenant_id.as_str())
    .bind(now)
    .bind(pattern.as_str())
    .execute(&mut **tx)
    .await
    .map_err(backend)?;
    Ok(())
}

pub(crate) async fn insert_endpoint<DB>(pool: &Pool<DB>, e: &WebhookEndpointRecord) -> Result<()>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> Option<&'a str>: Encode<'a, DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
    for<'a> Option<i64>: Encode<'a, DB>,
{
    let sql = format!(
        "INSERT INTO webhook_endpoints ({ENDPOINT_COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(e.id.as_str())
        .bind(e.tenant_id.as_str())
        .bind(e.url.as_str())
        .bind(events_column(&e.events).as_str())
        .bind(e.name.as_str())
        .bind(e.secret.as_str())
        .bind(e.previous_secret.as_deref())
        .bind(e.previous_secret_until)
        .bind(e.created_at_us)
        .bind(e.updated_at)
        .execute(pool)
        .await
        .map_err(backend)?;
    Ok(())
}

pub(crate) async fn list_endpoints<DB>(
    pool: &Pool<DB>,
    tenant: &TenantId,
) -> Result<Vec<WebhookEndpointRecord>>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
{
    let sql = format!(
        "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE tenant_id = $1 \
         ORDER BY created_at_us, id"
    );
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(tenant.as_str())
        .fetch_all(pool)
        .await
        .map_err(backend)?;
    rows.iter().map(endpoint_from_row).collect()
}

pub(crate) async fn get_endpoint<DB>(
    pool: &Pool<DB>,
    tenant: &TenantId,
    id: &WebhookEndpointId,
) -> Result<Option<WebhookEndpointRecord>>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
{
    let sql = format!(
        "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = $1 AND tenant_id = $2"
    );
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(id.as_str())
        .bind(tenant.as_str())
        .fetch_optional(pool)
        .await
        .map_err(backend)?;
    row.as_ref().map(endpoint_from_row).transpose()
}

/// Deletes an endpoint of the tenant with its deliveries (pending ones are dropped: nobody
/// wants them any more).
pub(crate) async fn delete_endpoint<DB>(
    pool: &Pool<DB>,
    tenant: &TenantId,
    id: &WebhookEndpointId,
) -> Result<Option<WebhookEndpointRecord>>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
{
    let mut tx = pool.begin_with(DB::BEGIN_WRITE).await.map_err(backend)?;
    sqlx::query(
        "DELETE FROM webhook_deliveries WHERE endpoint_id = $1 \
         AND EXISTS (SELECT 1 FROM webhook_endpoints WHERE id = $1 AND tenant_id = $2)",
    )
    .bind(id.as_str())
    .bind(tenant.as_str())
    .execute(&mut *tx)
    .await
    .map_err(backend)?;
    let sql = format!(
        "DELETE FROM webhook_endpoints WHERE id = $1 AND tenant_id = $2 \
         RETURNING {ENDPOINT_COLUMNS}"
    );
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(id.as_str())
        .bind(tenant.as_str())
        .fetch_all(&mut *tx)
        .await
        .map_err(backend)?;
    let gone = rows.first().map(endpoint_from_row).transpose()?;
    tx.commit().await.map_err(backend)?;
    Ok(gone)
}

/// Replaces an endpoint's secret at `now`; deliveries not yet made are signed with the new
/// one, and with the old one too until `keep_old_until` if given.
pub(crate) async fn rotate_secret<DB>(
    pool: &Pool<DB>,
    tenant: &TenantId,
    id: &WebhookEndpointId,
    secret: &str,
    keep_old_until: Option<i64>,
    now: i64,
) -> Result<Option<WebhookEndpointRecord>>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
    for<'a> Option<i64>: Encode<'a, DB>,
{
    let sql = format!(
        "UPDATE webhook_endpoints SET previous_secret = CASE WHEN $4 IS NULL THEN NULL \
           ELSE secret END, previous_secret_until = $4, secret = $3, updated_at = $5 \
         WHERE id = $1 AND tenant_id = $2 RETURNING {ENDPOINT_COLUMNS}"
    );
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(id.as_str())
        .bind(tenant.as_str())
        .bind(secret)
        .bind(keep_old_until)
        .bind(now)
        .fetch_all(pool)
        .await
        .map_err(backend)?;
    rows.first().map(endpoint_from_row).transpose()
}

/// Claims up to `limit` deliveries due at `now` whose lease is absent or expired: each gets an
/// attempt counted and a lease until `now + lease_secs`. The choice and the update are one
/// statement and the chosen rows are locked (`SKIP_LOCKED`), so two schedulers claim
/// different deliveries.
pub(crate) async fn claim_deliveries<DB>(
    pool: &Pool<DB>,
    now: i64,
    lease_secs: i64,
    limit: u32,
) -> Result<Vec<WebhookDelivery>>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
{
    let sql = format!(
        "UPDATE webhook_deliveries SET attempts = attempts + 1, lease_until = $1 + $2 \
         WHERE state = 'pending' AND (event_id, endpoint_id) IN (\
           SELECT c.event_id, c.endpoint_id FROM webhook_deliveries c \
           WHERE c.state = 'pending' AND c.next_attempt_at <= $1 \
           AND (c.lease_until IS NULL OR c.lease_until <= $1) \
           ORDER BY c.next_attempt_at LIMIT $3 {}) \
         RETURNING event_id, endpoint_id, attempts",
        DB::SKIP_LOCKED
    );
    let claimed = sqlx::query(AssertSqlSafe(sql))
        .bind(now)
        .bind(lease_secs)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await
        .map_err(backend)?;
    let mut out = Vec::with_capacity(claimed.len());
    for row in &claimed {
        let event_id = row.text("event_id")?;
        let endpoint_id = row.text("endpoint_id")?;
        let attempts = row.int4("attempts")?;
        let detail = sqlx::query(
            "SELECT e.body, e.created_at, e.type, w.url, w.secret, w.previous_secret, \
               w.previous_secret_until FROM webhook_events e \
             JOIN webhook_endpoints w ON w.id = $2 WHERE e.id = $1",
        )
        .bind(event_id.as_str())
        .bind(endpoint_id.as_str())
        .fetch_optional(pool)
        .await
        .map_err(backend)?;
        // The endpoint was deleted meanwhile (with its deliveries): nothing to send.
        let Some(d) = detail else { continue };
        out.push(WebhookDelivery {
            event_id: EventId::parse(&event_id).map_err(|_| corrupt("event id", &event_id))?,
            endpoint_id: WebhookEndpointId::parse(&endpoint_id)
                .map_err(|_| corrupt("webhook endpoint id", &endpoint_id))?,
            event_type: d.text("type")?,
            url: d.text("url")?,
            secret: d.text("secret")?,
            previous_secret: match (
                d.opt_text("previous_secret")?,
                d.opt_int("previous_secret_until")?,
            ) {
                (Some(s), Some(until)) if until > now => Some(s),
                _ => None,
            },
            body: d.text("body")?,
            event_created_at: d.int("created_at")?,
            attempts: u32::try_from(attempts).unwrap_or(0),
        });
    }
    Ok(out)
}

/// Records how an attempt ended: `delivered`, or due again at a later time, or given up
/// (`failed`). Only a `pending` delivery changes (a duplicate attempt that ends after another
/// one delivered it changes nothing).
pub(crate) async fn finish_delivery<DB>(
    pool: &Pool<DB>,
    delivery: &WebhookDelivery,
    outcome: &DeliveryOutcome,
    now: i64,
) -> Result<()>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> Option<&'a str>: Encode<'a, DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
{
    let (state, next, error) = match outcome {
        DeliveryOutcome::Delivered => ("delivered", now, None),
        DeliveryOutcome::Retry { at, error } => ("pending", *at, Some(error.as_str())),
        DeliveryOutcome::GaveUp { error } => ("failed", now, Some(error.as_str())),
    };
    sqlx::query(
        "UPDATE webhook_deliveries SET state = $3, next_attempt_at = $4, lease_until = NULL, \
           last_error = $5, finished_at = CASE WHEN $3 = 'pending' THEN NULL ELSE $6 END \
         WHERE event_id = $1 AND endpoint_id = $2 AND state = 'pending'",
    )
    .bind(delivery.event_id.as_str())
    .bind(delivery.endpoint_id.as_str())
    .bind(state)
    .bind(next)
    .bind(error)
    .bind(now)
    .execute(pool)
    .await
    .map_err(backend)?;
    Ok(())
}

/// Deliveries still pending (the outbox backlog).
pub(crate) async fn pending_deliveries<DB>(pool: &Pool<DB>) -> Result<u64>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    let row = sqlx::query("SELECT COUNT(*) AS n FROM webhook_deliveries WHERE state = 'pending'")
        .fetch_one(pool)
        .await
        .map_err(backend)?;
    Ok(u64::try_from(row.int("n")?).unwrap_or(0))
}

/// Forgets deliveries that ended before `before`, and events left without a delivery.
pub(crate) async fn purge_history<DB>(pool: &Pool<DB>, before: i64) -> Result<u64>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
{
    let done =
        sqlx::query("DELETE FROM webhook_deliveries WHERE state <> 'pending' AND finished_at < $1")
            .bind(before)
            .execute(pool)
            .await
            .map_err(backend)?;
    sqlx::query(
        "DELETE FROM webhook_events WHERE created_at < $1 AND NOT EXISTS \
         (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = webhook_events.id)",
    )
    .bind(before)
    .execute(pool)
    .await
    .map_err(backend)?;
    Ok(DB::rows_affected(&done))
}

/// Every delivery of `batch`'s events.
pub(crate) async fn deliveries_of<DB>(
    pool: &Pool<DB>,
    batch: &BatchId,
) -> Result<Vec<WebhookDeliveryState>>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
{
    let rows = sqlx::query(
        "SELECT d.event_id, d.endpoint_id, e.type, d.state, d.attempts, d.last_error \
         FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id \
         WHERE e.batch_id = $1 ORDER BY e.created_at, d.event_id, d.endpoint_id",
    )
    .bind(batch.as_str())
    .fetch_all(pool)
    .await
    .map_err(backend)?;
    rows.iter()
        .map(|r| {
            let event_id = r.text("event_id")?;
            let endpoint_id = r.text("endpoint_id")?;
            Ok(WebhookDeliveryState {
                event_id: EventId::parse(&event_id).map_err(|_| corrupt("event id", &event_id))?,
                endpoint_id: WebhookEndpointId::parse(&endpoint_id)
                    .map_err(|_| corrupt("webhook endpoint id", &endpoint_id))?,
                event_type: r.text("type")?,
                state: r.text("state")?,
                attempts: u32::try_from(r.int4("attempts")?).unwrap_or(0),
                last_error: r.opt_text("last_error")?,
            })
        })
        .collect()
}
