-- Batches and their chunks. Written only by the scheduler.

CREATE TABLE batches (
    id                TEXT PRIMARY KEY,
    tenant_id         TEXT NOT NULL REFERENCES tenants (id),
    endpoint          TEXT NOT NULL,
    input_file_id     TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status            TEXT NOT NULL,
    model             TEXT,
    -- errors.data of the Batch object (validation failures), a JSON array
    errors            JSONB NOT NULL DEFAULT '[]',
    metadata          JSONB,
    output_expires_after BIGINT NOT NULL,
    output_file_id    TEXT,
    error_file_id     TEXT,
    created_at_us     BIGINT NOT NULL,
    in_progress_at    BIGINT,
    expires_at        BIGINT NOT NULL,
    finalizing_at     BIGINT,
    completed_at      BIGINT,
    failed_at         BIGINT,
    expired_at        BIGINT,
    cancelling_at     BIGINT,
    cancelled_at      BIGINT,
    total             BIGINT NOT NULL DEFAULT 0,
    completed         BIGINT NOT NULL DEFAULT 0,
    failed            BIGINT NOT NULL DEFAULT 0,
    usage             JSONB NOT NULL DEFAULT '{}'
);
CREATE INDEX batches_tenant_order ON batches (tenant_id, created_at_us DESC, id DESC);
-- the scheduler's work lists: non-terminal batches
CREATE INDEX batches_active ON batches (status)
    WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');

-- A batch's input cut into byte ranges; each is one unit of work for an executor.
CREATE TABLE chunks (
    batch_id    TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,
    byte_start  BIGINT NOT NULL,
    byte_end    BIGINT NOT NULL,
    first_line  BIGINT NOT NULL,
    line_count  INTEGER NOT NULL,
    -- pending → dispatched → done
    state       TEXT NOT NULL DEFAULT 'pending',
    PRIMARY KEY (batch_id, idx)
);
CREATE INDEX chunks_open ON chunks (batch_id, state) WHERE state <> 'done';
