"""The hash-chained audit log, the allow counter and `arbor audit`, on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

import arbor.persistence.postgres
import arbor.persistence.sqlite
from arbor.config import Settings
from arbor.errors import InvalidAuditEntry, InvalidAuditQuery, StoreUnavailable
from arbor.persistence import (
    ALLOWED,
    DENIED,
    AuditCounter,
    AuditEntry,
    CheckpointStore,
    open_store,
)
from arbor.persistence.audit import (
    ALLOW_COUNT,
    GENESIS_HASH,
    HASH_MISMATCH,
    MAX_TEXT_LENGTH,
    PREV_HASH_MISMATCH,
    SEQ_GAP,
    hash_parts,
    row_hash,
    seal_row,
)
from arbor.persistence.base import STARTING, AgentRecord

RETRY_ATTEMPTS = 4
RETRY_BACKOFF_S = 0.05
ARBOR_COMMAND = str(Path(sys.executable).parent / "arbor")
ROOT = Path(__file__).resolve().parent.parent


def store_settings(url: str, attempts: int = RETRY_ATTEMPTS) -> Settings:
    return Settings(
        database_url=url, db_retry_attempts=attempts, db_retry_backoff_s=RETRY_BACKOFF_S
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The URL of an empty database of each dialect."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def store(store_url: str) -> Iterator[CheckpointStore]:
    opened = open_store(store_url, store_settings(store_url))
    yield opened
    opened.close()


def entry(
    principal: str = "agent:planner",
    action: str = "grant",
    resource: str = "arbor://agent/send/workers/*",
    decision: str = ALLOWED,
    detail: dict[str, Any] | None = None,
    trace_id: str | None = None,
) -> AuditEntry:
    return AuditEntry(principal, action, resource, decision, detail or {}, trace_id)


def append_many(store: CheckpointStore, count: int) -> list[AuditEntry]:
    return [store.append_audit(entry(detail={"n": n})) for n in range(count)]


def execute_raw(url: str, statement: str, params: tuple[Any, ...] = ()) -> None:
    """Run one SQL statement outside Arbor, as someone tampering with the table would.

    ``statement`` uses ``?`` placeholders, rewritten to ``%s`` for PostgreSQL.
    """
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url[len("sqlite:///") :]) as connection:
            connection.execute(statement, params)
        return
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(statement.replace("?", "%s").encode(), params)


def expected_hash(stored: AuditEntry) -> str:
    """Compute a row's hash from the documented format, independently of the store."""
    assert stored.at is not None
    document = {
        "seq": stored.seq,
        "at": stored.at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "principal": stored.principal,
        "action": stored.action,
        "resource": stored.resource,
        "decision": stored.decision,
        "detail": json.dumps(stored.detail, sort_keys=True, separators=(",", ":")),
        "trace_id": stored.trace_id,
        "prev_hash": stored.prev_hash,
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# Appending


def test_first_row_links_to_genesis(store: CheckpointStore) -> None:
    first = store.append_audit(entry())

    assert first.seq == 1
    assert first.prev_hash == GENESIS_HASH
    assert first.hash == expected_hash(first)


def test_each_row_links_to_previous(store: CheckpointStore) -> None:
    appended = append_many(store, 6)

    assert [row.seq for row in appended] == [1, 2, 3, 4, 5, 6]
    for previous, row in zip(appended, appended[1:], strict=False):
        assert row.prev_hash == previous.hash
    for row in appended:
        assert row.hash == expected_hash(row)


# Texts that look like the keys the hash's document is split at, with quotes, backslashes
# and characters outside ASCII.
EDGE_CASE_TEXTS = [
    ',"prev_hash":"',
    ',"prev_hash":""',
    ',"seq":0,',
    '\\","seq":0,',
    "caf\u00e9 \u2603 \U0001f600",
    "",
]


@pytest.mark.parametrize("text", EDGE_CASE_TEXTS)
@pytest.mark.parametrize(("seq", "prev_hash"), [(1, GENESIS_HASH), (12345, "ab" * 32)])
def test_hash_parts_rebuild_the_hashed_document(text: str, seq: int, prev_hash: str) -> None:
    sealed = seal_row(
        entry(
            principal=f"agent:{text}",
            resource=f"arbor://agent/spawn/{text}",
            detail={text: text, "n": seq},
            trace_id=text or None,
        ),
        seq,
        prev_hash,
    )

    first, second, third = hash_parts(sealed)

    document = first + prev_hash + second + str(seq) + third
    assert hashlib.sha256(document.encode("ascii")).hexdigest() == row_hash(sealed)
    assert row_hash(sealed) == expected_hash(sealed.to_entry())


@pytest.mark.parametrize("text", EDGE_CASE_TEXTS[:5])
def test_first_incarnation_extends_chain(store: CheckpointStore, text: str) -> None:
    before = append_many(store, 2)
    spawn = entry(
        principal=f"operator {text}",
        action="spawn",
        resource=f"arbor://agent/spawn/{text}",
        detail={"note": text},
        trace_id="0af7651916cd43dd8448eb211c80319c",
    )
    record = AgentRecord(name="alpha", type_path="m:C", status=STARTING, spawn_id="s-1")

    assert store.create_first_incarnation(record, spawn, "node-a", None, "{}") is not None

    rows = store.list_audit()
    assert rows[:2] == before
    (created,) = rows[2:]
    assert (created.seq, created.prev_hash) == (3, before[-1].hash)
    assert (created.principal, created.resource, created.detail) == (
        spawn.principal,
        spawn.resource,
        spawn.detail,
    )
    assert created.hash == expected_hash(created)
    assert store.verify_audit().ok
    assert store.append_audit(entry()).prev_hash == created.hash
    assert store.verify_audit().ok


def test_append_assigns_time_and_ignores_given_seq(store: CheckpointStore) -> None:
    submitted = entry()
    submitted.seq = 41
    submitted.hash = "f" * 64
    before = datetime.now(timezone.utc)

    stored = store.append_audit(submitted)

    after = datetime.now(timezone.utc)
    assert stored.seq == 1
    assert stored.hash == expected_hash(stored)
    assert stored.at is not None
    assert before <= stored.at <= after
    assert stored.at.tzinfo is not None


def test_listed_entry_equals_appended(store: CheckpointStore) -> None:
    appended = store.append_audit(
        entry(
            principal="api:key-7",
            action="deny",
            resource="arbor://secret/read/db/password",
            decision=DENIED,
            detail={"missing": "read", "uses": [1, 2], "nested": {"ok": False}},
            trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        )
    )

    listed = store.list_audit()

    assert listed == [appended]


def test_detail_numbers_keep_exact_form(store: CheckpointStore) -> None:
    # jsonb would turn 1e16 into an integer and -0.0 into 0, changing the hashed text.
    detail = {"big": 1e16, "negative_zero": -0.0, "text": "caf\u00e9 \u2603 \u0000", "n": 3}
    store.append_audit(entry(detail=detail))

    listed = store.list_audit()
    verification = store.verify_audit()

    assert listed[0].detail == detail
    assert isinstance(listed[0].detail["big"], float)
    assert str(listed[0].detail["negative_zero"]) == "-0.0"
    assert verification.ok


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        pytest.param(entry(principal=""), "principal is empty", id="empty-principal"),
        pytest.param(entry(action=""), "action is empty", id="empty-action"),
        pytest.param(entry(resource=""), "resource is empty", id="empty-resource"),
        pytest.param(entry(decision="maybe"), "decision 'maybe' is invalid", id="decision"),
        pytest.param(entry(detail={"x": float("nan")}), "detail is not JSON", id="nan-in-detail"),
        pytest.param(entry(detail={"x": b"raw"}), "detail is not JSON", id="bytes-in-detail"),
        pytest.param(
            AuditEntry("p", "grant", "r", ALLOWED, ["not", "a", "dict"]),  # type: ignore[arg-type]
            "detail must be a dict, not list",
            id="list-detail",
        ),
        pytest.param(
            entry(resource="arbor://agent/send/a\x00b"), "NUL character", id="nul-in-resource"
        ),
        pytest.param(
            entry(resource="x" * (MAX_TEXT_LENGTH + 1)),
            f"above the limit of {MAX_TEXT_LENGTH}",
            id="long-resource",
        ),
        pytest.param(
            AuditEntry(7, "grant", "r", ALLOWED),  # type: ignore[arg-type]
            "principal must be a str, not int",
            id="int-principal",
        ),
        pytest.param(
            entry(detail={"blob": "x" * 70_000}), "above the limit of 65536", id="huge-detail"
        ),
    ],
)
def test_invalid_entry_is_rejected_and_not_written(
    store: CheckpointStore, bad: AuditEntry, message: str
) -> None:
    with pytest.raises(InvalidAuditEntry) as raised:
        store.append_audit(bad)

    assert message in str(raised.value)
    assert store.list_audit() == []
    assert store.verify_audit().checked == 0


