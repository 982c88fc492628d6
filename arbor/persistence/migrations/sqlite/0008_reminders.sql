-- Durable reminders, one row per agent and reminder name. due_at is the next firing; the
-- registry moves it forward (or deletes a one-shot row) only after the agent acknowledged
-- the delivery due at that time. id changes whenever the reminder is set again, so a
-- message id derived from id and due_at names one delivery. Times are Unix seconds.
CREATE TABLE arbor_reminders (
    agent       TEXT NOT NULL,
    name        TEXT NOT NULL,
    id          TEXT NOT NULL,
    due_at      REAL NOT NULL,
    period_ms   INTEGER,
    payload     TEXT NOT NULL,
    created_at  REAL NOT NULL,
    fired       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (agent, name)
);
