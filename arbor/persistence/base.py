"""The checkpoint store interface shared by the PostgreSQL and SQLite implementations."""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any, NamedTuple, TypeVar

from arbor.errors import CheckpointConflict, StoreUnavailable
from arbor.persistence.audit import AuditEntry, AuditVerification

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Agent statuses kept in the store. "running" means Arbor wants the agent up; the
# reconciler recreates a running agent whose Ray actor is gone.
STARTING = "starting"
RUNNING = "running"
STOPPED = "stopped"
FAILED = "failed"

# Delays between retries never exceed this, in seconds, so a long outage is still probed
# often enough to resume soon after the database comes back.
MAX_BACKOFF_S = 5.0


class CheckpointWrite(NamedTuple):
    """The arguments of one `CheckpointStore.write_checkpoint`, for a batch of them."""

    name: str
    epoch: int
    state_json: str
    processed: list[list[Any]]
    keep: int
    outbox: list[list[Any]] | None = None


class EncodedCheckpoint(NamedTuple):
    """One checkpoint write with its processed-message list and outbox already in JSON."""

    name: str
    epoch: int
    state_json: str
    processed_json: str
    outbox_json: str
    keep: int


# json.dumps with separators builds an encoder on every call; this one is built once.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


def encode_checkpoint(write: CheckpointWrite) -> EncodedCheckpoint:
    """Return ``write`` with its processed-message list and outbox encoded as JSON text."""
    return EncodedCheckpoint(
        write.name,
        write.epoch,
        write.state_json,
        _COMPACT_JSON.encode(write.processed),
        _COMPACT_JSON.encode(write.outbox or []),
        write.keep,
    )


@dataclass
class AgentRecord:
    """One agent as the store keeps it."""

    name: str
    type_path: str
    status: str
    spawn_id: str
    options: dict[str, Any] = field(default_factory=dict)
    node_id: str | None = None
    epoch: int = 0
    checkpoint_version: int = 0
    last_error: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    checkpointed_at: datetime | None = None


@dataclass
class Checkpoint:
    """One committed checkpoint of an agent."""

    agent: str
    version: int
    epoch: int
    state: Any
    processed: list[list[Any]]
    created_at: datetime
    outbox: list[list[Any]] = field(default_factory=list)


@dataclass
class CheckpointInfo:
    """A checkpoint's version and origin, without its state."""

    version: int
    epoch: int
    created_at: datetime


