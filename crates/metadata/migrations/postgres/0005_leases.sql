-- Leases: every chunk handed out and every finalization in progress is owned for a bounded
-- time, so work whose message or worker was lost is found and driven again (issue 9).

-- Chunk states: pending → dispatched → done, or → failed (given up: its lines without a
-- result become `chunk_failed` error lines carrying `failure`).
-- How many times the chunk was handed out (a claim, or a re-drive after its executor stopped
-- reporting); a re-publish of a task that was lost before any executor started it is free.
ALTER TABLE chunks ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
-- A dispatched chunk is owned until then (unix seconds): its executor's heartbeats renew it.
-- Past it, the scheduler's lease sweep re-drives the chunk, gives it up, or waits (see
-- MetadataStore::sweep_chunk_leases). NULL: not dispatched, or dispatched before leases
-- existed (treated as expired).
ALTER TABLE chunks ADD COLUMN lease_until BIGINT;
-- An executor reported the chunk running since it was last (re)dispatched.
ALTER TABLE chunks ADD COLUMN started BOOLEAN NOT NULL DEFAULT false;
-- Why a failed chunk was given up.
ALTER TABLE chunks ADD COLUMN failure TEXT;
CREATE INDEX chunks_leases ON chunks (lease_until) WHERE state = 'dispatched';

-- The finalization lease: one finalizer at a time assembles a batch; it renews the lease while
-- it works. A finalize job is published again only once the lease is absent or expired.
ALTER TABLE batches ADD COLUMN finalize_holder TEXT;
ALTER TABLE batches ADD COLUMN finalize_lease_until BIGINT;

-- Inputs outlive their batches: the file sweeper skips a file that a non-terminal batch reads.
CREATE INDEX batches_active_inputs ON batches (input_file_id)
    WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');