# Concurrent appenders


def test_threads_on_one_store_never_fork(store: CheckpointStore) -> None:
    errors: list[BaseException] = []

    def append_batch(worker: int) -> None:
        try:
            for n in range(20):
                store.append_audit(entry(principal=f"agent:w{worker}", detail={"n": n}))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=append_batch, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    verification = store.verify_audit()
    assert verification.ok, verification.reason
    assert verification.checked == 80
    rows = store.list_audit(limit=1000)
    assert [row.seq for row in rows] == list(range(1, 81))


def test_threads_with_own_connections_never_fork(store: CheckpointStore, store_url: str) -> None:
    stores = [open_store(store_url, store_settings(store_url), migrate=False) for _ in range(4)]
    start = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def append_batch(own: CheckpointStore, worker: int) -> None:
        try:
            start.wait(timeout=30)
            for n in range(15):
                own.append_audit(entry(principal=f"agent:w{worker}", detail={"n": n}))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=append_batch, args=(own, w)) for w, own in enumerate(stores)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        for own in stores:
            own.close()

    assert errors == []
    verification = store.verify_audit()
    assert verification.ok, verification.reason
    assert verification.checked == 60
    for worker in range(4):
        assert len(store.list_audit(principal=f"agent:w{worker}")) == 15


APPEND_SCRIPT = """
import sys
from arbor.config import Settings
from arbor.persistence import AuditEntry, open_store

url, principal, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
settings = Settings(database_url=url, db_retry_attempts=8, db_retry_backoff_s=0.05)
store = open_store(url, settings, migrate=False)
print("ready", flush=True)
sys.stdin.readline()
for n in range(count):
    store.append_audit(AuditEntry(principal, "spawn", f"arbor://agent/spawn/w{n}", "allowed"))
store.close()
"""


