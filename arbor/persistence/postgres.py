"""The PostgreSQL checkpoint store for clusters (psycopg 3 with a connection pool)."""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from arbor.errors import AgentNotFound, CheckpointConflict, ClusterLeaseLost, NameTaken
from arbor.persistence.audit import (
    ALLOWED,
    GENESIS_HASH,
    VERIFY_BATCH_ROWS,
    AuditEntry,
    AuditRow,
    AuditVerification,
    check_query,
    hash_parts,
    seal_row,
    verify_chain,
)
from arbor.persistence.base import (
    RUNNING,
    AgentRecord,
    Checkpoint,
    CheckpointInfo,
    CheckpointStore,
    CheckpointWrite,
    EncodedCheckpoint,
    agent_listing,
    encode_checkpoint,
    migration_scripts,
    split_statements,
)
from arbor.persistence.capabilities import CapabilityTables
from arbor.persistence.gateway import GatewayTables
from arbor.persistence.lease import LeaseTables
from arbor.persistence.pgbatch import BatchConnections
from arbor.persistence.reminders import ReminderTables
from arbor.persistence.topics import TopicTables

# Seconds to wait for a pooled connection before the attempt counts as failed and is
# retried. It is short because the retry loop, not the pool, sets the total wait.
POOL_TIMEOUT_S = 3.0

# A pooled connection idle for longer than this is checked before use. One returned more
# recently skips the check's round trip. If the server dropped it all the same, the first
# statement fails, and the retry loop checks every connection for this long.
CHECK_AFTER_IDLE_S = 5.0

# The agent name that `rehearse_first_incarnation` inserts and rolls back. Names starting
# with "arbor-" are reserved, so no agent has it.
REHEARSAL_NAME = "arbor-rehearsal"

# Connections at most for group commit batches, opened on first use besides the pool. A
# host's group committer has two threads and so uses two of them.
BATCH_CONNECTIONS = 4

# Any fixed key serialises concurrent migrations across processes; this one spells "arbor".
MIGRATION_LOCK_KEY = 0x6172626F72

# The advisory lock that serialises audit log appends across processes. It spells "audit".
AUDIT_LOCK_KEY = 0x6175646974

# detail is read as text, the exact JSON that the row's hash covers.
_AUDIT_COLUMNS = (
    "seq, at, principal, action, resource, decision, detail::text, trace_id, prev_hash, hash"
)

_AGENT_COLUMNS = (
    "name, type_path, status, spawn_id, options, node_id, epoch, checkpoint_version, "
    "last_error, created_at, updated_at, started_at, checkpointed_at"
)

# A spawn's commit in one statement. It inserts the agent's record unless the name is
# taken or another cluster has the lease, and only with the record, the audit row after
# the chain's head and the first checkpoint. The audit lock is taken by the statement
# before it, so this statement's snapshot reads the newest head.
_CREATE_FIRST = f"""
WITH lease AS (
    SELECT holder FROM arbor_cluster_lease WHERE id = 1
), agent AS (
    INSERT INTO arbor_agents (name, type_path, status, spawn_id, options, node_id, epoch,
        checkpoint_version, created_at, updated_at, started_at, checkpointed_at)
    SELECT %(name)s, %(type_path)s, %(status)s, %(spawn_id)s, %(options)s, %(node_id)s, 1, 1,
        now(), now(), now(), now()
    WHERE %(cluster)s::text IS NULL
        OR NOT EXISTS (SELECT FROM lease WHERE holder <> %(cluster)s::text)
    ON CONFLICT (name) DO NOTHING
    RETURNING {_AGENT_COLUMNS}
), head AS (
    SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1
), link AS (
    SELECT COALESCE((SELECT seq FROM head), 0) + 1 AS seq,
        COALESCE((SELECT hash FROM head), %(genesis)s) AS prev_hash
), audit AS (
    INSERT INTO audit_log (seq, at, principal, action, resource, decision, detail, trace_id,
        prev_hash, hash)
    SELECT link.seq, %(at)s, %(principal)s, %(action)s, %(resource)s, %(decision)s,
        %(detail_text)s::json, %(trace_id)s, link.prev_hash,
        encode(sha256(convert_to(
            %(first)s || link.prev_hash || %(second)s || link.seq::text || %(third)s, 'UTF8'
        )), 'hex')
    FROM agent, link
), checkpoint AS (
    INSERT INTO arbor_checkpoints (agent, version, epoch, state, processed, outbox, created_at)
    SELECT name, 1, 1, %(state)s::jsonb, '[]'::jsonb, '[]'::jsonb, now() FROM agent
)
SELECT (SELECT holder FROM lease), agent.* FROM (VALUES (1)) AS one LEFT JOIN agent ON true
"""


