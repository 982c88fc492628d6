-- API keys of the HTTP gateway. Each key is the principal key:<id>. Only a salted scrypt
-- hash of the secret is kept; the secret itself is shown once, at creation. Times are
-- Unix seconds.
CREATE TABLE arbor_api_keys (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    secret_hash  TEXT NOT NULL,
    created_at   REAL NOT NULL,
    revoked_at   REAL
);