def test_processes_never_fork(store: CheckpointStore, store_url: str) -> None:
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", APPEND_SCRIPT, store_url, f"agent:p{worker}", "25"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for worker in range(3)
    ]
    try:
        # Every process has opened its store before any appends, so the appends overlap.
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.close()
        results = [process.wait(timeout=120) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    stderr = [process.stderr.read() if process.stderr else "" for process in processes]

    assert results == [0, 0, 0], stderr
    verification = store.verify_audit()
    assert verification.ok, verification.reason
    assert verification.checked == 75
    for worker in range(3):
        assert len(store.list_audit(principal=f"agent:p{worker}")) == 25


# Verification


def seed_chain(store: CheckpointStore, count: int = 6) -> list[AuditEntry]:
    return [
        store.append_audit(entry(principal=f"agent:a{n}", decision=DENIED, detail={"n": n}))
        for n in range(count)
    ]


def test_intact_chain_verifies(store: CheckpointStore) -> None:
    rows = seed_chain(store)

    verification = store.verify_audit()

    assert verification.ok
    assert verification.checked == 6
    assert verification.bad_seq is None
    assert verification.problem is None
    assert verification.head_seq == 6
    assert verification.head_hash == rows[-1].hash


def test_empty_chain_verifies(store: CheckpointStore) -> None:
    verification = store.verify_audit()

    assert verification.ok
    assert verification.checked == 0
    assert verification.head_seq is None


def test_edited_decision_is_found(store: CheckpointStore, store_url: str) -> None:
    seed_chain(store)
    execute_raw(store_url, "UPDATE audit_log SET decision = 'allowed' WHERE seq = 3")

    verification = store.verify_audit()

    assert not verification.ok
    assert verification.bad_seq == 3
    assert verification.problem == HASH_MISMATCH
    assert verification.checked == 3
    assert verification.head_seq == 2
    assert verification.reason is not None
    assert "edited" in verification.reason


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param("UPDATE audit_log SET detail = '{\"n\":99}' WHERE seq = 4", id="detail"),
        pytest.param("UPDATE audit_log SET principal = 'agent:x' WHERE seq = 4", id="principal"),
        pytest.param("UPDATE audit_log SET trace_id = 'forged' WHERE seq = 4", id="trace-id"),
        pytest.param("UPDATE audit_log SET hash = 'abc' WHERE seq = 4", id="hash"),
    ],
)
def test_edited_column_is_found(store: CheckpointStore, store_url: str, statement: str) -> None:
    seed_chain(store)
    execute_raw(store_url, statement)

    verification = store.verify_audit()

    assert not verification.ok
    assert verification.bad_seq == 4
    assert verification.problem == HASH_MISMATCH


def test_edited_time_is_found(store: CheckpointStore, store_url: str) -> None:
    seed_chain(store)
    if store_url.startswith("sqlite"):
        execute_raw(store_url, "UPDATE audit_log SET at = at - 1000000 WHERE seq = 2")
    else:
        execute_raw(store_url, "UPDATE audit_log SET at = at - interval '1 second' WHERE seq = 2")

    verification = store.verify_audit()

    assert verification.bad_seq == 2
    assert verification.problem == HASH_MISMATCH


