-- Batches and their chunks. Written only by the scheduler.
-- The SQLite twin of migrations/postgres/0002; JSONB columns are TEXT holding JSON.

CREATE TABLE batches (
    id                TEXT PRIMARY KEY NOT NULL,
    tenant_id         TEXT NOT NULL REFERENCES tenants (id),
    endpoint          TEXT NOT NULL,
    input_file_id     TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status            TEXT NOT NULL,
    model             TEXT,
    -- errors.data of the Batch object (validation failures), a JSON array
    errors            TEXT NOT NULL DEFAULT '[]',
    metadata          TEXT,
    output_expires_after INTEGER NOT NULL,
    output_file_id    TEXT,
    error_file_id     TEXT,
    created_at_us     INTEGER NOT NULL,
    in_progress_at    INTEGER,
    expires_at        INTEGER NOT NULL,
    finalizing_at     INTEGER,
    completed_at      INTEGER,
    failed_at         INTEGER,
    expired_at        INTEGER,
    cancelling_at     INTEGER,
    cancelled_at      INTEGER,
    total             INTEGER NOT NULL DEFAULT 0,
    completed         INTEGER NOT NULL DEFAULT 0,
    failed            INTEGER NOT NULL DEFAULT 0,
    usage             TEXT NOT NULL DEFAULT '{}'
) STRICT;
CREATE INDEX batches_tenant_order ON batches (tenant_id, created_at_us DESC, id DESC);
-- the scheduler's work lists: non-terminal batches
CREATE INDEX batches_active ON batches (status)
    WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');

-- A batch's input cut into byte ranges; each is one unit of work for an executor.
CREATE TABLE chunks (
    batch_id    TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,
    byte_start  INTEGER NOT NULL,
    byte_end    INTEGER NOT NULL,
    first_line  INTEGER NOT NULL,
    line_count  INTEGER NOT NULL,
    -- pending → dispatched → done
    state       TEXT NOT NULL DEFAULT 'pending',
    PRIMARY KEY (batch_id, idx)
) STRICT;
CREATE INDEX chunks_open ON chunks (batch_id, state) WHERE state <> 'done';
