-- Durable reminders, one row per agent and reminder name. due_at is the next firing; the
-- registry moves it forward (or deletes a one-shot row) only after the agent acknowledged
-- the delivery due at that time. id changes whenever the reminder is set again, so a
-- message id derived from id and due_at names one delivery. payload is JSON text, kept
-- byte for byte (jsonb would turn large floats into numeric).
CREATE TABLE arbor_reminders (
    agent       TEXT NOT NULL,
    name        TEXT NOT NULL,
    id          TEXT NOT NULL,
    due_at      TIMESTAMPTZ NOT NULL,
    period_ms   BIGINT,
    payload     TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    fired       BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (agent, name)
);
