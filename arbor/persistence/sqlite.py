"""The embedded SQLite checkpoint store, the default for a single machine."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from arbor.errors import AgentNotFound, CheckpointConflict, NameTaken
from arbor.persistence.audit import (
    GENESIS_HASH,
    VERIFY_BATCH_ROWS,
    AuditEntry,
    AuditRow,
    AuditVerification,
    check_query,
    from_microseconds,
    seal_row,
    to_microseconds,
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
from arbor.persistence.reminders import ReminderTables
from arbor.persistence.topics import TopicTables

# Milliseconds a writer waits for another process's write lock before SQLite reports
# "database is locked"; many agent processes share one file, each holding it briefly.
BUSY_TIMEOUT_MS = 30_000

_AGENT_COLUMNS = (
    "name, type_path, status, spawn_id, options, node_id, epoch, checkpoint_version, "
    "last_error, created_at, updated_at, started_at, checkpointed_at"
)

_AUDIT_COLUMNS = "seq, at, principal, action, resource, decision, detail, trace_id, prev_hash, hash"


class SQLiteStore(
    CheckpointStore, CapabilityTables, GatewayTables, LeaseTables, ReminderTables, TopicTables
):
    """Checkpoint store in one SQLite file, shared by every process on the machine.

    WAL journaling lets readers run beside the single writer, and ``synchronous=FULL``
    makes each commit survive a power cut, not only a process crash.
    """

    dialect = "sqlite"

    def __init__(self, url: str, path: str, retry_attempts: int, retry_backoff_s: float) -> None:
        super().__init__(url, retry_attempts, retry_backoff_s)
        self.path = path
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._lock = threading.Lock()
        self._connection = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
        )
        self._connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._connection.execute("PRAGMA journal_mode = WAL")
        self._connection.execute("PRAGMA synchronous = FULL")
        self._connection.execute("PRAGMA foreign_keys = ON")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front, so two processes never both read
        # an epoch and then race to write.
        with self._lock:
            connection = self._connection
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def _is_transient(self, error: BaseException) -> bool:
        if not isinstance(error, sqlite3.OperationalError):
            return False
        text = str(error).lower()
        return "locked" in text or "busy" in text

    def migrate(self) -> list[int]:
        def step() -> list[int]:
            with self._transaction() as connection:
                connection.execute(
                    "CREATE TABLE IF NOT EXISTS arbor_schema_migrations "
                    "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
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
                        connection.execute(statement)
                    connection.execute(
                        "INSERT INTO arbor_schema_migrations VALUES (?, ?)", (version, time.time())
                    )
                    applied.append(version)
                return applied

        return self._retry("migrate", step)

    def create_agent(self, record: AgentRecord) -> AgentRecord:
        def step() -> AgentRecord:
            now = time.time()
            with self._transaction() as connection:
                row = connection.execute(
                    f"SELECT {_AGENT_COLUMNS} FROM arbor_agents WHERE name = ?", (record.name,)
                ).fetchone()
                if row is not None:
                    existing = _record(row)
                    if existing.spawn_id == record.spawn_id:
                        return existing
                    raise NameTaken(record.name, existing.status)
                connection.execute(
                    "INSERT INTO arbor_agents (name, type_path, status, spawn_id, options, "
                    "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.name,
                        record.type_path,
                        record.status,
                        record.spawn_id,
                        json.dumps(record.options),
                        now,
                        now,
                    ),
                )
                row = connection.execute(
                    f"SELECT {_AGENT_COLUMNS} FROM arbor_agents WHERE name = ?", (record.name,)
                ).fetchone()
                return _record(row)

        return self._retry("create_agent", step)

    def create_agent_audited(
        self, record: AgentRecord, entry: AuditEntry
    ) -> tuple[AgentRecord, AuditEntry | None]:
        def step() -> tuple[AgentRecord, AuditEntry | None]:
            now = time.time()
            with self._transaction() as connection:
                row = connection.execute(
                    "INSERT INTO arbor_agents (name, type_path, status, spawn_id, options, "
                    "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                    f"ON CONFLICT (name) DO NOTHING RETURNING {_AGENT_COLUMNS}",
                    (
                        record.name,
                        record.type_path,
                        record.status,
                        record.spawn_id,
                        json.dumps(record.options),
                        now,
                        now,
                    ),
                ).fetchone()
                if row is not None:
                    return _record(row), self._append_audit(connection, entry)
                # BEGIN IMMEDIATE holds the write lock, so the row that blocked the insert
                # is still there.
                row = connection.execute(
                    f"SELECT {_AGENT_COLUMNS} FROM arbor_agents WHERE name = ?", (record.name,)
                ).fetchone()
            existing = _record(row)
            if existing.spawn_id == record.spawn_id:
                return existing, None
            raise NameTaken(record.name, existing.status)

        return self._retry("create_agent_audited", step)

    def get_agent(self, name: str) -> AgentRecord | None:
        def step() -> AgentRecord | None:
            with self._lock:
                row = self._connection.execute(
                    f"SELECT {_AGENT_COLUMNS} FROM arbor_agents WHERE name = ?", (name,)
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
            with self._lock:
                rows = self._connection.execute(query, parameters).fetchall()
            return [_record(row) for row in rows]

        return self._retry("list_agents", step)

    def set_status(self, name: str, status: str, last_error: str | None = None) -> None:
        def step() -> None:
            with self._transaction() as connection:
                connection.execute(
                    "UPDATE arbor_agents SET status = ?, last_error = COALESCE(?, last_error), "
                    "updated_at = ? WHERE name = ?",
                    (status, last_error, time.time(), name),
                )

        self._retry("set_status", step)

    def update_options(self, name: str, options: dict[str, Any]) -> None:
        def step() -> None:
            with self._transaction() as connection:
                connection.execute(
                    "UPDATE arbor_agents SET options = ?, updated_at = ? WHERE name = ?",
                    (json.dumps(options), time.time(), name),
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
            now = time.time()
            with self._transaction() as connection:
                self.check_cluster_lease(connection, cluster_id)
                row = connection.execute(
                    "UPDATE arbor_agents SET epoch = epoch + 1, "
                    "status = CASE WHEN ? THEN status ELSE ? END, node_id = ?, "
                    "started_at = ?, updated_at = ? "
                    "WHERE name = ? AND (? OR status <> 'stopped') RETURNING epoch",
                    (stopping, RUNNING, node_id, now, now, name, stopping),
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
            now = time.time()
            with self._transaction() as connection:
                self.check_cluster_lease(connection, cluster_id)
                row = connection.execute(
                    "UPDATE arbor_agents SET epoch = epoch + 1, status = ?, node_id = ?, "
                    "checkpoint_version = 1, started_at = ?, checkpointed_at = ?, "
                    "updated_at = ? WHERE name = ? AND epoch = ? "
                    "AND checkpoint_version = 0 AND status <> 'stopped' "
                    f"RETURNING {_AGENT_COLUMNS}",
                    (RUNNING, node_id, now, now, now, name, epoch),
                ).fetchone()
                if row is None:
                    return None
                _insert_first_checkpoint(connection, name, row[6], state_json, now)
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
            now = time.time()
            with self._transaction() as connection:
                self.check_cluster_lease(connection, cluster_id)
                row = connection.execute(
                    "INSERT INTO arbor_agents (name, type_path, status, spawn_id, options, "
                    "node_id, epoch, checkpoint_version, created_at, updated_at, started_at, "
                    "checkpointed_at) VALUES (?, ?, ?, ?, ?, ?, 1, 1, ?, ?, ?, ?) "
                    f"ON CONFLICT (name) DO NOTHING RETURNING {_AGENT_COLUMNS}",
                    (
                        record.name,
                        record.type_path,
                        RUNNING,
                        record.spawn_id,
                        json.dumps(record.options),
                        node_id,
                        now,
                        now,
                        now,
                        now,
                    ),
                ).fetchone()
                if row is None:
                    return None
                self._append_audit(connection, entry)
                _insert_first_checkpoint(connection, record.name, 1, state_json, now)
            return _record(row)

        return self._retry("create_first_incarnation", step)

    def fence(self, name: str) -> int:
        def step() -> int:
            with self._transaction() as connection:
                row = connection.execute(
                    "UPDATE arbor_agents SET epoch = epoch + 1, updated_at = ? WHERE name = ? "
                    "RETURNING epoch",
                    (time.time(), name),
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
        """Write many agents' checkpoints in one transaction.

        A conflict is found before the agent's first statement, so it leaves nothing to
        undo and the other agents' writes go on.
        """

        def step() -> list[int | CheckpointConflict]:
            results: list[int | CheckpointConflict] = []
            with self._transaction() as connection:
                for write in writes:
                    try:
                        results.append(self._insert_checkpoint(connection, write))
                    except CheckpointConflict as conflict:
                        results.append(conflict)
            return results

        return self._retry("write_checkpoints", step)

    def _insert_checkpoint(self, connection: sqlite3.Connection, write: EncodedCheckpoint) -> int:
        name, epoch, now = write.name, write.epoch, time.time()
        row = connection.execute(
            "SELECT epoch, checkpoint_version FROM arbor_agents WHERE name = ?", (name,)
        ).fetchone()
        if row is None or int(row[0]) != epoch:
            raise CheckpointConflict(name, epoch, int(row[0]) if row else None)
        version = int(row[1]) + 1
        connection.execute(
            "INSERT INTO arbor_checkpoints (agent, version, epoch, state, processed, "
            "created_at, outbox) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                name,
                version,
                epoch,
                write.state_json,
                write.processed_json,
                now,
                write.outbox_json,
            ),
        )
        connection.execute(
            "UPDATE arbor_agents SET checkpoint_version = ?, checkpointed_at = ?, "
            "updated_at = ? WHERE name = ?",
            (version, now, now, name),
        )
        connection.execute(
            "DELETE FROM arbor_checkpoints WHERE agent = ? AND version <= ?",
            (name, version - write.keep),
        )
        return version

    def load_checkpoint(self, name: str, version: int | None = None) -> Checkpoint | None:
        def step() -> Checkpoint | None:
            query = (
                "SELECT agent, version, epoch, state, processed, created_at, outbox "
                "FROM arbor_checkpoints WHERE agent = ?"
            )
            params: tuple[Any, ...] = (name,)
            if version is None:
                query += " ORDER BY version DESC LIMIT 1"
            else:
                query += " AND version = ?"
                params = (name, version)
            with self._lock:
                row = self._connection.execute(query, params).fetchone()
            if row is None:
                return None
            return Checkpoint(
                agent=row[0],
                version=int(row[1]),
                epoch=int(row[2]),
                state=json.loads(row[3]),
                processed=json.loads(row[4]),
                created_at=_time(row[5]),
                outbox=json.loads(row[6]),
            )

        return self._retry("load_checkpoint", step)

    def list_checkpoints(self, name: str) -> list[CheckpointInfo]:
        def step() -> list[CheckpointInfo]:
            with self._lock:
                rows = self._connection.execute(
                    "SELECT version, epoch, created_at FROM arbor_checkpoints WHERE agent = ? "
                    "ORDER BY version DESC",
                    (name,),
                ).fetchall()
            return [CheckpointInfo(int(r[0]), int(r[1]), _time(r[2])) for r in rows]

        return self._retry("list_checkpoints", step)

    def delete_agent(self, name: str) -> bool:
        def step() -> bool:
            with self._transaction() as connection:
                connection.execute("DELETE FROM arbor_checkpoints WHERE agent = ?", (name,))
                cursor = connection.execute("DELETE FROM arbor_agents WHERE name = ?", (name,))
                return cursor.rowcount > 0

        return self._retry("delete_agent", step)

    def append_audit(self, entry: AuditEntry) -> AuditEntry:
        def step() -> AuditEntry:
            with self._transaction() as connection:
                return self._append_audit(connection, entry)

        return self._retry("append_audit", step)

    def _append_audit(self, connection: sqlite3.Connection, entry: AuditEntry) -> AuditEntry:
        # BEGIN IMMEDIATE holds the file's write lock from reading the chain head to the
        # commit, so two processes never link a row to the same predecessor.
        head = connection.execute(
            "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        seq, prev_hash = (int(head[0]) + 1, head[1]) if head else (1, GENESIS_HASH)
        row = seal_row(entry, seq, prev_hash)
        connection.execute(
            f"INSERT INTO audit_log ({_AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.seq, to_microseconds(row.at), *row[2:]),
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
            ("principal = ?", principal),
            ("action = ?", action),
            ("decision = ?", decision),
            ("seq > ?", after_seq),
            ("at >= ?", to_microseconds(since) if since else None),
            ("at < ?", to_microseconds(until) if until else None),
        ):
            if value is not None:
                conditions.append(condition)
                params.append(value)
        if resource_prefix:
            # substr counts characters, so a prefix never matches half of a character.
            conditions.append("substr(resource, 1, ?) = ?")
            params += [len(resource_prefix), resource_prefix]
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        query = f"SELECT {_AUDIT_COLUMNS} FROM audit_log{where} ORDER BY seq LIMIT ?"

        def step() -> list[AuditEntry]:
            with self._lock:
                rows = self._connection.execute(query, (*params, limit)).fetchall()
            return [_audit_row(row).to_entry() for row in rows]

        return self._retry("list_audit", step)

    def verify_audit(self) -> AuditVerification:
        def read_batch(after_seq: int) -> list[AuditRow]:
            def step() -> list[AuditRow]:
                with self._lock:
                    rows = self._connection.execute(
                        f"SELECT {_AUDIT_COLUMNS} FROM audit_log WHERE seq > ? "
                        "ORDER BY seq LIMIT ?",
                        (after_seq, VERIFY_BATCH_ROWS),
                    ).fetchall()
                return [_audit_row(row) for row in rows]

            return self._retry("verify_audit", step)

        return verify_chain(read_batch)

    def close(self) -> None:
        with self._lock:
            self._connection.close()


def _audit_row(row: tuple[Any, ...]) -> AuditRow:
    return AuditRow(int(row[0]), from_microseconds(int(row[1])), *row[2:])


def _time(value: float | None) -> datetime:
    return datetime.fromtimestamp(value or 0.0, tz=timezone.utc)


def _insert_first_checkpoint(
    connection: sqlite3.Connection, name: str, epoch: int, state_json: str, now: float
) -> None:
    connection.execute(
        "INSERT INTO arbor_checkpoints (agent, version, epoch, state, processed, created_at, "
        "outbox) VALUES (?, 1, ?, ?, '[]', ?, '[]')",
        (name, epoch, state_json, now),
    )


def _record(row: tuple[Any, ...]) -> AgentRecord:
    return AgentRecord(
        name=row[0],
        type_path=row[1],
        status=row[2],
        spawn_id=row[3],
        options=json.loads(row[4]),
        node_id=row[5],
        epoch=int(row[6]),
        checkpoint_version=int(row[7]),
        last_error=row[8],
        created_at=_time(row[9]),
        updated_at=_time(row[10]),
        started_at=_time(row[11]) if row[11] is not None else None,
        checkpointed_at=_time(row[12]) if row[12] is not None else None,
    )