def test_deleted_row_is_found(store: CheckpointStore, store_url: str) -> None:
    seed_chain(store)
    execute_raw(store_url, "DELETE FROM audit_log WHERE seq = 3")

    verification = store.verify_audit()

    assert not verification.ok
    assert verification.bad_seq == 4
    assert verification.problem == SEQ_GAP
    assert verification.head_seq == 2
    assert verification.reason is not None
    assert "seq 3 is missing" in verification.reason


def test_deleted_first_row_is_found(store: CheckpointStore, store_url: str) -> None:
    seed_chain(store)
    execute_raw(store_url, "DELETE FROM audit_log WHERE seq = 1")

    verification = store.verify_audit()

    assert verification.bad_seq == 2
    assert verification.problem == SEQ_GAP
    assert verification.head_seq is None


def test_deleted_rows_renumbered_are_found(store: CheckpointStore, store_url: str) -> None:
    # Closing the gap by renumbering still breaks the link to the deleted row.
    seed_chain(store)
    execute_raw(store_url, "DELETE FROM audit_log WHERE seq = 3")
    for seq in (4, 5, 6):
        execute_raw(store_url, "UPDATE audit_log SET seq = ? WHERE seq = ?", (seq - 1, seq))

    verification = store.verify_audit()

    assert verification.bad_seq == 3
    assert verification.problem == PREV_HASH_MISMATCH


def test_swapped_rows_are_found(store: CheckpointStore, store_url: str) -> None:
    seed_chain(store)
    execute_raw(store_url, "UPDATE audit_log SET seq = -1 WHERE seq = 3")
    execute_raw(store_url, "UPDATE audit_log SET seq = 3 WHERE seq = 4")
    execute_raw(store_url, "UPDATE audit_log SET seq = 4 WHERE seq = -1")

    verification = store.verify_audit()

    assert not verification.ok
    assert verification.bad_seq == 3
    assert verification.problem == PREV_HASH_MISMATCH
    assert verification.head_seq == 2
    assert verification.reason is not None
    assert "reordered" in verification.reason


def test_swapped_contents_are_found(store: CheckpointStore, store_url: str) -> None:
    # Rows 2 and 5 exchange everything except seq.
    seed_chain(store)
    columns = ("at", "principal", "action", "resource", "decision", "detail", "prev_hash", "hash")
    for column in columns:
        execute_raw(
            store_url,
            f"UPDATE audit_log SET {column} = CASE seq "
            f"WHEN 2 THEN (SELECT {column} FROM audit_log WHERE seq = 5) "
            f"ELSE (SELECT {column} FROM audit_log WHERE seq = 2) END WHERE seq IN (2, 5)",
        )

    verification = store.verify_audit()

    assert verification.bad_seq == 2
    assert verification.problem == PREV_HASH_MISMATCH


def test_edit_with_recomputed_hash_is_found(store: CheckpointStore, store_url: str) -> None:
    # A forger who rehashes the edited row still breaks the next row's link.
    rows = seed_chain(store)
    forged = rows[2]
    forged.decision = ALLOWED
    forged.hash = expected_hash(forged)
    execute_raw(
        store_url,
        "UPDATE audit_log SET decision = ?, hash = ? WHERE seq = 3",
        (forged.decision, forged.hash),
    )

    verification = store.verify_audit()

    assert verification.bad_seq == 4
    assert verification.problem == PREV_HASH_MISMATCH
    assert verification.head_seq == 3


