-- Tenants, their API keys, and files. Written only by the scheduler.
-- The SQLite twin of migrations/postgres/0001: same tables, columns and units. Tables are
-- STRICT so a column holds only its declared type, as in Postgres (INTEGER is 64-bit).

CREATE TABLE tenants (
    id            TEXT PRIMARY KEY NOT NULL,
    name          TEXT NOT NULL,
    created_at_us INTEGER NOT NULL
) STRICT;

-- Keys are stored as SHA-256 digests; the key itself is shown once, at creation.
CREATE TABLE api_keys (
    key_hash      TEXT PRIMARY KEY NOT NULL,
    tenant_id     TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    created_at_us INTEGER NOT NULL
) STRICT;
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

CREATE TABLE files (
    id            TEXT PRIMARY KEY NOT NULL,
    tenant_id     TEXT NOT NULL REFERENCES tenants (id),
    bytes         INTEGER NOT NULL CHECK (bytes >= 0),
    -- creation time in microseconds: the list order (ties broken by id)
    created_at_us INTEGER NOT NULL,
    -- unix seconds; NULL = never
    expires_at    INTEGER,
    filename      TEXT NOT NULL,
    purpose       TEXT NOT NULL,
    storage_key   TEXT NOT NULL,
    -- set when a client deletes the file: it is hidden at once, and the sweeper deletes its
    -- bytes and then the row
    deleted_at    INTEGER
) STRICT;
CREATE INDEX files_tenant_order ON files (tenant_id, created_at_us, id) WHERE deleted_at IS NULL;
CREATE INDEX files_expiry ON files (expires_at) WHERE deleted_at IS NULL AND expires_at IS NOT NULL;
CREATE INDEX files_deleted ON files (deleted_at) WHERE deleted_at IS NOT NULL;
