-- Asynchronous commands started through the HTTP gateway, and the progress events each
-- one reports. Events stay in the store so that a watcher can resume from its last
-- event id after a disconnect or a gateway restart. params, result and data are JSON
-- text, kept byte for byte (jsonb would turn large floats into numeric).
CREATE TABLE arbor_executions (
    id          TEXT PRIMARY KEY,
    command     TEXT NOT NULL,
    principal   TEXT NOT NULL,
    params      TEXT NOT NULL,
    status      TEXT NOT NULL,
    result      TEXT,
    error       TEXT,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);

-- seq counts from 1 within one execution and is the SSE event id.
CREATE TABLE arbor_execution_events (
    execution_id  TEXT NOT NULL REFERENCES arbor_executions (id) ON DELETE CASCADE,
    seq           INTEGER NOT NULL,
    kind          TEXT NOT NULL,
    data          TEXT NOT NULL,
    at            TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (execution_id, seq)
);