def test_tampering_past_first_batch_is_found(
    store: CheckpointStore, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(arbor.persistence.sqlite, "VERIFY_BATCH_ROWS", 3)
    monkeypatch.setattr(arbor.persistence.postgres, "VERIFY_BATCH_ROWS", 3)
    seed_chain(store, 10)
    assert store.verify_audit().checked == 10

    execute_raw(store_url, "DELETE FROM audit_log WHERE seq = 7")

    verification = store.verify_audit()
    assert verification.bad_seq == 8
    assert verification.problem == SEQ_GAP
    assert verification.checked == 7


def test_appends_after_tampering_keep_failing(store: CheckpointStore, store_url: str) -> None:
    seed_chain(store)
    execute_raw(store_url, "UPDATE audit_log SET resource = 'arbor://x' WHERE seq = 2")

    store.append_audit(entry())

    assert store.verify_audit().bad_seq == 2


# Listing and filters


@pytest.fixture
def varied(store: CheckpointStore) -> list[AuditEntry]:
    rows = [
        entry("agent:a", "grant", "arbor://agent/send/workers/*", ALLOWED),
        entry("agent:a", "deny", "arbor://agent/stop/workers/w1", DENIED),
        entry("api:key1", "spawn", "arbor://agent/spawn/workers/w2", ALLOWED),
        entry("agent:b", "deny", "arbor://secret/read/db/password", DENIED),
        entry("agent:b", "revoke", "arbor://agent/send/workers/*", ALLOWED),
        entry("agent:a", "stop", "arbor://agent/stop/100%_done", ALLOWED),
    ]
    return [store.append_audit(row) for row in rows]


def seqs(entries: list[AuditEntry]) -> list[int | None]:
    return [row.seq for row in entries]


def test_list_without_filters_is_oldest_first(
    store: CheckpointStore, varied: list[AuditEntry]
) -> None:
    assert seqs(store.list_audit()) == [1, 2, 3, 4, 5, 6]


def test_list_filters_by_principal(store: CheckpointStore, varied: list[AuditEntry]) -> None:
    assert seqs(store.list_audit(principal="agent:a")) == [1, 2, 6]


def test_list_filters_by_action(store: CheckpointStore, varied: list[AuditEntry]) -> None:
    assert seqs(store.list_audit(action="deny")) == [2, 4]


def test_list_filters_by_decision(store: CheckpointStore, varied: list[AuditEntry]) -> None:
    assert seqs(store.list_audit(decision=DENIED)) == [2, 4]
    assert seqs(store.list_audit(decision=ALLOWED)) == [1, 3, 5, 6]


def test_list_filters_by_resource_prefix(store: CheckpointStore, varied: list[AuditEntry]) -> None:
    assert seqs(store.list_audit(resource_prefix="arbor://agent/send/")) == [1, 5]
    assert seqs(store.list_audit(resource_prefix="arbor://secret/")) == [4]


def test_resource_prefix_wildcards_are_literal(
    store: CheckpointStore, varied: list[AuditEntry]
) -> None:
    # % and _ are LIKE wildcards in SQL, but the prefix filter matches them literally.
    assert seqs(store.list_audit(resource_prefix="arbor://agent/stop/100%_")) == [6]
    assert seqs(store.list_audit(resource_prefix="arbor://agent/%")) == []
    assert seqs(store.list_audit(resource_prefix="arbor://agent/s_op")) == []


def test_list_combines_filters(store: CheckpointStore, varied: list[AuditEntry]) -> None:
    found = store.list_audit(principal="agent:a", decision=ALLOWED, resource_prefix="arbor://")
    assert seqs(found) == [1, 6]


def test_list_pages_with_after_seq(store: CheckpointStore, varied: list[AuditEntry]) -> None:
    first = store.list_audit(limit=4)
    second = store.list_audit(limit=4, after_seq=first[-1].seq)

    assert seqs(first) == [1, 2, 3, 4]
    assert seqs(second) == [5, 6]


def test_list_filters_by_time(
    store: CheckpointStore, store_url: str, varied: list[AuditEntry]
) -> None:
    # Move rows 1 and 2 an hour back, so a window can separate them from the rest.
    if store_url.startswith("sqlite"):
        execute_raw(store_url, "UPDATE audit_log SET at = at - 3600000000 WHERE seq <= 2")
    else:
        execute_raw(store_url, "UPDATE audit_log SET at = at - interval '1 hour' WHERE seq <= 2")
    now = datetime.now(timezone.utc)
    half_hour_ago = now - timedelta(minutes=30)

    assert seqs(store.list_audit(since=half_hour_ago)) == [3, 4, 5, 6]
    assert seqs(store.list_audit(until=half_hour_ago)) == [1, 2]
    assert seqs(store.list_audit(since=now + timedelta(minutes=1))) == []


def test_since_in_other_zone_is_compared_in_utc(
    store: CheckpointStore, varied: list[AuditEntry]
) -> None:
    third = varied[2]
    assert third.at is not None
    plus_five = timezone(timedelta(hours=5))

    found = store.list_audit(since=third.at.astimezone(plus_five))

    assert seqs(found) == [3, 4, 5, 6]


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        pytest.param({"limit": 0}, "limit 0 is invalid", id="zero-limit"),
        pytest.param({"limit": 10_001}, "limit 10001 is invalid", id="huge-limit"),
        pytest.param({"decision": "maybe"}, "decision 'maybe' is invalid", id="decision"),
        pytest.param(
            {"since": datetime(2025, 1, 1)},
            "since=2025-01-01T00:00:00 has no time zone",
            id="naive",
        ),
        pytest.param({"after_seq": "3"}, "after_seq '3' is invalid", id="text-after-seq"),
    ],
)
def test_invalid_filter_is_rejected(
    store: CheckpointStore, filters: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidAuditQuery) as raised:
        store.list_audit(**filters)

    assert message in str(raised.value)


# Outages


class LoopbackProxy:
    """A TCP forwarder on 127.0.0.1 to the test PostgreSQL server.

    `stop` closes the listener and every forwarded connection, which looks like a database
    outage to the store. A new proxy on the same port ends the outage.
    """

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.1)
        self.port = int(self.listener.getsockname()[1])
        self.sockets: list[socket.socket] = []
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.running:
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self.running = False
        self.listener.close()
        for end in self.sockets:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()


