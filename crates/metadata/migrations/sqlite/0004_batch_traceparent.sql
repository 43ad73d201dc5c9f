-- The W3C traceparent of the span that created a batch: every later step of its life is a
-- span of that trace (as in the Postgres schema).
ALTER TABLE batches ADD COLUMN traceparent TEXT;
