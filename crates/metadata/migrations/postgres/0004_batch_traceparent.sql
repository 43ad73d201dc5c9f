-- The W3C traceparent of the span that created a batch: every later step of its life is a
-- span of that trace, across services and restarts. NULL when traces were not set up.
ALTER TABLE batches ADD COLUMN traceparent TEXT;
