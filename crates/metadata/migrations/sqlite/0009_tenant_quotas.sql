-- Per-tenant quotas (issue 11). The SQLite twin of migrations/postgres/0009.
CREATE TABLE tenant_quotas (
    tenant_id             TEXT PRIMARY KEY NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    max_active_batches    INTEGER CHECK (max_active_batches >= 0),
    max_enqueued_requests INTEGER CHECK (max_enqueued_requests >= 0),
    max_stored_bytes      INTEGER CHECK (max_stored_bytes >= 0),
    updated_at_us         INTEGER NOT NULL
) STRICT;

CREATE INDEX batches_tenant_active ON batches (tenant_id)
    WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');
