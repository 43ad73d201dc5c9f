-- Per-tenant quotas (issue 11): an operator's overrides of the configured defaults
-- (`[scheduler.quotas]`). A tenant without a row, or a NULL column, uses the default; 0 means
-- unlimited for that tenant. Set with `nightshift admin quotas set`.
CREATE TABLE tenant_quotas (
    tenant_id             TEXT PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    -- batches validating, in progress, finalizing or cancelling at once
    max_active_batches    BIGINT CHECK (max_active_batches >= 0),
    -- lines (requests) of those batches together
    max_enqueued_requests BIGINT CHECK (max_enqueued_requests >= 0),
    -- bytes of the tenant's visible files (uploads and results)
    max_stored_bytes      BIGINT CHECK (max_stored_bytes >= 0),
    updated_at_us         BIGINT NOT NULL
);

-- The quota checks count a tenant's active batches at every create and validation.
CREATE INDEX batches_tenant_active ON batches (tenant_id)
    WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');
