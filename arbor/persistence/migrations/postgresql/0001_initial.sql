-- Agents: one row per name. The epoch grows by one for every incarnation and fences
-- checkpoint writes from older ones.
CREATE TABLE arbor_agents (
    name               TEXT PRIMARY KEY,
    type_path          TEXT NOT NULL,
    status             TEXT NOT NULL,
    node_id            TEXT,
    epoch              BIGINT NOT NULL DEFAULT 0,
    checkpoint_version BIGINT NOT NULL DEFAULT 0,
    options            JSONB NOT NULL DEFAULT '{}',
    spawn_id           TEXT NOT NULL,
    last_error         TEXT,
    created_at         TIMESTAMPTZ NOT NULL,
    updated_at         TIMESTAMPTZ NOT NULL,
    started_at         TIMESTAMPTZ,
    checkpointed_at    TIMESTAMPTZ
);

CREATE INDEX arbor_agents_status ON arbor_agents (status);

CREATE TABLE arbor_checkpoints (
    agent      TEXT NOT NULL REFERENCES arbor_agents (name) ON DELETE CASCADE,
    version    BIGINT NOT NULL,
    epoch      BIGINT NOT NULL,
    state      JSONB NOT NULL,
    processed  JSONB NOT NULL DEFAULT '[]',
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (agent, version)
);
