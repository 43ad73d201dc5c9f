-- What the executor that wrote a done chunk's result part reported about it (issue 10): the
-- part's size and CRC-32, and the counts and usage of its lines, as a JSON object
-- ({"bytes", "crc32", "completed", "failed", "usage"}). Set when the chunk becomes done; NULL
-- when unknown (a part left by an earlier run, a chunk done before this column existed). The
-- finalizer copies a part whose tally has no failed line without parsing it.
ALTER TABLE chunks ADD COLUMN part_tally TEXT;