class PostgresStore(
    CheckpointStore, CapabilityTables, GatewayTables, LeaseTables, ReminderTables, TopicTables
):
    """Checkpoint store in PostgreSQL; state is kept as jsonb."""

    dialect = "postgresql"

    def __init__(
        self, url: str, pool_max: int, retry_attempts: int, retry_backoff_s: float
    ) -> None:
        super().__init__(url, retry_attempts, retry_backoff_s)
        idle_check = self._idle_check = IdleCheck(CHECK_AFTER_IDLE_S)
        # One direct connection first: an unreachable server then fails through the retry
        # loop with psycopg's own message, not with a pool timeout after background noise.
        self._retry("connect", lambda: psycopg.connect(url, connect_timeout=5).close())
        self._pool: ConnectionPool[psycopg.Connection[TupleRow]] = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_max,
            timeout=POOL_TIMEOUT_S,
            # A connection idle for a while is checked before use, so that one the server
            # dropped is replaced instead of failing the next transaction's first statement.
            check=idle_check.check,
            reset=idle_check.returned,
            kwargs={"connect_timeout": 5},
            open=False,
            name="arbor",
        )
        self._pool.open(wait=False)
        # Batches of the group committer run on connections of their own, one per
        # committer thread; see `BatchConnections` for why they skip the pool.
        self._batches = BatchConnections(url, BATCH_CONNECTIONS)

    @contextmanager
    def _transaction(self, pipelined: bool = False) -> Iterator[psycopg.Connection[TupleRow]]:
        """Run a transaction on a pooled connection.

        ``pipelined`` sends the statements in pipeline mode: BEGIN, COMMIT and every
        statement whose result the caller does not read before the next one travel
        together, so a transaction of several statements takes fewer round trips.
        """
        with self._pool.connection() as connection:
            if not pipelined:
                with connection.transaction():
                    yield connection
                return
            with connection.pipeline(), connection.transaction():
                yield connection

    def _is_transient(self, error: BaseException) -> bool:
        return isinstance(error, psycopg.OperationalError | PoolTimeout)

    def _after_transient_error(self) -> None:
        # A dropped connection is often not alone, as after a server restart. Checking each
        # pooled connection for a while keeps the retries from spending their attempts on
        # the other dropped ones.
        self._idle_check.check_all()

    def migrate(self) -> list[int]:
        def step() -> list[int]:
            with self._transaction() as connection:
                connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
                connection.execute(
                    "CREATE TABLE IF NOT EXISTS arbor_schema_migrations "
                    "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
                done = {
                    row[0]
                    for row in connection.execute("SELECT version FROM arbor_schema_migrations")
                }
                applied = []
                for version, sql in migration_scripts(self.dialect):
                    if version in done:
                        continue
                    for statement in split_statements(sql):
                        connection.execute(statement.encode())
                    connection.execute(
                        "INSERT INTO arbor_schema_migrations (version) VALUES (%s)", (version,)
                    )
                    applied.append(version)
                return applied

        return self._retry("migrate", step)

    def create_agent(self, record: AgentRecord) -> AgentRecord:
        def step() -> AgentRecord:
            with self._transaction() as connection:
                row = _insert_agent(connection, record)
                if row is not None:
                    return _record(row)
                row = connection.execute(
                    f"SELECT {_AGENT_COLUMNS} FROM arbor_agents WHERE name = %s", (record.name,)
                ).fetchone()
            if row is None:
                # Deleted between the two statements; the next attempt inserts it.
                raise psycopg.OperationalError("agent row vanished during create; retrying")
            existing = _record(row)
            if existing.spawn_id == record.spawn_id:
                return existing
            raise NameTaken(record.name, existing.status)

        return self._retry("create_agent", step)

    def create_agent_audited(
        self, record: AgentRecord, entry: AuditEntry
    ) -> tuple[AgentRecord, AuditEntry | None]:
        def step() -> tuple[AgentRecord, AuditEntry | None]:
            with self._transaction() as connection:
                row = _insert_agent(connection, record)
                if row is not None:
                    return _record(row), self._append_audit(connection, entry)
                row = connection.execute(
                    f"SELECT {_AGENT_COLUMNS} FROM arbor_agents WHERE name = %s", (record.name,)
                ).fetchone()
            if row is None:
                # Deleted between the two statements; the next attempt inserts it.
                raise psycopg.OperationalError("agent row vanished during create; retrying")
            existing = _record(row)
            if existing.spawn_id == record.spawn_id:
                return existing, None
            raise NameTaken(record.name, existing.status)

        return self._retry("create_agent_audited", step)

    def get_agent(self, name: str) -> AgentRecord | None:
        def step() -> AgentRecord | None:
            with self._pool.connection() as connection:
                row = connection.execute(
                    f"SELECT {_AGENT_COLUMNS} FROM arbor_agents WHERE name = %s", (name,)
                ).fetchone()
            return _record(row) if row else None

        return self._retry("get_agent", step)

    def list_agents(
        self,
        status: str | None = None,
        namespace: str | None = None,
        *,
        prefix: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[AgentRecord]:
        clauses, parameters = agent_listing(self.dialect, status, namespace, prefix, after, limit)
        query = f"SELECT {_AGENT_COLUMNS} FROM arbor_agents{clauses}"

        def step() -> list[AgentRecord]:
            with self._pool.connection() as connection:
                rows = connection.execute(query.encode(), parameters).fetchall()
            return [_record(row) for row in rows]

        return self._retry("list_agents", step)

    def set_status(self, name: str, status: str, last_error: str | None = None) -> None:
        def step() -> None:
            with self._transaction() as connection:
                connection.execute(
                    "UPDATE arbor_agents SET status = %s, last_error = COALESCE(%s, last_error), "
                    "updated_at = now() WHERE name = %s",
                    (status, last_error, name),
                )

        self._retry("set_status", step)

    def update_options(self, name: str, options: dict[str, Any]) -> None:
        def step() -> None:
            with self._transaction() as connection:
                connection.execute(
                    "UPDATE arbor_agents SET options = %s, updated_at = now() WHERE name = %s",
                    (Jsonb(options), name),
                )

        self._retry("update_options", step)

    def begin_incarnation(
        self,
        name: str,
        node_id: str | None,
        cluster_id: str | None = None,
        stopping: bool = False,
    ) -> int:
        def step() -> int:
            with self._transaction() as connection:
                self.check_cluster_lease(connection, cluster_id)
                row = connection.execute(
                    "UPDATE arbor_agents SET epoch = epoch + 1, "
                    "status = CASE WHEN %s THEN status ELSE %s END, node_id = %s, "
                    "started_at = now(), updated_at = now() "
                    "WHERE name = %s AND (%s OR status <> 'stopped') RETURNING epoch",
                    (stopping, RUNNING, node_id, name, stopping),
                ).fetchone()
            if row is None:
                raise AgentNotFound(name, "it was stopped or deleted, so it does not start again")
            return int(row[0])

        return self._retry("begin_incarnation", step)

    def begin_first_incarnation(
        self,
        name: str,
        epoch: int,
        node_id: str | None,
        cluster_id: str | None,
        state_json: str,
    ) -> AgentRecord | None:
        def step() -> AgentRecord | None:
            with self._transaction() as connection:
                self.check_cluster_lease(connection, cluster_id)
                row = connection.execute(
                    "UPDATE arbor_agents SET epoch = epoch + 1, status = %s, node_id = %s, "
                    "checkpoint_version = 1, started_at = now(), checkpointed_at = now(), "
                    "updated_at = now() WHERE name = %s AND epoch = %s "
                    "AND checkpoint_version = 0 AND status <> 'stopped' "
                    f"RETURNING {_AGENT_COLUMNS}",
                    (RUNNING, node_id, name, epoch),
                ).fetchone()
                if row is None:
                    return None
                _insert_first_checkpoint(connection, name, row[6], state_json)
            return _record(row)

        return self._retry("begin_first_incarnation", step)

    def create_first_incarnation(
        self,
        record: AgentRecord,
        entry: AuditEntry,
        node_id: str | None,
        cluster_id: str | None,
        state_json: str,
    ) -> AgentRecord | None:
        def step() -> AgentRecord | None:
            with self._pool.connection() as connection:
                with connection.pipeline(), connection.transaction():
                    created = self._create_first(
                        connection, record, entry, node_id, cluster_id, state_json
                    )
                # The row arrives with the reply to COMMIT. When another cluster has the
                # lease, nothing was written.
                return _created(created, cluster_id)

        return self._retry("create_first_incarnation", step)

    def rehearse_first_incarnation(self, cluster_id: str | None) -> None:
        # A new server session loads its catalog entries for each table and index on
        # first use, which takes milliseconds. This loads those of the spawn's commit.
        record = AgentRecord(name=REHEARSAL_NAME, type_path="", status=RUNNING, spawn_id="")
        entry = AuditEntry(
            principal="operator",
            action="spawn",
            resource=f"arbor://agent/spawn/{REHEARSAL_NAME}",
            decision=ALLOWED,
        )
        with self._pool.connection() as connection:
            with connection.pipeline(), connection.transaction(force_rollback=True):
                created = self._create_first(connection, record, entry, None, cluster_id, "{}")
            _created(created, cluster_id)

    def _create_first(
        self,
        connection: psycopg.Connection[TupleRow],
        record: AgentRecord,
        entry: AuditEntry,
        node_id: str | None,
        cluster_id: str | None,
        state_json: str,
    ) -> psycopg.Cursor[TupleRow]:
        """Send the statements of `create_first_incarnation`, and return the cursor of its row.

        The row contains the lease's holder, then the agent's columns, all None when the name
        was taken. Nothing reads a result before COMMIT, so in a pipelined transaction the
        whole commit takes one round trip.
        """
        # seal_row validates the entry. The statement fills in seq, prev_hash and hash.
        row = seal_row(entry, 0, GENESIS_HASH)
        first, second, third = hash_parts(row)
        # Prepared at once, so that the claim after a warm actor's rehearsal, the second
        # run on its connection, skips parsing and planning.
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (AUDIT_LOCK_KEY,), prepare=True)
        return connection.execute(
            _CREATE_FIRST,
            {
                **row._asdict(),
                "name": record.name,
                "type_path": record.type_path,
                "status": RUNNING,
                "spawn_id": record.spawn_id,
                "options": Jsonb(record.options),
                "node_id": node_id,
                "cluster": cluster_id,
                "genesis": GENESIS_HASH,
                "first": first,
                "second": second,
                "third": third,
                "state": state_json,
            },
            prepare=True,
        )

    def fence(self, name: str) -> int:
        def step() -> int:
            with self._transaction() as connection:
                row = connection.execute(
                    "UPDATE arbor_agents SET epoch = epoch + 1, updated_at = now() "
                    "WHERE name = %s RETURNING epoch",
                    (name,),
                ).fetchone()
            if row is None:
                raise AgentNotFound(name)
            return int(row[0])

        return self._retry("fence", step)

    def write_checkpoint(
        self,
        name: str,
        epoch: int,
        state_json: str,
        processed: list[list[Any]],
        keep: int,
        outbox: list[list[Any]] | None = None,
    ) -> int:
        write = encode_checkpoint(CheckpointWrite(name, epoch, state_json, processed, keep, outbox))

        def step() -> int:
            with self._transaction() as connection:
                return self._insert_checkpoint(connection, write)

        return self._retry("write_checkpoint", step)

    def write_encoded_checkpoints(
        self, writes: list[EncodedCheckpoint]
    ) -> list[int | CheckpointConflict]:
        """Write many agents' checkpoints with one statement, which is its own transaction.

        The statement locks the agents' rows in name order, so two batches cannot deadlock,
        and leaves out each write whose epoch is not the agent's current one.
        """
        if len({write.name for write in writes}) < len(writes):
            # Each agent at most once per statement; a batch with repeats goes one by one.
            return [self._write_or_conflict(write) for write in writes]
        return self._retry("write_checkpoints", lambda: self._batches.write(writes))

    def _write_or_conflict(self, write: EncodedCheckpoint) -> int | CheckpointConflict:
        def step() -> int:
            with self._transaction() as connection:
                return self._insert_checkpoint(connection, write)

        try:
            return self._retry("write_checkpoint", step)
        except CheckpointConflict as conflict:
            return conflict

    def _insert_checkpoint(
        self, connection: psycopg.Connection[TupleRow], write: EncodedCheckpoint
    ) -> int:
        # The row lock orders this write after any concurrent begin_incarnation, so the
        # epoch compared here is the newest one.
        name, epoch = write.name, write.epoch
        row = connection.execute(
            "SELECT epoch, checkpoint_version FROM arbor_agents WHERE name = %s FOR UPDATE",
            (name,),
        ).fetchone()
        if row is None or int(row[0]) != epoch:
            raise CheckpointConflict(name, epoch, int(row[0]) if row else None)
        version = int(row[1]) + 1
        connection.execute(
            "INSERT INTO arbor_checkpoints (agent, version, epoch, state, processed, "
            "outbox, created_at) "
            "VALUES (%s, %s, %s, %s::jsonb, %s::jsonb, %s::jsonb, now())",
            (name, version, epoch, write.state_json, write.processed_json, write.outbox_json),
        )
        connection.execute(
            "UPDATE arbor_agents SET checkpoint_version = %s, checkpointed_at = now(), "
            "updated_at = now() WHERE name = %s",
            (version, name),
        )
        connection.execute(
            "DELETE FROM arbor_checkpoints WHERE agent = %s AND version <= %s",
            (name, version - write.keep),
        )
        return version

    def load_checkpoint(self, name: str, version: int | None = None) -> Checkpoint | None:
        def step() -> Checkpoint | None:
            columns = "agent, version, epoch, state, processed, created_at, outbox"
            with self._pool.connection() as connection:
                if version is None:
                    row = connection.execute(
                        f"SELECT {columns} FROM arbor_checkpoints WHERE agent = %s "
                        "ORDER BY version DESC LIMIT 1",
                        (name,),
                    ).fetchone()
                else:
                    row = connection.execute(
                        f"SELECT {columns} FROM arbor_checkpoints WHERE agent = %s "
                        "AND version = %s",
                        (name, version),
                    ).fetchone()
            if row is None:
                return None
            return Checkpoint(
                agent=row[0],
                version=int(row[1]),
                epoch=int(row[2]),
                state=row[3],
                processed=row[4],
                created_at=row[5],
                outbox=row[6],
            )

        return self._retry("load_checkpoint", step)

    def list_checkpoints(self, name: str) -> list[CheckpointInfo]:
        def step() -> list[CheckpointInfo]:
            with self._pool.connection() as connection:
                rows = connection.execute(
                    "SELECT version, epoch, created_at FROM arbor_checkpoints WHERE agent = %s "
                    "ORDER BY version DESC",
                    (name,),
                ).fetchall()
            return [CheckpointInfo(int(r[0]), int(r[1]), r[2]) for r in rows]

        return self._retry("list_checkpoints", step)

    def delete_agent(self, name: str) -> bool:
        def step() -> bool:
            with self._transaction() as connection:
                connection.execute("DELETE FROM arbor_checkpoints WHERE agent = %s", (name,))
                cursor = connection.execute("DELETE FROM arbor_agents WHERE name = %s", (name,))
                return bool(cursor.rowcount > 0)

        return self._retry("delete_agent", step)

    def append_audit(self, entry: AuditEntry) -> AuditEntry:
        def step() -> AuditEntry:
            with self._transaction() as connection:
                return self._append_audit(connection, entry)

        # NOTE: when the connection drops after the server committed but before the client
        # saw the commit, the retry appends the entry a second time, as the next row. The
        # chain stays valid, but the entry appears twice.
        return self._retry("append_audit", step)

    def _append_audit(
        self, connection: psycopg.Connection[TupleRow], entry: AuditEntry
    ) -> AuditEntry:
        return self._append_audit_after(connection, entry, self._audit_head(connection).fetchone())

    def _audit_head(self, connection: psycopg.Connection[TupleRow]) -> psycopg.Cursor[TupleRow]:
        """Lock the audit chain until commit, and return the cursor that reads its head.

        Each statement after the lock reads the newest committed head, so no two appends
        link to the same predecessor.
        """
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (AUDIT_LOCK_KEY,))
        return connection.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")

    def _append_audit_after(
        self,
        connection: psycopg.Connection[TupleRow],
        entry: AuditEntry,
        head: tuple[Any, ...] | None,
    ) -> AuditEntry:
        """Append ``entry`` after ``head``, which `_audit_head` read under its lock."""
        seq, prev_hash = (int(head[0]) + 1, head[1]) if head else (1, GENESIS_HASH)
        row = seal_row(entry, seq, prev_hash)
        connection.execute(
            "INSERT INTO audit_log (seq, at, principal, action, resource, decision, "
            "detail, trace_id, prev_hash, hash) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s::json, %s, %s, %s)",
            tuple(row),
        )
        return row.to_entry()

    def list_audit(
        self,
        principal: str | None = None,
        action: str | None = None,
        resource_prefix: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        decision: str | None = None,
        limit: int = 100,
        after_seq: int | None = None,
    ) -> list[AuditEntry]:
        check_query(decision, since, until, limit, after_seq)
        conditions: list[str] = []
        params: list[Any] = []
        for condition, value in (
            ("principal = %s", principal),
            ("action = %s", action),
            ("decision = %s", decision),
            ("seq > %s", after_seq),
            ("at >= %s", since),
            ("at < %s", until),
            ("starts_with(resource, %s)", resource_prefix or None),
        ):
            if value is not None:
                conditions.append(condition)
                params.append(value)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        query = f"SELECT {_AUDIT_COLUMNS} FROM audit_log{where} ORDER BY seq LIMIT %s"

        def step() -> list[AuditEntry]:
            with self._pool.connection() as connection:
                rows = connection.execute(query.encode(), (*params, limit)).fetchall()
            return [AuditRow(*row).to_entry() for row in rows]

        return self._retry("list_audit", step)

    def verify_audit(self) -> AuditVerification:
        def read_batch(after_seq: int) -> list[AuditRow]:
            def step() -> list[AuditRow]:
                with self._pool.connection() as connection:
                    rows = connection.execute(
                        f"SELECT {_AUDIT_COLUMNS} FROM audit_log WHERE seq > %s "
                        "ORDER BY seq LIMIT %s",
                        (after_seq, VERIFY_BATCH_ROWS),
                    ).fetchall()
                return [AuditRow(*row) for row in rows]

            return self._retry("verify_audit", step)

        return verify_chain(read_batch)

    def close(self) -> None:
        self._batches.close()
        self._pool.close()


