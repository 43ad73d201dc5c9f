-- The pipeline's bookkeeping on batches. The SQLite twin of migrations/postgres/0003.

-- Why a running batch ends early: 'expired' (its deadline passed). NULL: it runs to the end.
-- (A cancel is its own status, `cancelling`.)
ALTER TABLE batches ADD COLUMN ending TEXT;
-- When the scheduler asked the finalizer to end the batch (at most once; a restart re-asks
-- for every batch asked but not yet terminal).
ALTER TABLE batches ADD COLUMN finalize_requested_at INTEGER;