@pytest.fixture
def proxied_pg(pg_url: str) -> Iterator[tuple[str, LoopbackProxy]]:
    """A URL of the fresh PostgreSQL database that passes through a `LoopbackProxy`."""
    parts = urlsplit(pg_url)
    proxy = LoopbackProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    user = f"{parts.username}@" if parts.username else ""
    url = parts._replace(netloc=f"{user}127.0.0.1:{proxy.port}").geturl()
    # Migrate directly, so the proxied store starts with the schema in place.
    open_store(pg_url, store_settings(pg_url)).close()
    yield url, proxy
    proxy.stop()


def test_postgres_outage_during_append_raises(
    proxied_pg: tuple[str, LoopbackProxy], pg_url: str
) -> None:
    url, proxy = proxied_pg
    store = open_store(url, store_settings(url, attempts=2), migrate=False)
    try:
        store.append_audit(entry())
        proxy.stop()

        with pytest.raises(StoreUnavailable) as raised:
            store.append_audit(entry(principal="agent:lost"))
        with pytest.raises(StoreUnavailable):
            store.verify_audit()
        with pytest.raises(StoreUnavailable):
            store.list_audit()
    finally:
        store.close()

    assert "append_audit failed" in str(raised.value)
    assert "after 2 attempts" in str(raised.value)
    direct = open_store(pg_url, store_settings(pg_url))
    try:
        assert seqs(direct.list_audit()) == [1]
        assert direct.verify_audit().ok
    finally:
        direct.close()


def test_unreachable_postgres_raises_store_unavailable() -> None:
    # Port 1 on the loopback address has no listener on the test machines.
    url = "postgresql://arbor:s3cret@127.0.0.1:1/arbor"

    with pytest.raises(StoreUnavailable) as raised:
        open_store(url, store_settings(url, attempts=2))

    assert "s3cret" not in str(raised.value)
    assert "after 2 attempts" in str(raised.value)


