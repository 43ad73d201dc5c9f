-- Dispatch fairness accounts (issue 11). The SQLite twin of migrations/postgres/0009.
CREATE TABLE dispatch_accounts (
    model     TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    served    INTEGER NOT NULL CHECK (served >= 0),
    PRIMARY KEY (model, tenant_id)
) STRICT;
