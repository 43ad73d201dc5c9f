-- Retries of failed lines (issue 12). The SQLite twin of migrations/postgres/0008.
CREATE TABLE batch_retries (
    batch_id      TEXT PRIMARY KEY NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    tenant_id     TEXT NOT NULL,
    retry_of      TEXT NOT NULL,
    filter        TEXT NOT NULL,
    created_at_us INTEGER NOT NULL
) STRICT;
CREATE INDEX batch_retries_parent ON batch_retries (tenant_id, retry_of, created_at_us, batch_id);