class CheckpointStore(ABC):
    """Durable storage for agent records, epochs and checkpoints.

    Every method retries transient database errors with exponential backoff and raises
    `StoreUnavailable` once the attempts are spent; other errors propagate at once.
    """

    dialect: str = ""

    def __init__(self, url: str, retry_attempts: int, retry_backoff_s: float) -> None:
        self.url = url
        self.retry_attempts = retry_attempts
        self.retry_backoff_s = retry_backoff_s

    @abstractmethod
    def migrate(self) -> list[int]:
        """Apply pending schema migrations; returns the versions applied."""

    @abstractmethod
    def create_agent(self, record: AgentRecord) -> AgentRecord:
        """Insert ``record``; a retry with the same ``spawn_id`` returns the stored row.

        Raises:
            NameTaken: another spawn already has the name.
        """

    @abstractmethod
    def create_agent_audited(
        self, record: AgentRecord, entry: AuditEntry
    ) -> tuple[AgentRecord, AuditEntry | None]:
        """Insert ``record`` and append ``entry`` to the audit log in one transaction.

        A retry with the same ``spawn_id`` returns the stored row and appends nothing.

        Returns:
            The stored record, and the appended entry (None for a retry).

        Raises:
            NameTaken: another spawn already has the name.
            InvalidAuditEntry: a field of ``entry`` is invalid; nothing is written.
        """

    @abstractmethod
    def get_agent(self, name: str) -> AgentRecord | None:
        """Return the agent's record, or None."""

    @abstractmethod
    def list_agents(
        self,
        status: str | None = None,
        namespace: str | None = None,
        *,
        prefix: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[AgentRecord]:
        """Return the records that match every given filter, ordered by name.

        Args:
            status: only records with this status.
            namespace: only records of this namespace (the indexed ``namespace`` column
                the database derives from the name); None for every namespace.
            prefix: only records whose full name starts with this text.
            after: only records whose name sorts after this one, in the database's
                order; pass the last name of a page to read the next.
            limit: at most this many records.
        """

    @abstractmethod
    def set_status(self, name: str, status: str, last_error: str | None = None) -> None:
        """Set the agent's status and, when given, its last error."""

    @abstractmethod
    def update_options(self, name: str, options: dict[str, Any]) -> None:
        """Replace the agent's stored spawn options."""

    def count_agents(self, statuses: tuple[str, ...], namespace: str | None = None) -> int:
        """Return how many agents have one of ``statuses``, in ``namespace`` unless None."""
        mark = "%s" if self.dialect == "postgresql" else "?"
        marks = ", ".join(mark for _ in statuses)
        sql = f"SELECT count(*) FROM arbor_agents WHERE status IN ({marks})"
        parameters: tuple[str, ...] = statuses
        if namespace is not None:
            sql += f" AND namespace = {mark}"
            parameters += (namespace,)

        def step() -> int:
            with self._transaction() as connection:  # type: ignore[attr-defined]
                return int(connection.execute(sql, parameters).fetchone()[0])

        result: int = self._retry("count_agents", step)
        return result

    @abstractmethod
    def begin_incarnation(
        self,
        name: str,
        node_id: str | None,
        cluster_id: str | None = None,
        stopping: bool = False,
    ) -> int:
        """Take the next epoch for a starting incarnation and mark the agent running.

        Args:
            cluster_id: the Ray cluster the incarnation runs in; None skips the lease check.
            stopping: the incarnation starts only to run ``on_stop`` of an agent that is
                being stopped, such as a passivated hosted agent. It takes the epoch of a
                stopped agent too, and leaves the status as it is.

        Raises:
            AgentNotFound: no record has this name, or the agent is stopped and
                ``stopping`` is False. The check keeps an actor recreated during a stop
                from bringing the agent back.
            ClusterLeaseLost: another cluster holds the cluster lease.
        """

    @abstractmethod
    def begin_first_incarnation(
        self,
        name: str,
        epoch: int,
        node_id: str | None,
        cluster_id: str | None,
        state_json: str,
    ) -> AgentRecord | None:
        """Take the next epoch and commit checkpoint version 1 in one transaction.

        A spawn uses this in place of `begin_incarnation` followed by `write_checkpoint`,
        which commit twice. It applies only while the agent still has epoch ``epoch``, no
        checkpoint and a status other than stopped. A matching epoch means that no other
        incarnation began since the caller read it.

        Returns:
            The record as the transaction left it, or None when those conditions no longer
            hold and nothing was written; the caller then starts the agent with
            `begin_incarnation`.

        Raises:
            ClusterLeaseLost: another cluster holds the cluster lease.
        """

    @abstractmethod
    def create_first_incarnation(
        self,
        record: AgentRecord,
        entry: AuditEntry,
        node_id: str | None,
        cluster_id: str | None,
        state_json: str,
    ) -> AgentRecord | None:
        """Store a new agent running its first epoch, with checkpoint version 1, in one commit.

        The transaction inserts ``record`` as running with epoch 1, appends ``entry`` to
        the audit log and writes ``state_json`` as the first checkpoint. A spawn into a
        ready actor uses it in place of `create_agent_audited` followed by
        `begin_first_incarnation`, which commit twice.

        Returns:
            The stored record, or None when an agent of that name exists (a retried spawn
            included); nothing is written then.

        Raises:
            ClusterLeaseLost: another cluster holds the cluster lease.
            InvalidAuditEntry: a field of ``entry`` is invalid; nothing is written.
        """

    def rehearse_first_incarnation(self, cluster_id: str | None) -> None:
        """Run the statements of `create_first_incarnation` once and roll them back.

        A process that will soon start an agent calls this ahead of time, so that the
        store's first real commit does not also pay for what a new database session
        loads on first use. Stores with nothing to load do nothing.

        Raises:
            ClusterLeaseLost: another cluster holds the cluster lease.
        """
        return None

    @abstractmethod
    def fence(self, name: str) -> int:
        """Take the next epoch without starting an incarnation, cutting off the current one."""

    @abstractmethod
    def write_checkpoint(
        self,
        name: str,
        epoch: int,
        state_json: str,
        processed: list[list[Any]],
        keep: int,
        outbox: list[list[Any]] | None = None,
    ) -> int:
        """Commit a checkpoint if ``epoch`` is current and prune all but ``keep`` versions.

        ``outbox`` lists the messages the agent sent that are not known to be delivered.

        Returns:
            The new version number.

        Raises:
            CheckpointConflict: a newer epoch exists, so the writer is a stale incarnation.
        """

    def write_checkpoints(self, writes: list[CheckpointWrite]) -> list[int | CheckpointConflict]:
        """Commit the checkpoints of many agents in one transaction, as in `write_checkpoint`.

        Returns:
            For each write, in order, the new version, or the `CheckpointConflict` of a
            stale incarnation, whose write is left out while the others commit.
        """
        return self.write_encoded_checkpoints([encode_checkpoint(write) for write in writes])

    @abstractmethod
    def write_encoded_checkpoints(
        self, writes: list[EncodedCheckpoint]
    ) -> list[int | CheckpointConflict]:
        """Commit already encoded checkpoints in one transaction, as `write_checkpoints` does.

        The group committer encodes each checkpoint in the thread that waits for it, so
        the committer thread spends its time on the database alone.
        """

    @abstractmethod
    def load_checkpoint(self, name: str, version: int | None = None) -> Checkpoint | None:
        """Return the latest checkpoint, or the given version; None if there is none."""

    @abstractmethod
    def list_checkpoints(self, name: str) -> list[CheckpointInfo]:
        """Return the kept checkpoints of an agent, newest first."""

    @abstractmethod
    def delete_agent(self, name: str) -> bool:
        """Delete the record and every checkpoint; returns whether a record existed."""

    @abstractmethod
    def append_audit(self, entry: AuditEntry) -> AuditEntry:
        """Append ``entry`` to the hash-chained audit log.

        Appends are serialised across threads and processes, so every row links to the one
        before it and the chain never forks.

        Returns:
            A copy of ``entry`` with the ``seq``, ``at``, ``prev_hash`` and ``hash`` the
            store assigned.

        Raises:
            InvalidAuditEntry: a field is missing or invalid; nothing is written.
            StoreUnavailable: the database stayed unreachable through every retry.
        """

    @abstractmethod
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
        """Return audit entries that match every given filter, oldest first.

        Args:
            principal: only entries by this principal.
            action: only entries with this action.
            resource_prefix: only entries whose resource starts with this text.
            since: only entries at or after this aware datetime.
            until: only entries before this aware datetime.
            decision: only ``"allowed"`` or only ``"denied"`` entries.
            limit: the maximum number of entries, from 1 to 10,000.
            after_seq: only entries with a higher seq; pass the last seq seen to page.

        Raises:
            InvalidAuditQuery: a filter is invalid.
        """

    @abstractmethod
    def verify_audit(self) -> AuditVerification:
        """Walk the audit chain from its first row and report the first bad row, if any."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""

    @abstractmethod
    def _is_transient(self, error: BaseException) -> bool:
        """Return whether ``error`` is worth retrying (connection lost, database busy)."""

    def _after_transient_error(self) -> None:
        """Prepare the next attempt after a transient error; stores with a pool override it."""
        return None

    def _retry(self, operation: str, step: Callable[[], T]) -> T:
        """Run ``step``, retrying transient errors with exponential backoff."""
        from arbor.config import redact_url

        delay = self.retry_backoff_s
        for attempt in range(1, self.retry_attempts + 1):
            try:
                return step()
            except Exception as error:
                if not self._is_transient(error):
                    raise
                if attempt == self.retry_attempts:
                    raise StoreUnavailable(
                        f"{operation} failed on {redact_url(self.url)} after {attempt} "
                        f"attempts: {type(error).__name__}: {_one_line(error)}; check that the "
                        "database is running and ARBOR_DATABASE_URL is right"
                    ) from error
                logger.warning(
                    "store %s failed on attempt %d/%d (%s: %s); retrying in %.2f s",
                    operation,
                    attempt,
                    self.retry_attempts,
                    type(error).__name__,
                    _one_line(error),
                    delay,
                )
                self._after_transient_error()
                time.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
        raise AssertionError("unreachable")


def agent_listing(
    dialect: str,
    status: str | None,
    namespace: str | None,
    prefix: str | None,
    after: str | None,
    limit: int | None,
) -> tuple[str, list[Any]]:
    """Return the WHERE, ORDER BY and LIMIT clauses of `CheckpointStore.list_agents`.

    A namespace is matched on the indexed ``namespace`` column, so the database reads
    only that namespace's rows, in name order, from the ``(namespace, name)`` index.
    """
    mark = "%s" if dialect == "postgresql" else "?"
    conditions: list[str] = []
    parameters: list[Any] = []
    for condition, value in (
        (f"namespace = {mark}", namespace),
        (f"status = {mark}", status),
        (f"name > {mark}", after),
    ):
        if value is not None:
            conditions.append(condition)
            parameters.append(value)
    if prefix:
        if dialect == "postgresql":
            conditions.append("starts_with(name, %s)")
            parameters.append(prefix)
        else:
            # substr counts characters, as len does.
            conditions.append("substr(name, 1, ?) = ?")
            parameters += [len(prefix), prefix]
    clauses = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    clauses += " ORDER BY name"
    if limit is not None:
        clauses += f" LIMIT {mark}"
        parameters.append(limit)
    return clauses, parameters


def migration_scripts(dialect: str) -> list[tuple[int, str]]:
    """Return ``(version, sql)`` for every migration shipped for ``dialect``, in order."""
    folder = resources.files("arbor.persistence").joinpath("migrations", dialect)
    scripts = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            scripts.append((version, entry.read_text(encoding="utf-8")))
    return sorted(scripts)


def split_statements(sql: str) -> list[str]:
    """Split a migration script on ``;`` at line ends; the scripts keep one statement per ``;``."""
    body = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    return [statement.strip() for statement in body.split(";") if statement.strip()]


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
