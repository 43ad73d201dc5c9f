-- Dispatch fairness that survives a scheduler restart (issue 11): request lines handed out per
-- model to each tenant with work waiting on it (the scheduler's virtual-time accounts, see
-- crates/scheduler/src/pipeline/fairness.rs). The dispatcher reads them once at start and
-- writes them after each round that changed them; a tenant with no work left on a model loses
-- its row, so the table holds one row per model and active tenant, whatever the history.
CREATE TABLE dispatch_accounts (
    model     TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    served    BIGINT NOT NULL CHECK (served >= 0),
    PRIMARY KEY (model, tenant_id)
);
