-- The namespace of every agent, reminder, subscription and capability, as a column the
-- database derives from the full name (arbor/names.py: the text before the first ':', or
-- 'default' when the name has none). Listings of one namespace then read only its rows
-- through an index, whatever the database's collation. A stored generated column
-- (PostgreSQL 12 or later) is filled for the existing rows when it is added, which
-- rewrites the table, and on every insert, so no code writes it.
-- Key principals (key:<id>) and client subscribers (client:<id>) get the reserved words
-- 'key' and 'client', which no namespace can be called.
ALTER TABLE arbor_agents ADD COLUMN namespace TEXT GENERATED ALWAYS AS (
    CASE WHEN strpos(name, ':') > 0 THEN split_part(name, ':', 1) ELSE 'default' END
) STORED;
CREATE INDEX arbor_agents_namespace ON arbor_agents (namespace, name);

ALTER TABLE arbor_reminders ADD COLUMN namespace TEXT GENERATED ALWAYS AS (
    CASE WHEN strpos(agent, ':') > 0 THEN split_part(agent, ':', 1) ELSE 'default' END
) STORED;
CREATE INDEX arbor_reminders_namespace ON arbor_reminders (namespace, due_at, agent, name);

ALTER TABLE arbor_subscriptions ADD COLUMN namespace TEXT GENERATED ALWAYS AS (
    CASE WHEN strpos(topic, ':') > 0 THEN split_part(topic, ':', 1) ELSE 'default' END
) STORED;
CREATE INDEX arbor_subscriptions_namespace ON arbor_subscriptions (namespace, topic, subscriber);

ALTER TABLE arbor_capabilities ADD COLUMN namespace TEXT GENERATED ALWAYS AS (
    CASE WHEN strpos(principal, ':') > 0 THEN split_part(principal, ':', 1) ELSE 'default' END
) STORED;
CREATE INDEX arbor_capabilities_namespace ON arbor_capabilities (namespace, created_at, id);
