"""Batched checkpoint writes on PostgreSQL: one statement per batch, on connections of their own."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg.rows import TupleRow

from arbor.errors import CheckpointConflict
from arbor.persistence.base import EncodedCheckpoint

# Seconds a batch waits for one of the batch connections before the attempt fails and the
# store's retry loop tries again. Only more concurrent batches than connections wait.
CONNECTION_WAIT_S = 3.0

# One batch of checkpoint writes: lock the agents' rows in name order, keep the writes
# whose epoch is current, insert their checkpoints, move the agents' versions on and prune.
# The sub-statements share one snapshot, so the DELETE finds only older versions. The
# parameters are sent in binary (%b), which spares psycopg the escaping of text arrays.
BATCH_CHECKPOINT_SQL = """
WITH input AS (
    SELECT * FROM unnest(
        %b::text[], %b::bigint[], %b::text[], %b::text[], %b::text[], %b::int[]
    ) AS t(name, epoch, state, processed, outbox, keep)
),
locked AS (
    SELECT a.name, a.epoch, a.checkpoint_version FROM arbor_agents a
    WHERE a.name IN (SELECT name FROM input) ORDER BY a.name FOR UPDATE
),
ok AS (
    SELECT i.*, l.checkpoint_version + 1 AS version FROM input i
    JOIN locked l ON l.name = i.name AND l.epoch = i.epoch
),
inserted AS (
    INSERT INTO arbor_checkpoints (agent, version, epoch, state, processed, outbox, created_at)
    SELECT name, version, epoch, state::jsonb, processed::jsonb, outbox::jsonb, now() FROM ok
),
updated AS (
    UPDATE arbor_agents a SET checkpoint_version = ok.version, checkpointed_at = now(),
        updated_at = now()
    FROM ok WHERE a.name = ok.name
),
pruned AS (
    DELETE FROM arbor_checkpoints c USING ok
    WHERE c.agent = ok.name AND c.version <= ok.version - ok.keep
)
SELECT i.name, l.epoch, ok.version FROM input i
LEFT JOIN locked l ON l.name = i.name
LEFT JOIN ok ON ok.name = i.name
"""


class BatchConnections:
    """Autocommit connections that run batch statements, apart from the store's pool.

    A batch is one statement, which PostgreSQL runs as a transaction of its own in
    autocommit mode. So a batch costs one round trip instead of four: the pool's liveness
    check when it hands out a connection, BEGIN, the statement and COMMIT. A broken
    connection is closed, and the next attempt opens a new one. An outage therefore raises
    `psycopg.OperationalError`, which the store's retry loop retries and then reports.

    Args:
        url: the PostgreSQL URL, with its password if it needs one.
        limit: connections at most; further concurrent batches wait for a free one.
    """

    def __init__(self, url: str, limit: int) -> None:
        self._url = url
        self._idle: list[psycopg.Connection[TupleRow]] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(limit)
        self._closed = False

    def write(self, writes: list[EncodedCheckpoint]) -> list[int | CheckpointConflict]:
        """Commit ``writes`` with one statement; the caller names each agent at most once.

        Returns:
            For each write, in order, the new version or the `CheckpointConflict` of a
            stale incarnation.

        Raises:
            psycopg.OperationalError: the connection failed or none was free in time.
        """
        columns = tuple(list(column) for column in zip(*writes, strict=True))
        with self._connection() as connection:
            # The server commits at the Sync that ends the statement, after its rows.
            # execute returns at the ReadyForQuery after the commit, and raises if the
            # commit failed, so no caller learns its version before the commit.
            rows = connection.execute(BATCH_CHECKPOINT_SQL, columns).fetchall()

        outcome = {name: (current, version) for name, current, version in rows}
        results: list[int | CheckpointConflict] = []
        for write in writes:
            current, version = outcome.get(write.name, (None, None))
            if version is None:
                epoch = None if current is None else int(current)
                results.append(CheckpointConflict(write.name, write.epoch, epoch))
            else:
                results.append(int(version))
        return results

    def close(self) -> None:
        """Close the idle connections; a connection in use closes when its batch ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[TupleRow]]:
        if not self._slots.acquire(timeout=CONNECTION_WAIT_S):
            raise psycopg.OperationalError(
                f"no batch connection was free within {CONNECTION_WAIT_S:g} s"
            )
        try:
            with self._lock:
                if self._closed:
                    raise psycopg.InterfaceError("the store is closed")
                connection = self._idle.pop() if self._idle else None
            if connection is None:
                connection = psycopg.connect(self._url, autocommit=True, connect_timeout=5)
            try:
                yield connection
            finally:
                self._put_back(connection)
        finally:
            self._slots.release()

    def _put_back(self, connection: psycopg.Connection[TupleRow]) -> None:
        with self._lock:
            if not (self._closed or connection.broken or connection.closed):
                self._idle.append(connection)
                return
        connection.close()
