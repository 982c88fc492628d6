-- Agents: one row per name. The epoch grows by one for every incarnation and fences
-- checkpoint writes from older ones.
CREATE TABLE arbor_agents (
    name               TEXT PRIMARY KEY,
    type_path          TEXT NOT NULL,
    status             TEXT NOT NULL,
    node_id            TEXT,
    epoch              INTEGER NOT NULL DEFAULT 0,
    checkpoint_version INTEGER NOT NULL DEFAULT 0,
    options            TEXT NOT NULL DEFAULT '{}',
    spawn_id           TEXT NOT NULL,
    last_error         TEXT,
    created_at         REAL NOT NULL,
    updated_at         REAL NOT NULL,
    started_at         REAL,
    checkpointed_at    REAL
);

CREATE TABLE arbor_checkpoints (
    agent      TEXT NOT NULL REFERENCES arbor_agents (name) ON DELETE CASCADE,
    version    INTEGER NOT NULL,
    epoch      INTEGER NOT NULL,
    state      TEXT NOT NULL,
    processed  TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    PRIMARY KEY (agent, version)
);

CREATE INDEX arbor_agents_status ON arbor_agents (status);
