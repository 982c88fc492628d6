-- The cluster lease: which Ray cluster runs the agents. Its registry alone reconciles,
-- and agent incarnations of any other cluster refuse to start. A new cluster takes the
-- lease when its registry first starts; the generation grows by one on every claim.
CREATE TABLE arbor_cluster_lease (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    holder      TEXT NOT NULL,
    generation  BIGINT NOT NULL,
    claimed_at  TIMESTAMPTZ NOT NULL
);