@pytest.fixture
def short_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a locked SQLite file fail each attempt after 50 ms instead of 30 s."""
    monkeypatch.setattr(arbor.persistence.sqlite, "BUSY_TIMEOUT_MS", 50)


def test_sqlite_locked_during_append_raises(sqlite_url: str, short_busy_timeout: None) -> None:
    store = open_store(sqlite_url, store_settings(sqlite_url, attempts=3))
    store.append_audit(entry())
    other = sqlite3.connect(sqlite_url[len("sqlite:///") :], isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable) as raised:
            store.append_audit(entry(principal="agent:lost"))
        other.execute("ROLLBACK")

        after = store.append_audit(entry(principal="agent:after"))
    finally:
        other.close()
        store.close()

    assert "append_audit failed" in str(raised.value)
    assert "after 3 attempts" in str(raised.value)
    assert after.seq == 2


# Counted allows


def test_counter_flushes_one_row_per_key(store: CheckpointStore) -> None:
    counter = AuditCounter(store)
    for _ in range(3):
        counter.record("agent:a", "send", "arbor://agent/send/workers/*")
    counter.record("agent:a", "ask", "arbor://agent/ask/workers/*", count=5)
    counter.record("agent:b", "send", "arbor://agent/send/workers/*")

    written = counter.flush()

    rows = store.list_audit(action=ALLOW_COUNT)
    assert rows == written
    summary = {(row.principal, row.detail["action"], row.resource): row for row in rows}
    assert set(summary) == {
        ("agent:a", "send", "arbor://agent/send/workers/*"),
        ("agent:a", "ask", "arbor://agent/ask/workers/*"),
        ("agent:b", "send", "arbor://agent/send/workers/*"),
    }
    assert summary["agent:a", "send", "arbor://agent/send/workers/*"].detail["count"] == 3
    assert summary["agent:a", "ask", "arbor://agent/ask/workers/*"].detail["count"] == 5
    assert summary["agent:b", "send", "arbor://agent/send/workers/*"].detail["count"] == 1
    assert all(row.decision == ALLOWED for row in rows)
    assert store.verify_audit().ok


def test_counter_resets_after_flush(store: CheckpointStore) -> None:
    counter = AuditCounter(store)
    counter.record("agent:a", "send", "arbor://agent/send/x")
    counter.flush()

    assert counter.pending() == {}
    assert counter.flush() == []
    assert len(store.list_audit()) == 1


def test_counter_records_first_and_last_time(store: CheckpointStore) -> None:
    counter = AuditCounter(store)
    before = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    counter.record("agent:a", "send", "arbor://agent/send/x")
    time.sleep(0.01)
    counter.record("agent:a", "send", "arbor://agent/send/x")
    after = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    (row,) = counter.flush()

    assert before <= row.detail["first_at"] < row.detail["last_at"] <= after


def test_counter_sums_counts_from_threads(store: CheckpointStore) -> None:
    counter = AuditCounter(store)

    def record_many() -> None:
        for _ in range(2000):
            counter.record("agent:a", "send", "arbor://agent/send/x")

    threads = [threading.Thread(target=record_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    (row,) = counter.flush()
    assert row.detail["count"] == 8000


def test_counter_flushes_in_background(store: CheckpointStore) -> None:
    counter = AuditCounter(store, interval_s=0.1).start()
    try:
        counter.record("agent:a", "send", "arbor://agent/send/x", count=2)
        deadline = time.monotonic() + 10
        while not store.list_audit() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        counter.close()

    rows = store.list_audit()
    assert len(rows) == 1
    assert rows[0].detail["count"] == 2


def test_counter_close_flushes_remaining(store: CheckpointStore) -> None:
    with AuditCounter(store, interval_s=3600) as counter:
        counter.record("agent:a", "send", "arbor://agent/send/x", count=4)

    rows = store.list_audit()
    assert len(rows) == 1
    assert rows[0].detail["count"] == 4


def test_counter_keeps_counts_through_sqlite_outage(
    sqlite_url: str, short_busy_timeout: None
) -> None:
    store = open_store(sqlite_url, store_settings(sqlite_url, attempts=2))
    counter = AuditCounter(store)
    counter.record("agent:a", "send", "arbor://agent/send/x", count=3)
    other = sqlite3.connect(sqlite_url[len("sqlite:///") :], isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable):
            counter.flush()
        other.execute("ROLLBACK")
        counter.record("agent:a", "send", "arbor://agent/send/x", count=2)

        assert counter.pending() == {("agent:a", "send", "arbor://agent/send/x"): 5}
        (row,) = counter.flush()
    finally:
        other.close()
        store.close()

    assert row.detail["count"] == 5


def test_counter_keeps_counts_through_postgres_outage(
    proxied_pg: tuple[str, LoopbackProxy],
) -> None:
    url, proxy = proxied_pg
    store = open_store(url, store_settings(url, attempts=4), migrate=False)
    counter = AuditCounter(store)
    counter.record("agent:a", "send", "arbor://agent/send/x", count=3)
    try:
        proxy.stop()
        with pytest.raises(StoreUnavailable):
            counter.flush()
        assert counter.pending() == {("agent:a", "send", "arbor://agent/send/x"): 3}

        restarted = LoopbackProxy(proxy.target, proxy.port)
        try:
            (row,) = counter.flush()
        finally:
            restarted.stop()
    finally:
        store.close()

    assert row.detail["count"] == 3
    assert counter.pending() == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(("", "send", "arbor://x"), "principal is empty", id="empty-principal"),
        pytest.param(("a", "send", "arbor://x\x00"), "NUL character", id="nul"),
        pytest.param(("a", "send", "arbor://x", 0), "count 0 is invalid", id="zero-count"),
        pytest.param(("a", "send", "arbor://x", True), "count True is invalid", id="bool-count"),
    ],
)
def test_counter_rejects_invalid_key(
    store: CheckpointStore, args: tuple[Any, ...], message: str
) -> None:
    counter = AuditCounter(store)

    with pytest.raises(InvalidAuditEntry) as raised:
        counter.record(*args)

    assert message in str(raised.value)
    assert counter.pending() == {}


def test_counter_rejects_zero_interval(store: CheckpointStore) -> None:
    with pytest.raises(ValueError, match="interval_s 0 is invalid"):
        AuditCounter(store, interval_s=0)


# The arbor audit command


def run_arbor(*args: str, url: str, **env: str) -> subprocess.CompletedProcess[str]:
    # An unreachable Ray address shows that the audit commands never contact Ray.
    environment = {
        **os.environ,
        "ARBOR_DATABASE_URL": url,
        "ARBOR_RAY_ADDRESS": "127.0.0.1:1",
        "RAY_ADDRESS": "127.0.0.1:1",
        **env,
    }
    return subprocess.run(
        [ARBOR_COMMAND, *args], env=environment, capture_output=True, text=True, timeout=120
    )


def test_cli_lists_entries_as_table(
    store: CheckpointStore, store_url: str, varied: list[AuditEntry]
) -> None:
    result = run_arbor("audit", url=store_url)

    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "agent:" in line or "api:" in line]
    assert len(lines) == 6
    assert "arbor://secret/read/db/password" in result.stdout
    assert "denied" in lines[1]


def test_cli_json_applies_filters(
    store: CheckpointStore, store_url: str, varied: list[AuditEntry]
) -> None:
    result = run_arbor(
        "audit", "--principal", "agent:a", "--decision", "allowed", "--json", url=store_url
    )

    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [row["seq"] for row in listed] == [1, 6]
    assert listed[0]["principal"] == "agent:a"
    assert listed[0]["hash"] == varied[0].hash
    assert listed[0]["at"].endswith("Z")


def test_cli_filters_by_action_resource_and_limit(
    store: CheckpointStore, store_url: str, varied: list[AuditEntry]
) -> None:
    by_action = run_arbor("audit", "--action", "deny", "--json", url=store_url)
    by_resource = run_arbor("audit", "--resource", "arbor://agent/send/", "--json", url=store_url)
    limited = run_arbor("audit", "--limit", "2", "--after-seq", "3", "--json", url=store_url)

    assert [row["seq"] for row in json.loads(by_action.stdout)] == [2, 4]
    assert [row["seq"] for row in json.loads(by_resource.stdout)] == [1, 5]
    assert [row["seq"] for row in json.loads(limited.stdout)] == [4, 5]


def test_cli_since_filters_by_age(
    store: CheckpointStore, store_url: str, varied: list[AuditEntry]
) -> None:
    recent = run_arbor("audit", "--since", "10m", "--json", url=store_url)
    future = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    none_yet = run_arbor("audit", "--since", future, "--json", url=store_url)

    assert recent.returncode == 0, recent.stderr
    assert len(json.loads(recent.stdout)) == 6
    assert json.loads(none_yet.stdout) == []


def test_cli_rejects_invalid_since(sqlite_url: str) -> None:
    result = run_arbor("audit", "--since", "yesterday", url=sqlite_url)

    assert result.returncode == 2
    assert "'yesterday' is invalid" in result.stderr


def test_cli_verify_intact_chain_exits_zero(store: CheckpointStore, store_url: str) -> None:
    rows = seed_chain(store)

    result = run_arbor("audit", "verify", url=store_url)

    assert result.returncode == 0, result.stderr
    assert "audit chain intact: 6 rows checked" in result.stdout
    assert str(rows[-1].hash) in result.stdout


@pytest.mark.parametrize(
    ("statements", "bad_seq", "problem"),
    [
        pytest.param(
            ["UPDATE audit_log SET decision = 'allowed' WHERE seq = 3"],
            3,
            HASH_MISMATCH,
            id="edited",
        ),
        pytest.param(["DELETE FROM audit_log WHERE seq = 2"], 3, SEQ_GAP, id="deleted"),
        pytest.param(
            [
                "UPDATE audit_log SET seq = -1 WHERE seq = 4",
                "UPDATE audit_log SET seq = 4 WHERE seq = 5",
                "UPDATE audit_log SET seq = 5 WHERE seq = -1",
            ],
            4,
            PREV_HASH_MISMATCH,
            id="swapped",
        ),
    ],
)
def test_cli_verify_tampered_chain_exits_one(
    store: CheckpointStore, store_url: str, statements: list[str], bad_seq: int, problem: str
) -> None:
    seed_chain(store)
    for statement in statements:
        execute_raw(store_url, statement)

    result = run_arbor("audit", "verify", url=store_url)
    as_json = run_arbor("audit", "verify", "--json", url=store_url)

    assert result.returncode == 1
    assert f"audit chain broken at seq {bad_seq} ({problem})" in result.stdout
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["ok"] is False
    assert report["bad_seq"] == bad_seq
    assert report["problem"] == problem


def test_cli_database_url_option_overrides_environment(
    store: CheckpointStore, store_url: str, tmp_path: Path
) -> None:
    seed_chain(store, 2)
    missing = f"sqlite:///{tmp_path}/elsewhere/none.db"

    result = run_arbor("audit", "verify", "--database-url", store_url, url=missing)

    assert result.returncode == 0, result.stderr
    assert "2 rows checked" in result.stdout


def test_cli_missing_sqlite_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "typo.db"

    result = run_arbor("audit", "verify", url=f"sqlite:///{path}")

    assert result.returncode == 1
    assert f"arbor: error: no SQLite store at {path}" in result.stderr
    assert not path.exists()


def test_cli_unreachable_database_is_an_error() -> None:
    url = "postgresql://arbor:s3cret@127.0.0.1:1/arbor"

    result = run_arbor("audit", url=url, ARBOR_DB_RETRY_ATTEMPTS="2")

    assert result.returncode == 1
    assert "arbor: error:" in result.stderr
    assert "postgresql://arbor:***@127.0.0.1:1/arbor" in result.stderr
    assert "s3cret" not in result.stderr + result.stdout
