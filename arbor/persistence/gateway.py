"""Store tables of the HTTP gateway: API keys, asynchronous executions and their events.

The methods are shared by the SQLite and PostgreSQL stores, which mix this class in. JSON
values (parameters, results, event data) are stored as text in both databases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# Execution statuses; the last two are final.
PENDING = "pending"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
FINAL_STATUSES = frozenset({SUCCEEDED, FAILED})

_KEY_COLUMNS = "id, name, secret_hash, created_at, revoked_at"
_EXECUTION_COLUMNS = "id, command, principal, params, status, result, error, created_at, updated_at"


@dataclass(frozen=True)
class ApiKeyRecord:
    """One API key as the store keeps it.

    Attributes:
        id: the key id; the key acts as the principal ``key:<id>``.
        name: a label chosen at creation, for people.
        secret_hash: the salted scrypt hash of the secret, as `arbor.gateway.keys` encodes it.
        created_at: when the key was created.
        revoked_at: when it was revoked, or None while it is valid.
    """

    id: str
    name: str
    secret_hash: str
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def principal(self) -> str:
        """The principal name that capabilities are granted to."""
        return f"key:{self.id}"

    def __repr__(self) -> str:
        return f"ApiKeyRecord(id={self.id!r}, name={self.name!r}, revoked={self.revoked_at})"


@dataclass(frozen=True)
class ExecutionRecord:
    """One asynchronous command run.

    Attributes:
        id: the execution id returned by ``POST /v1/commands``.
        command: the registered command name.
        principal: who started it, such as ``key:ab12``.
        params: the command's parameters.
        status: ``pending``, ``running``, ``succeeded`` or ``failed``.
        result: the command's return value once it succeeded.
        error: why it failed, once it failed.
        created_at: when it was started.
        updated_at: when its status last changed.
    """

    id: str
    command: str
    principal: str
    params: dict[str, Any]
    status: str
    result: Any
    error: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ExecutionEvent:
    """One progress event of an execution; ``seq`` counts from 1 and is the SSE event id."""

    execution_id: str
    seq: int
    kind: str
    data: Any
    at: datetime


class GatewayTables:
    """API key and execution methods for a store with ``_transaction`` and ``_retry``."""

    dialect: str
    # Provided by the store class that mixes this in.
    _transaction: Any
    _retry: Any

    def create_api_key(self, record: ApiKeyRecord) -> None:
        """Insert a new API key."""

        def step() -> None:
            with self._transaction() as connection:
                connection.execute(
                    self._gw_sql(
                        f"INSERT INTO arbor_api_keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?)"
                    ),
                    (
                        record.id,
                        record.name,
                        record.secret_hash,
                        self._gw_time(record.created_at),
                        self._gw_time(record.revoked_at),
                    ),
                )

        self._retry("create_api_key", step)

    def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        """Return the API key with this id, revoked or not, or None."""

        def step() -> ApiKeyRecord | None:
            with self._transaction() as connection:
                row = connection.execute(
                    self._gw_sql(f"SELECT {_KEY_COLUMNS} FROM arbor_api_keys WHERE id = ?"),
                    (key_id,),
                ).fetchone()
            return self._key_record(row) if row else None

        result: ApiKeyRecord | None = self._retry("get_api_key", step)
        return result

    def list_api_keys(self, include_revoked: bool = False) -> list[ApiKeyRecord]:
        """Return the API keys, oldest first."""
        where = "" if include_revoked else " WHERE revoked_at IS NULL"

        def step() -> list[ApiKeyRecord]:
            with self._transaction() as connection:
                rows = connection.execute(
                    f"SELECT {_KEY_COLUMNS} FROM arbor_api_keys{where} ORDER BY created_at, id"
                ).fetchall()
            return [self._key_record(row) for row in rows]

        result: list[ApiKeyRecord] = self._retry("list_api_keys", step)
        return result

    def revoke_api_key(self, key_id: str) -> bool:
        """Mark a key revoked; returns False when no valid key has this id."""
        now = self._gw_time(datetime.now(UTC))

        def step() -> bool:
            with self._transaction() as connection:
                updated = connection.execute(
                    self._gw_sql(
                        "UPDATE arbor_api_keys SET revoked_at = ? "
                        "WHERE id = ? AND revoked_at IS NULL"
                    ),
                    (now, key_id),
                )
                return bool(updated.rowcount)

        result: bool = self._retry("revoke_api_key", step)
        return result

    def create_execution(self, record: ExecutionRecord) -> None:
        """Insert a new execution."""

        def step() -> None:
            with self._transaction() as connection:
                connection.execute(
                    self._gw_sql(
                        f"INSERT INTO arbor_executions ({_EXECUTION_COLUMNS}) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    ),
                    (
                        record.id,
                        record.command,
                        record.principal,
                        json.dumps(record.params),
                        record.status,
                        None if record.result is None else json.dumps(record.result),
                        record.error,
                        self._gw_time(record.created_at),
                        self._gw_time(record.updated_at),
                    ),
                )

        self._retry("create_execution", step)

    def get_execution(self, execution_id: str) -> ExecutionRecord | None:
        """Return the execution with this id, or None."""

        def step() -> ExecutionRecord | None:
            with self._transaction() as connection:
                row = connection.execute(
                    self._gw_sql(f"SELECT {_EXECUTION_COLUMNS} FROM arbor_executions WHERE id = ?"),
                    (execution_id,),
                ).fetchone()
            return self._execution_record(row) if row else None

        result: ExecutionRecord | None = self._retry("get_execution", step)
        return result

    def finish_execution(
        self, execution_id: str, status: str, result: Any = None, error: str | None = None
    ) -> None:
        """Set an execution's status, and its result or error once it is final."""
        encoded = None if result is None else json.dumps(result)
        now = self._gw_time(datetime.now(UTC))

        def step() -> None:
            with self._transaction() as connection:
                connection.execute(
                    self._gw_sql(
                        "UPDATE arbor_executions SET status = ?, result = ?, error = ?, "
                        "updated_at = ? WHERE id = ?"
                    ),
                    (status, encoded, error, now, execution_id),
                )

        self._retry("finish_execution", step)

    def append_execution_event(self, execution_id: str, kind: str, data: Any) -> int:
        """Append an event after the execution's last one; returns its seq.

        One execution has one writer (the actor that runs it), so the next seq is read
        and used in the same transaction without a race.
        """
        encoded = json.dumps(data)
        now = self._gw_time(datetime.now(UTC))

        def step() -> int:
            with self._transaction() as connection:
                row = connection.execute(
                    self._gw_sql(
                        "SELECT COALESCE(MAX(seq), 0) FROM arbor_execution_events "
                        "WHERE execution_id = ?"
                    ),
                    (execution_id,),
                ).fetchone()
                seq = int(row[0]) + 1
                connection.execute(
                    self._gw_sql(
                        "INSERT INTO arbor_execution_events (execution_id, seq, kind, data, at) "
                        "VALUES (?, ?, ?, ?, ?)"
                    ),
                    (execution_id, seq, kind, encoded, now),
                )
                return seq

        result: int = self._retry("append_execution_event", step)
        return result

    def list_execution_events(
        self, execution_id: str, after_seq: int = 0, limit: int = 1000
    ) -> list[ExecutionEvent]:
        """Return an execution's events with seq above ``after_seq``, in order."""

        def step() -> list[ExecutionEvent]:
            with self._transaction() as connection:
                rows = connection.execute(
                    self._gw_sql(
                        "SELECT execution_id, seq, kind, data, at FROM arbor_execution_events "
                        "WHERE execution_id = ? AND seq > ? ORDER BY seq LIMIT ?"
                    ),
                    (execution_id, after_seq, limit),
                ).fetchall()
            return [
                ExecutionEvent(
                    execution_id=row[0],
                    seq=int(row[1]),
                    kind=row[2],
                    data=json.loads(row[3]),
                    at=self._gw_read_time(row[4]),
                )
                for row in rows
            ]

        result: list[ExecutionEvent] = self._retry("list_execution_events", step)
        return result

    def _gw_sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.dialect == "postgresql" else text

    def _gw_time(self, value: datetime | None) -> Any:
        if value is None or self.dialect == "postgresql":
            return value
        return value.timestamp()

    def _gw_read_time(self, value: Any) -> datetime:
        if isinstance(value, datetime):
            return value
        return datetime.fromtimestamp(float(value), UTC)

    def _key_record(self, row: tuple[Any, ...]) -> ApiKeyRecord:
        return ApiKeyRecord(
            id=row[0],
            name=row[1],
            secret_hash=row[2],
            created_at=self._gw_read_time(row[3]),
            revoked_at=None if row[4] is None else self._gw_read_time(row[4]),
        )

    def _execution_record(self, row: tuple[Any, ...]) -> ExecutionRecord:
        return ExecutionRecord(
            id=row[0],
            command=row[1],
            principal=row[2],
            params=json.loads(row[3]),
            status=row[4],
            result=None if row[5] is None else json.loads(row[5]),
            error=row[6],
            created_at=self._gw_read_time(row[7]),
            updated_at=self._gw_read_time(row[8]),
        )
