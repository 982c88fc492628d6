-- Topics: an append-only log of events per topic and the durable subscriptions that read it.
-- head is the seq of the newest event ever appended to the topic. It only grows, so a seq
-- names one event for the life of the database, even after old events are trimmed.
CREATE TABLE arbor_topics (
    topic  TEXT PRIMARY KEY,
    head   INTEGER NOT NULL DEFAULT 0
);

-- publish_id makes a retried publish (a handler run again after a crash) append nothing.
-- event is JSON text. Times are Unix seconds.
CREATE TABLE arbor_topic_events (
    topic         TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    publish_id    TEXT NOT NULL,
    publisher     TEXT,
    event         TEXT NOT NULL,
    published_at  REAL NOT NULL,
    PRIMARY KEY (topic, seq)
);
CREATE UNIQUE INDEX arbor_topic_events_publish_id ON arbor_topic_events (topic, publish_id);

-- One row per topic and subscriber (an agent name, or client:<id> for a client iterator).
-- position is the seq of the last event the subscriber has passed, delivered or skipped.
CREATE TABLE arbor_subscriptions (
    topic       TEXT NOT NULL,
    subscriber  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    handler     TEXT,
    max_lag     INTEGER NOT NULL,
    position    INTEGER NOT NULL,
    delivered   INTEGER NOT NULL DEFAULT 0,
    skipped     INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    PRIMARY KEY (topic, subscriber)
);
CREATE INDEX arbor_subscriptions_subscriber ON arbor_subscriptions (subscriber);
