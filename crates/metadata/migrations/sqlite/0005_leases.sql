-- Leases (issue 9). The SQLite twin of migrations/postgres/0005: same columns and meaning
-- (`started` is 0/1, as SQLite has no BOOLEAN).

-- Chunk states: pending → dispatched → done, or → failed (given up).
ALTER TABLE chunks ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE chunks ADD COLUMN lease_until INTEGER;
ALTER TABLE chunks ADD COLUMN started INTEGER NOT NULL DEFAULT 0 CHECK (started IN (0, 1));
ALTER TABLE chunks ADD COLUMN failure TEXT;
CREATE INDEX chunks_leases ON chunks (lease_until) WHERE state = 'dispatched';

ALTER TABLE batches ADD COLUMN finalize_holder TEXT;
ALTER TABLE batches ADD COLUMN finalize_lease_until INTEGER;

CREATE INDEX batches_active_inputs ON batches (input_file_id)
    WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');
