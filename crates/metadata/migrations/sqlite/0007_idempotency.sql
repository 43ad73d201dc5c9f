-- Idempotency-Key (issue 12). The SQLite twin of migrations/postgres/0007: same table,
-- columns and meaning.
CREATE TABLE idempotency_keys (
    tenant_id     TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    idem_key      TEXT NOT NULL,
    kind          TEXT NOT NULL,
    request_hash  TEXT NOT NULL,
    object_id     TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, idem_key)
) STRICT;
CREATE INDEX idempotency_keys_age ON idempotency_keys (created_at);
