-- The namespace of every agent, reminder, subscription and capability, as a column the
-- database derives from the full name (arbor/names.py: the text before the first ':', or
-- 'default' when the name has none). Listings of one namespace then read only its rows
-- through an index. The columns are virtual generated columns (SQLite 3.31 or later):
-- each index stores the value, computed for the existing rows when the index is built
-- and on every insert, so no code writes it. Key principals (key:<id>) and client
-- subscribers (client:<id>) get the reserved words 'key' and 'client', which no
-- namespace can be called.
ALTER TABLE arbor_agents ADD COLUMN namespace TEXT GENERATED ALWAYS AS (
    CASE WHEN instr(name, ':') > 0 THEN substr(name, 1, instr(name, ':') - 1) ELSE 'default' END
) VIRTUAL;
CREATE INDEX arbor_agents_namespace ON arbor_agents (namespace, name);

ALTER TABLE arbor_reminders ADD COLUMN namespace TEXT GENERATED ALWAYS AS (
    CASE WHEN instr(agent, ':') > 0 THEN substr(agent, 1, instr(agent, ':') - 1) ELSE 'default' END
) VIRTUAL;
CREATE INDEX arbor_reminders_namespace ON arbor_reminders (namespace, due_at, agent, name);

ALTER TABLE arbor_subscriptions ADD COLUMN namespace TEXT GENERATED ALWAYS AS (
    CASE WHEN instr(topic, ':') > 0 THEN substr(topic, 1, instr(topic, ':') - 1) ELSE 'default' END
) VIRTUAL;
CREATE INDEX arbor_subscriptions_namespace ON arbor_subscriptions (namespace, topic, subscriber);

ALTER TABLE arbor_capabilities ADD COLUMN namespace TEXT GENERATED ALWAYS AS (
    CASE WHEN instr(principal, ':') > 0
        THEN substr(principal, 1, instr(principal, ':') - 1) ELSE 'default' END
) VIRTUAL;
CREATE INDEX arbor_capabilities_namespace ON arbor_capabilities (namespace, created_at, id);