class IdleCheck:
    """The pool's connection check, skipped for a connection used in the last ``idle_s``."""

    def __init__(self, idle_s: float) -> None:
        self._idle_s = idle_s
        self._returned: weakref.WeakKeyDictionary[psycopg.Connection[Any], float] = (
            weakref.WeakKeyDictionary()
        )
        # Until this time every connection is checked, after an error on one of them.
        self._check_all_until = 0.0

    def returned(self, connection: psycopg.Connection[Any]) -> None:
        self._returned[connection] = time.monotonic()

    def check_all(self) -> None:
        """Check every connection taken from the pool in the next ``idle_s``."""
        self._check_all_until = time.monotonic() + self._idle_s

    def check(self, connection: psycopg.Connection[Any]) -> None:
        now = time.monotonic()
        returned = self._returned.get(connection)
        if returned is None or now - returned > self._idle_s or now < self._check_all_until:
            ConnectionPool.check_connection(connection)


def _insert_first_checkpoint(
    connection: psycopg.Connection[Any], name: str, epoch: int, state_json: str
) -> None:
    connection.execute(
        "INSERT INTO arbor_checkpoints (agent, version, epoch, state, processed, outbox, "
        "created_at) VALUES (%s, 1, %s, %s::jsonb, '[]'::jsonb, '[]'::jsonb, now())",
        (name, epoch, state_json),
    )


