-- Messages an agent sent while handling a message, kept until they are delivered, so a
-- crash right after a commit cannot lose them.
ALTER TABLE arbor_checkpoints ADD COLUMN outbox TEXT NOT NULL DEFAULT '[]';
