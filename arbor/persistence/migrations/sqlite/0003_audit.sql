-- The append-only audit log. Each row's hash is a SHA-256 over its other columns and the
-- previous row's hash, so editing, deleting or reordering rows breaks the chain. seq is
-- assigned under the database write lock and counts up from 1 without gaps. at is in
-- microseconds since the Unix epoch (UTC), an integer so that the hashed value round-trips
-- exactly. detail is the canonical JSON text that the hash covers.
CREATE TABLE audit_log (
    seq       INTEGER PRIMARY KEY,
    at        INTEGER NOT NULL,
    principal TEXT NOT NULL,
    action    TEXT NOT NULL,
    resource  TEXT NOT NULL,
    decision  TEXT NOT NULL,
    detail    TEXT NOT NULL DEFAULT '{}',
    trace_id  TEXT,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);

CREATE INDEX audit_log_principal ON audit_log (principal, seq);

CREATE INDEX audit_log_at ON audit_log (at);
