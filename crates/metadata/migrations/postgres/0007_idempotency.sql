-- Idempotency-Key (issue 12): a tenant's key names the first request made with it, and the
-- object that request created, for 24 hours. The row is inserted in the same transaction as
-- the object (a file or a batch), so two requests racing with one key create one object: the
-- loser finds the winner's row and answers with its object.
CREATE TABLE idempotency_keys (
    tenant_id     TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    -- the client's key: 1..=255 bytes of printable ASCII
    idem_key      TEXT NOT NULL,
    -- what the request created: 'file' or 'batch'
    kind          TEXT NOT NULL,
    -- SHA-256 (hex) over the request's route and defining fields (see
    -- nightshift_core::idempotency::RequestHash): a reuse with another request is refused
    request_hash  TEXT NOT NULL,
    -- the file or batch id the first request created
    object_id     TEXT NOT NULL,
    -- unix seconds; a key older than 24 h is ignored (overwritten by a new request) and swept
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, idem_key)
);
CREATE INDEX idempotency_keys_age ON idempotency_keys (created_at);
