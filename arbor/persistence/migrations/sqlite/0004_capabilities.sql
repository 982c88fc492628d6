-- Capabilities issued by the registry, one row per token. parent_id links a delegated
-- token to the token it came from, so a revocation can cascade. The token text is a
-- bearer credential: only the registry and the holder's own process read it. Times are
-- Unix seconds.
CREATE TABLE arbor_capabilities (
    id          TEXT PRIMARY KEY,
    principal   TEXT NOT NULL,
    parent_id   TEXT,
    pattern     TEXT NOT NULL,
    operations  TEXT NOT NULL,
    token       TEXT NOT NULL,
    granted_by  TEXT NOT NULL,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    revoked_at  REAL
);

CREATE INDEX arbor_capabilities_principal ON arbor_capabilities (principal);

CREATE INDEX arbor_capabilities_parent ON arbor_capabilities (parent_id);

-- Revoked token ids in revocation order; every checker polls for rows past the last seq
-- it has seen.
CREATE TABLE arbor_revocations (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    token_id   TEXT NOT NULL,
    revoked_at REAL NOT NULL
);

-- The cluster's capability signing key. private_key is NULL when the key comes from a
-- secret provider, so only the public key is stored.
CREATE TABLE arbor_cluster_keys (
    name        TEXT PRIMARY KEY,
    public_key  TEXT NOT NULL,
    private_key TEXT
);
