-- The append-only audit log. Each row's hash is a SHA-256 over its other columns and the
-- previous row's hash, so editing, deleting or reordering rows breaks the chain. seq is
-- assigned under a transaction-level advisory lock and counts up from 1 without gaps, which
-- a sequence cannot promise because a rolled-back insert skips a value. detail is json, not
-- jsonb, because json keeps the exact text that the hash covers while jsonb rewrites
-- numbers such as 1e16.
CREATE TABLE audit_log (
    seq       BIGINT PRIMARY KEY,
    at        TIMESTAMPTZ NOT NULL,
    principal TEXT NOT NULL,
    action    TEXT NOT NULL,
    resource  TEXT NOT NULL,
    decision  TEXT NOT NULL,
    detail    JSON NOT NULL DEFAULT '{}',
    trace_id  TEXT,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);

CREATE INDEX audit_log_principal ON audit_log (principal, seq);

CREATE INDEX audit_log_at ON audit_log (at);
