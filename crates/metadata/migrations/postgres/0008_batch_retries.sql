-- Retries of failed lines (issue 12): a batch created by `POST /v1/batches/{id}/retry` runs the
-- failed lines of an ended batch. Its input file is built in the background from the parent's
-- input and result files (while the new batch is `validating`); this row says where from. The
-- input is built once its file record exists (batches.input_file_id).
CREATE TABLE batch_retries (
    batch_id      TEXT PRIMARY KEY REFERENCES batches (id) ON DELETE CASCADE,
    tenant_id     TEXT NOT NULL,
    -- the ended batch whose failed lines this one runs
    retry_of      TEXT NOT NULL,
    -- which failed lines: {"error_codes": [...], "status_codes": [...], "status_classes": [...]}
    -- (empty lists: every failed line)
    filter        JSONB NOT NULL,
    created_at_us BIGINT NOT NULL
);
-- GET /v1/batches?retry_of=<parent>: the parent → child direction
CREATE INDEX batch_retries_parent ON batch_retries (tenant_id, retry_of, created_at_us, batch_id);