def _insert_agent(connection: psycopg.Connection[Any], record: AgentRecord) -> Any:
    """Insert ``record`` unless its name exists; returns the new row, or None."""
    return connection.execute(
        "INSERT INTO arbor_agents (name, type_path, status, spawn_id, options, "
        "created_at, updated_at) VALUES (%s, %s, %s, %s, %s, now(), now()) "
        f"ON CONFLICT (name) DO NOTHING RETURNING {_AGENT_COLUMNS}",
        (record.name, record.type_path, record.status, record.spawn_id, Jsonb(record.options)),
    ).fetchone()


def _created(cursor: psycopg.Cursor[TupleRow], cluster_id: str | None) -> AgentRecord | None:
    """Read the row of `PostgresStore._create_first`: the new record, or None for a taken name.

    Raises:
        ClusterLeaseLost: another cluster has the lease, so nothing was written.
    """
    row = cursor.fetchone()
    assert row is not None
    holder, *agent = row
    if cluster_id is not None and holder not in (None, cluster_id):
        raise ClusterLeaseLost(cluster_id, holder)
    return None if agent[0] is None else _record(tuple(agent))


def _record(row: tuple[Any, ...]) -> AgentRecord:
    return AgentRecord(
        name=row[0],
        type_path=row[1],
        status=row[2],
        spawn_id=row[3],
        options=row[4],
        node_id=row[5],
        epoch=int(row[6]),
        checkpoint_version=int(row[7]),
        last_error=row[8],
        created_at=row[9],
        updated_at=row[10],
        started_at=row[11],
        checkpointed_at=row[12],
    )
