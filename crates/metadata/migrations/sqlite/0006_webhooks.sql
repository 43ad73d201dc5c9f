-- Webhooks (issue 12). The SQLite twin of migrations/postgres/0006: same tables and meaning.

-- Where a tenant's batch events go. `events` is comma-framed (`,batch.completed,batch.failed,`)
-- so one `LIKE '%,<event>,%'` finds an event's subscribers in either database. `secret` signs
-- every delivery (`whsec_` + base64 key), so it is stored as it is, not hashed.
CREATE TABLE webhook_endpoints (
    id            TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL REFERENCES tenants (id),
    url           TEXT NOT NULL,
    events        TEXT NOT NULL,
    name          TEXT NOT NULL DEFAULT '',
    secret        TEXT NOT NULL,
    -- the secret before the last rotation, still signing until `previous_secret_until` when
    -- the rotation asked to keep it active (a second signature in `webhook-signature`)
    previous_secret       TEXT,
    previous_secret_until INTEGER,
    created_at_us INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX webhook_endpoints_tenant ON webhook_endpoints (tenant_id, created_at_us, id);

-- The outbox: one event per batch terminal transition, written in the transaction of that
-- transition (only when the tenant has a subscribed endpoint). `body` holds the exact bytes
-- sent on every attempt.
CREATE TABLE webhook_events (
    id         TEXT PRIMARY KEY,
    tenant_id  TEXT NOT NULL,
    batch_id   TEXT NOT NULL,
    type       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    body       TEXT NOT NULL
);

-- One delivery per event and subscribed endpoint: pending → delivered, or → failed (given
-- up after the configured max age). A claim leases it until `lease_until` and counts an
-- attempt; a worker that dies leaves the lease to expire and the delivery is claimed again.
CREATE TABLE webhook_deliveries (
    event_id        TEXT NOT NULL REFERENCES webhook_events (id) ON DELETE CASCADE,
    endpoint_id     TEXT NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    state           TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_until     INTEGER,
    last_error      TEXT,
    finished_at     INTEGER,
    PRIMARY KEY (event_id, endpoint_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_finished ON webhook_deliveries (finished_at)
    WHERE state <> 'pending';
