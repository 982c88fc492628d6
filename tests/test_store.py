"""Checkpoint store behaviour, run against SQLite and PostgreSQL alike."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from arbor.config import Settings, redact_url
from arbor.errors import (
    AgentNotFound,
    ArborError,
    CheckpointConflict,
    ClusterLeaseLost,
    InvalidAuditEntry,
    NameTaken,
    StateNotSerializable,
    StoreUnavailable,
)
from arbor.persistence import (
    FAILED,
    RUNNING,
    STARTING,
    STOPPED,
    AgentRecord,
    AuditEntry,
    CheckpointStore,
    encode_state,
    open_store,
)
from arbor.persistence.base import migration_scripts
from tests.conftest import PG_ADMIN_URL

RETRY_ATTEMPTS = 4
RETRY_BACKOFF_S = 0.05
KEEP = 10


def store_settings(url: str, attempts: int = RETRY_ATTEMPTS) -> Settings:
    return Settings(
        database_url=url, db_retry_attempts=attempts, db_retry_backoff_s=RETRY_BACKOFF_S
    )


def open_test_store(url: str) -> CheckpointStore:
    return open_store(url, store_settings(url))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The URL of an empty database of each dialect."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def store(store_url: str) -> Iterator[CheckpointStore]:
    """A migrated store on an empty database, closed after the test."""
    opened = open_test_store(store_url)
    yield opened
    opened.close()


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[CheckpointStore]:
    opened = open_test_store(pg_url)
    yield opened
    opened.close()


@pytest.fixture
def sqlite_store(sqlite_url: str) -> Iterator[CheckpointStore]:
    opened = open_test_store(sqlite_url)
    yield opened
    opened.close()


def make_record(
    name: str = "alpha",
    spawn_id: str = "spawn-1",
    options: dict[str, Any] | None = None,
) -> AgentRecord:
    return AgentRecord(
        name=name,
        type_path="tests.agents:Counter",
        status=STARTING,
        spawn_id=spawn_id,
        options={"max_restarts": 3} if options is None else options,
    )


def running_agent(store: CheckpointStore, name: str = "alpha") -> int:
    """Create an agent, start its first incarnation and return its epoch."""
    store.create_agent(make_record(name))
    return store.begin_incarnation(name, "node-a")


def write(
    store: CheckpointStore,
    epoch: int,
    state: Any,
    name: str = "alpha",
    processed: list[list[Any]] | None = None,
    keep: int = KEEP,
) -> int:
    return store.write_checkpoint(name, epoch, encode_state(name, state), processed or [], keep)


def canonical(value: Any) -> str:
    """Return JSON text that distinguishes 1 from 1.0 and True from 1, whatever the key order."""
    return json.dumps(value, sort_keys=True)


def sqlite_path(url: str) -> str:
    return url[len("sqlite:///") :]


def schema_versions(url: str) -> list[int]:
    query = "SELECT version FROM arbor_schema_migrations ORDER BY version"
    if url.startswith("sqlite:"):
        connection = sqlite3.connect(sqlite_path(url))
        try:
            return [row[0] for row in connection.execute(query)]
        finally:
            connection.close()
    with psycopg.connect(url) as pg_connection:
        return [row[0] for row in pg_connection.execute(query)]


def free_loopback_port() -> int:
    """Return a port on 127.0.0.1 that nothing listens on (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# Migrations


def test_reopened_store_applies_no_migrations(store: CheckpointStore, store_url: str) -> None:
    second = open_test_store(store_url)
    try:
        assert second.migrate() == []
    finally:
        second.close()

    assert store.migrate() == []


def test_schema_migrations_table_lists_all_versions(store: CheckpointStore, store_url: str) -> None:
    dialect = "sqlite" if store_url.startswith("sqlite") else "postgresql"
    shipped = [version for version, _ in migration_scripts(dialect)]

    assert shipped[:3] == [1, 2, 3]
    assert schema_versions(store_url) == shipped


def test_concurrent_postgres_open_succeeds(pg_url: str) -> None:
    start = threading.Barrier(2)

    def open_after_barrier() -> CheckpointStore:
        start.wait(timeout=10)
        return open_test_store(pg_url)

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(open_after_barrier) for _ in range(2)]
        stores = [future.result(timeout=30) for future in futures]
    try:
        assert [opened.migrate() for opened in stores] == [[], []]
        assert schema_versions(pg_url) == [
            version for version, _ in migration_scripts("postgresql")
        ]
    finally:
        for opened in stores:
            opened.close()


def test_unsupported_url_scheme_is_rejected() -> None:
    url = "mysql://127.0.0.1/arbor"

    with pytest.raises(ArborError) as raised:
        open_store(url, store_settings(url))

    assert "'mysql'" in str(raised.value)


def test_sqlite_url_without_path_is_rejected() -> None:
    url = "sqlite:///"

    with pytest.raises(ArborError) as raised:
        open_store(url, store_settings(url))

    assert "names no file" in str(raised.value)


# Agent records


def test_create_agent_returns_stored_record(store: CheckpointStore) -> None:
    created = store.create_agent(make_record(options={"max_restarts": 3, "tags": ["a", "b"]}))

    assert created.name == "alpha"
    assert created.type_path == "tests.agents:Counter"
    assert created.status == STARTING
    assert created.spawn_id == "spawn-1"
    assert created.options == {"max_restarts": 3, "tags": ["a", "b"]}
    assert created.node_id is None
    assert created.epoch == 0
    assert created.checkpoint_version == 0
    assert created.last_error is None
    assert created.created_at is not None
    assert created.started_at is None
    assert created.checkpointed_at is None


def test_other_spawn_id_raises_name_taken(store: CheckpointStore) -> None:
    store.create_agent(make_record(spawn_id="spawn-1"))

    with pytest.raises(NameTaken) as raised:
        store.create_agent(make_record(spawn_id="spawn-2"))

    assert raised.value.name == "alpha"
    assert raised.value.status == STARTING
    assert "'alpha'" in str(raised.value)
    assert "status starting" in str(raised.value)


def test_name_taken_reports_current_status(store: CheckpointStore) -> None:
    store.create_agent(make_record(spawn_id="spawn-1"))
    store.set_status("alpha", STOPPED)

    with pytest.raises(NameTaken) as raised:
        store.create_agent(make_record(spawn_id="spawn-2"))

    assert raised.value.status == STOPPED
    assert "status stopped" in str(raised.value)


def test_same_spawn_id_returns_existing(store: CheckpointStore) -> None:
    first = store.create_agent(make_record(spawn_id="spawn-1", options={"max_restarts": 3}))

    retried = store.create_agent(make_record(spawn_id="spawn-1", options={"max_restarts": 9}))

    assert retried == first
    assert retried.options == {"max_restarts": 3}
    assert [record.name for record in store.list_agents()] == ["alpha"]


def test_get_agent_returns_none_for_unknown_name(store: CheckpointStore) -> None:
    assert store.get_agent("ghost") is None


def test_get_agent_returns_created_record(store: CheckpointStore) -> None:
    created = store.create_agent(make_record())

    assert store.get_agent("alpha") == created


def test_list_agents_orders_by_name(store: CheckpointStore) -> None:
    for name in ("charlie", "alpha", "bravo"):
        store.create_agent(make_record(name))

    assert [record.name for record in store.list_agents()] == ["alpha", "bravo", "charlie"]


def test_list_agents_of_empty_store_is_empty(store: CheckpointStore) -> None:
    assert store.list_agents() == []


def test_list_agents_filters_by_status(store: CheckpointStore) -> None:
    for name in ("delta", "alpha", "charlie", "bravo"):
        store.create_agent(make_record(name))
    store.set_status("delta", FAILED)
    store.set_status("bravo", FAILED)
    store.set_status("charlie", STOPPED)

    assert [record.name for record in store.list_agents(FAILED)] == ["bravo", "delta"]
    assert [record.name for record in store.list_agents(STOPPED)] == ["charlie"]
    assert [record.name for record in store.list_agents(STARTING)] == ["alpha"]
    assert store.list_agents(RUNNING) == []


def test_set_status_records_last_error(store: CheckpointStore) -> None:
    store.create_agent(make_record())

    store.set_status("alpha", FAILED, last_error="ValueError: counter overflow")

    record = store.get_agent("alpha")
    assert record is not None
    assert record.status == FAILED
    assert record.last_error == "ValueError: counter overflow"


def test_set_status_without_error_keeps_last_error(store: CheckpointStore) -> None:
    store.create_agent(make_record())
    store.set_status("alpha", FAILED, last_error="ValueError: counter overflow")

    store.set_status("alpha", STOPPED)

    record = store.get_agent("alpha")
    assert record is not None
    assert record.status == STOPPED
    assert record.last_error == "ValueError: counter overflow"


def test_set_status_unknown_agent_adds_nothing(store: CheckpointStore) -> None:
    store.set_status("ghost", FAILED, last_error="lost")

    assert store.get_agent("ghost") is None


def test_update_options_replaces_options(store: CheckpointStore) -> None:
    store.create_agent(make_record(options={"max_restarts": 3, "tags": ["a"]}))

    store.update_options("alpha", {"num_cpus": 0.5})

    record = store.get_agent("alpha")
    assert record is not None
    assert record.options == {"num_cpus": 0.5}


# Incarnations and epochs


def test_begin_incarnation_increments_epoch_by_one(store: CheckpointStore) -> None:
    store.create_agent(make_record())

    epochs = [store.begin_incarnation("alpha", "node-a") for _ in range(3)]

    assert epochs == [1, 2, 3]
    record = store.get_agent("alpha")
    assert record is not None
    assert record.epoch == 3


def test_begin_incarnation_marks_agent_running(store: CheckpointStore) -> None:
    store.create_agent(make_record())
    store.begin_incarnation("alpha", "node-a")

    store.begin_incarnation("alpha", "node-b")

    record = store.get_agent("alpha")
    assert record is not None
    assert record.status == RUNNING
    assert record.node_id == "node-b"
    assert record.started_at is not None


def test_begin_unknown_agent_raises_not_found(store: CheckpointStore) -> None:
    with pytest.raises(AgentNotFound) as raised:
        store.begin_incarnation("ghost", "node-a")

    assert raised.value.name == "ghost"
    assert "'ghost'" in str(raised.value)


def test_fence_increments_epoch(store: CheckpointStore) -> None:
    assert running_agent(store) == 1

    assert store.fence("alpha") == 2

    record = store.get_agent("alpha")
    assert record is not None
    assert record.epoch == 2
    assert record.status == RUNNING
    assert record.node_id == "node-a"


def test_fence_unknown_agent_raises_not_found(store: CheckpointStore) -> None:
    with pytest.raises(AgentNotFound) as raised:
        store.fence("ghost")

    assert raised.value.name == "ghost"


def test_concurrent_incarnations_get_distinct_epochs(store_url: str) -> None:
    stores = [open_test_store(store_url) for _ in range(2)]
    try:
        stores[0].create_agent(make_record())

        def begin_ten(opened: CheckpointStore) -> list[int]:
            return [opened.begin_incarnation("alpha", "node-a") for _ in range(10)]

        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(begin_ten, stores))

        assert sorted(results[0] + results[1]) == list(range(1, 21))
    finally:
        for opened in stores:
            opened.close()


# Checkpoints


def test_checkpoint_versions_count_up_from_one(store: CheckpointStore) -> None:
    epoch = running_agent(store)

    versions = [write(store, epoch, {"count": count}) for count in range(3)]

    assert versions == [1, 2, 3]


def test_load_checkpoint_returns_latest_version(store: CheckpointStore) -> None:
    epoch = running_agent(store)
    for count in range(3):
        write(store, epoch, {"count": count})

    loaded = store.load_checkpoint("alpha")

    assert loaded is not None
    assert loaded.agent == "alpha"
    assert loaded.version == 3
    assert loaded.epoch == 1
    assert loaded.state == {"count": 2}


def test_load_checkpoint_returns_requested_version(store: CheckpointStore) -> None:
    epoch = running_agent(store)
    for count in range(3):
        write(store, epoch, {"count": count})

    loaded = store.load_checkpoint("alpha", version=2)

    assert loaded is not None
    assert loaded.version == 2
    assert loaded.state == {"count": 1}


def test_load_missing_checkpoint_returns_none(store: CheckpointStore) -> None:
    running_agent(store)

    assert store.load_checkpoint("alpha") is None
    assert store.load_checkpoint("alpha", version=1) is None
    assert store.load_checkpoint("ghost") is None
    assert store.list_checkpoints("alpha") == []


def test_state_round_trips_exactly(store: CheckpointStore) -> None:
    epoch = running_agent(store)
    state = {
        "nested": {"level1": {"level2": {"level3": [1, [2, [3, {"deep": True}]]]}}},
        "list": [None, True, False, 0, -1, "", [], {}],
        "unicode": "grüße, 日本語, עברית, 🌳👩‍💻",
        "big_ints": [2**63 - 1, -(2**63), 2**70, -(10**30)],
        "floats": [0.1, -2.5, 1.0, 1.5e-10, 0.30000000000000004, 123456789.125],
        "keys": {"": "empty key", "with space": 1, "ünï": 2, "🔑": 3},
    }

    write(store, epoch, state)
    loaded = store.load_checkpoint("alpha")

    assert loaded is not None
    assert loaded.state == state
    assert canonical(loaded.state) == canonical(state)


def test_large_float_keeps_float_type(
    store: CheckpointStore, request: pytest.FixtureRequest
) -> None:
    if store.dialect == "postgresql":
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason="jsonb keeps numbers as numeric, so a float of 1e16 or more "
                "comes back as an int of equal value",
            )
        )
    epoch = running_agent(store)

    write(store, epoch, {"total": 1e20})
    loaded = store.load_checkpoint("alpha")

    assert loaded is not None
    assert type(loaded.state["total"]) is float


def test_processed_list_round_trips(store: CheckpointStore) -> None:
    epoch = running_agent(store)
    processed = [
        ["msg-1", None],
        ["msg-2", {"reply": [1, 2.5, "ok"]}],
        ["msg-3", 2**64],
    ]

    write(store, epoch, {"count": 3}, processed=processed)
    loaded = store.load_checkpoint("alpha")

    assert loaded is not None
    assert loaded.processed == processed
    assert canonical(loaded.processed) == canonical(processed)


def test_checkpoint_updates_agent_record(store: CheckpointStore) -> None:
    epoch = running_agent(store)
    write(store, epoch, {"count": 1})
    write(store, epoch, {"count": 2})

    record = store.get_agent("alpha")
    loaded = store.load_checkpoint("alpha")

    assert record is not None
    assert loaded is not None
    assert record.checkpoint_version == 2
    assert record.checkpointed_at is not None
    assert record.checkpointed_at == loaded.created_at


def test_checkpoint_records_writer_epoch(store: CheckpointStore) -> None:
    store.create_agent(make_record())
    store.begin_incarnation("alpha", "node-a")
    epoch = store.begin_incarnation("alpha", "node-b")

    write(store, epoch, {"count": 1})

    assert [info.epoch for info in store.list_checkpoints("alpha")] == [2]


def test_control_characters_and_emoji_stored(store: CheckpointStore) -> None:
    epoch = running_agent(store)
    state = {
        "control": "\x01\x08\x1b\x1f\x7f",
        "whitespace": "tab\tnewline\nreturn\r",
        "escapes": 'quote " backslash \\ slash /',
        "emoji": "🌳 👩\u200d💻 🇮🇱",
        "\x01key": "control character in a key",
    }

    write(store, epoch, state)
    loaded = store.load_checkpoint("alpha")

    assert loaded is not None
    assert loaded.state == state


# Fencing


def test_stale_epoch_write_is_rejected(store: CheckpointStore) -> None:
    store.create_agent(make_record())
    store.begin_incarnation("alpha", "node-a")
    assert store.begin_incarnation("alpha", "node-b") == 2

    with pytest.raises(CheckpointConflict) as raised:
        write(store, 1, {"count": 99})

    assert raised.value.agent == "alpha"
    assert raised.value.epoch == 1
    assert raised.value.current_epoch == 2


def test_rejected_write_stores_nothing(store: CheckpointStore) -> None:
    store.create_agent(make_record())
    store.begin_incarnation("alpha", "node-a")
    epoch = store.begin_incarnation("alpha", "node-b")
    write(store, epoch, {"count": 1})

    with pytest.raises(CheckpointConflict):
        write(store, 1, {"count": 99})

    loaded = store.load_checkpoint("alpha")
    record = store.get_agent("alpha")
    assert loaded is not None
    assert record is not None
    assert loaded.version == 1
    assert loaded.state == {"count": 1}
    assert record.checkpoint_version == 1
    assert [info.version for info in store.list_checkpoints("alpha")] == [1]


def test_fence_rejects_previous_epoch_writes(store: CheckpointStore) -> None:
    epoch = running_agent(store)
    assert write(store, epoch, {"count": 1}) == 1

    store.fence("alpha")

    with pytest.raises(CheckpointConflict) as raised:
        write(store, epoch, {"count": 2})
    assert raised.value.epoch == 1
    assert raised.value.current_epoch == 2
    assert [info.version for info in store.list_checkpoints("alpha")] == [1]


def test_write_for_unknown_agent_is_rejected(store: CheckpointStore) -> None:
    with pytest.raises(CheckpointConflict) as raised:
        write(store, 1, {"count": 1}, name="ghost")

    assert raised.value.agent == "ghost"
    assert raised.value.current_epoch is None


def test_other_store_incarnation_fences_first(store_url: str) -> None:
    first = open_test_store(store_url)
    second = open_test_store(store_url)
    try:
        first.create_agent(make_record())
        assert first.begin_incarnation("alpha", "node-a") == 1
        assert second.begin_incarnation("alpha", "node-b") == 2

        with pytest.raises(CheckpointConflict) as raised:
            write(first, 1, {"count": 1})
        assert raised.value.current_epoch == 2

        assert write(second, 2, {"count": 2}) == 1
        loaded = first.load_checkpoint("alpha")
        assert loaded is not None
        assert loaded.state == {"count": 2}
    finally:
        first.close()
        second.close()


# Retention and deletion


def test_retention_keeps_newest_versions(store: CheckpointStore) -> None:
    epoch = running_agent(store)

    for count in range(5):
        write(store, epoch, {"count": count}, keep=3)

    assert [info.version for info in store.list_checkpoints("alpha")] == [5, 4, 3]
    assert store.load_checkpoint("alpha", version=1) is None
    assert store.load_checkpoint("alpha", version=2) is None
    latest = store.load_checkpoint("alpha")
    assert latest is not None
    assert latest.version == 5


def test_delete_removes_record_and_checkpoints(store: CheckpointStore) -> None:
    epoch = running_agent(store)
    write(store, epoch, {"count": 1})

    assert store.delete_agent("alpha") is True

    assert store.get_agent("alpha") is None
    assert store.list_checkpoints("alpha") == []
    assert store.load_checkpoint("alpha") is None
    assert store.delete_agent("alpha") is False


def test_deleted_name_can_be_created_again(store: CheckpointStore) -> None:
    epoch = running_agent(store)
    write(store, epoch, {"count": 1})
    store.delete_agent("alpha")

    created = store.create_agent(make_record(spawn_id="spawn-2"))

    assert created.spawn_id == "spawn-2"
    assert created.epoch == 0
    assert created.checkpoint_version == 0
    assert store.load_checkpoint("alpha") is None


# State encoding


def self_containing_list() -> Any:
    loop: list[Any] = ["first"]
    loop.append(loop)
    return {"a": loop}


def self_containing_dict() -> Any:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    return {"outer": loop}


UNSERIALISABLE_STATES = [
    pytest.param(
        lambda: {"a": [0, float("nan")]}, "state['a'][1]", "nan is not a finite", id="nan"
    ),
    pytest.param(
        lambda: {"a": {"b": float("inf")}}, "state['a']['b']", "inf is not a finite", id="inf"
    ),
    pytest.param(lambda: [float("-inf")], "state[0]", "-inf is not a finite", id="minus-inf"),
    pytest.param(
        lambda: {"a": [1, {"b": b"raw"}]}, "state['a'][1]['b']", "bytes is not JSON", id="bytes"
    ),
    pytest.param(
        lambda: {"buffer": bytearray(b"raw")},
        "state['buffer']",
        "bytearray is not JSON",
        id="bytearray",
    ),
    pytest.param(
        lambda: {"a": ["ok", "bad\x00"]},
        "state['a'][1]",
        "the string contains U+0000",
        id="nul-in-string",
    ),
    pytest.param(
        lambda: {"a": {"key\x00": 1}},
        "state['a']['key\\x00']",
        "the key contains U+0000",
        id="nul-in-key",
    ),
    pytest.param(
        lambda: {"a": ["\ud800"]},
        "state['a'][0]",
        "the string contains a surrogate code point",
        id="lone-surrogate",
    ),
    pytest.param(self_containing_list, "state['a'][1]", "contains itself", id="list-cycle"),
    pytest.param(
        self_containing_dict, "state['outer']['self']", "contains itself", id="dict-cycle"
    ),
    pytest.param(lambda: {"a": {1: "one"}}, "state['a'][1]", "the key is int", id="int-key"),
    pytest.param(lambda: {"tags": {"x"}}, "state['tags']", "set is not a JSON type", id="set"),
    pytest.param(
        lambda: {"a": [object()]}, "state['a'][0]", "object is not a JSON type", id="object"
    ),
]


@pytest.mark.parametrize(("build_state", "path", "reason"), UNSERIALISABLE_STATES)
def test_unserialisable_state_names_its_path(
    build_state: Callable[[], Any], path: str, reason: str
) -> None:
    with pytest.raises(StateNotSerializable) as raised:
        encode_state("counter", build_state())

    assert raised.value.agent == "counter"
    assert raised.value.path == path
    assert reason in raised.value.reason
    assert "agent 'counter'" in str(raised.value)
    assert path in str(raised.value)


def test_shared_list_without_cycle_is_encoded() -> None:
    shared = [1, 2]

    assert encode_state("counter", {"a": shared, "b": shared}) == '{"a":[1,2],"b":[1,2]}'


def test_tuple_is_encoded_as_list() -> None:
    assert encode_state("counter", {"pair": (1, "x")}) == '{"pair":[1,"x"]}'


# Outages


def test_unreachable_postgres_raises_store_unavailable() -> None:
    port = free_loopback_port()
    url = f"postgresql://arbor:s3cret@127.0.0.1:{port}/arbor"

    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as raised:
        open_store(url, store_settings(url, attempts=2))
    elapsed = time.monotonic() - started

    # Two attempts, each bounded by the 3 s pool timeout, plus one short backoff.
    assert elapsed < 15
    message = str(raised.value)
    assert "s3cret" not in message
    assert f"postgresql://arbor:***@127.0.0.1:{port}/arbor" in message
    assert "after 2 attempts" in message


def terminate_sessions(pg_url: str) -> list[Any]:
    """End every server session on ``pg_url``'s database; returns one row per session."""
    database = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        return admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchall()


def test_write_survives_terminated_idle_connection(pg_store: CheckpointStore, pg_url: str) -> None:
    epoch = running_agent(pg_store)

    terminated = terminate_sessions(pg_url)
    assert terminated
    assert all(row[0] is True for row in terminated)

    assert write(pg_store, epoch, {"count": 7}) == 1

    loaded = pg_store.load_checkpoint("alpha")
    assert loaded is not None
    assert loaded.state == {"count": 7}


def test_write_survives_many_terminated_connections(pg_url: str) -> None:
    settings = Settings(
        database_url=pg_url, db_retry_attempts=3, db_retry_backoff_s=RETRY_BACKOFF_S, db_pool_max=6
    )
    store = open_store(pg_url, settings)
    try:
        epoch = running_agent(store)
        # Six connections in the pool, each used a moment ago.
        barrier = threading.Barrier(6)

        def hold() -> None:
            with store._pool.connection() as connection:  # type: ignore[attr-defined]
                connection.execute("SELECT 1")
                barrier.wait(timeout=10)

        threads = [threading.Thread(target=hold) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        terminated = terminate_sessions(pg_url)
        assert len(terminated) >= 6

        # Three attempts are enough although six dropped connections sit in the pool.
        assert write(store, epoch, {"count": 7}) == 1
        loaded = store.load_checkpoint("alpha")
        assert loaded is not None
        assert loaded.state == {"count": 7}
    finally:
        store.close()


def find_backend_waiting_for_lock(admin: psycopg.Connection[Any], database: str) -> int:
    """Return the pid of the first backend in ``database`` that waits for a lock."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
            (database,),
        ).fetchone()
        if row is not None:
            return int(row[0])
        time.sleep(0.05)
    raise AssertionError(f"no backend in {database} waited for a lock within 10 s")


def test_write_retries_lost_connection(
    pg_store: CheckpointStore, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    epoch = running_agent(pg_store)
    database = pg_url.rsplit("/", 1)[1]
    results: list[int] = []
    errors: list[BaseException] = []

    def write_in_thread() -> None:
        try:
            results.append(write(pg_store, epoch, {"count": 8}))
        except BaseException as error:
            errors.append(error)

    # The row lock blocks the store's write inside its transaction, so terminating the
    # waiting backend cuts the connection mid-transaction.
    with (
        psycopg.connect(pg_url) as lock_holder,
        psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin,
    ):
        lock_holder.execute("SELECT name FROM arbor_agents WHERE name = 'alpha' FOR UPDATE")
        writer = threading.Thread(target=write_in_thread)
        writer.start()
        waiting_pid = find_backend_waiting_for_lock(admin, database)
        admin.execute("SELECT pg_terminate_backend(%s)", (waiting_pid,))
        lock_holder.rollback()
        writer.join(timeout=20)

    assert errors == []
    assert results == [1]
    assert any(
        "write_checkpoint failed on attempt 1/4" in record.getMessage() for record in caplog.records
    )
    loaded = pg_store.load_checkpoint("alpha")
    assert loaded is not None
    assert loaded.state == {"count": 8}


def test_sqlite_write_waits_for_other_writer(
    sqlite_store: CheckpointStore, sqlite_url: str
) -> None:
    epoch = running_agent(sqlite_store)
    other = sqlite3.connect(sqlite_path(sqlite_url), isolation_level=None)
    results: list[int] = []
    errors: list[BaseException] = []

    def write_in_thread() -> None:
        try:
            results.append(write(sqlite_store, epoch, {"count": 1}))
        except BaseException as error:
            errors.append(error)

    try:
        other.execute("BEGIN IMMEDIATE")
        writer = threading.Thread(target=write_in_thread)
        started = time.monotonic()
        writer.start()
        time.sleep(0.5)
        assert writer.is_alive()
        other.execute("COMMIT")
        writer.join(timeout=10)
        elapsed = time.monotonic() - started
    finally:
        other.close()

    assert errors == []
    assert results == [1]
    assert elapsed >= 0.5
    loaded = sqlite_store.load_checkpoint("alpha")
    assert loaded is not None
    assert loaded.state == {"count": 1}


# URL redaction


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param(
            "postgresql://arbor:s3cret@127.0.0.1:5432/arbor",
            "postgresql://arbor:***@127.0.0.1:5432/arbor",
            id="password",
        ),
        pytest.param(
            "postgresql://arbor:p%40ss%3Aword@localhost/arbor",
            "postgresql://arbor:***@localhost/arbor",
            id="percent-encoded-password",
        ),
        pytest.param(
            "postgresql://arbor@127.0.0.1:5432/arbor",
            "postgresql://arbor@127.0.0.1:5432/arbor",
            id="no-password",
        ),
        pytest.param(
            "postgresql://127.0.0.1:5432/arbor",
            "postgresql://127.0.0.1:5432/arbor",
            id="no-user",
        ),
        pytest.param(
            "postgresql://arbor@127.0.0.1/arbor?password=s3cret&sslmode=disable",
            "postgresql://arbor@127.0.0.1/arbor?password=***&sslmode=disable",
            id="password-query-parameter",
        ),
        pytest.param(
            "postgresql://arbor:s3cret@[::1]:5432/arbor?password=s3cret",
            "postgresql://arbor:***@[::1]:5432/arbor?password=***",
            id="password-in-both",
        ),
        pytest.param(
            "sqlite:////var/lib/arbor/arbor.db",
            "sqlite:////var/lib/arbor/arbor.db",
            id="sqlite",
        ),
    ],
)
def test_redact_url_hides_password(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_outbox_round_trips(store: CheckpointStore) -> None:
    store.create_agent(AgentRecord(name="sender", type_path="m:C", status="starting", spawn_id="s"))
    epoch = store.begin_incarnation("sender", None)
    outbox = [["receiver", ["add", [1], {}, "send", "m-1.0", "sender", 1.5, {}]]]
    store.write_checkpoint("sender", epoch, "{}", [], 10, outbox=outbox)
    checkpoint = store.load_checkpoint("sender")
    assert checkpoint is not None
    assert checkpoint.outbox == outbox


def test_stopped_agent_cannot_begin_incarnation(store: CheckpointStore) -> None:
    store.create_agent(AgentRecord(name="halted", type_path="m:C", status="starting", spawn_id="s"))
    store.begin_incarnation("halted", None)
    store.set_status("halted", STOPPED)
    with pytest.raises(AgentNotFound, match="stopped"):
        store.begin_incarnation("halted", None)


def spawn_entry(name: str = "alpha") -> AuditEntry:
    return AuditEntry("operator", "spawn", f"arbor://agent/spawn/{name}", "allowed", {"t": 1})


def test_audited_create_appends_entry(store: CheckpointStore) -> None:
    stored, entry = store.create_agent_audited(make_record(), spawn_entry())

    assert stored.name == "alpha"
    assert store.get_agent("alpha") == stored
    assert entry is not None
    assert store.list_audit() == [entry]
    assert (entry.seq, entry.action, entry.resource) == (1, "spawn", "arbor://agent/spawn/alpha")
    assert store.verify_audit().ok


def test_audited_create_retry_appends_nothing(store: CheckpointStore) -> None:
    first, _ = store.create_agent_audited(make_record(), spawn_entry())

    again, entry = store.create_agent_audited(make_record(), spawn_entry())

    assert again == first
    assert entry is None
    assert len(store.list_audit()) == 1


def test_audited_create_of_taken_name_appends_nothing(store: CheckpointStore) -> None:
    store.create_agent_audited(make_record(), spawn_entry())

    with pytest.raises(NameTaken):
        store.create_agent_audited(make_record(spawn_id="spawn-2"), spawn_entry())

    assert len(store.list_audit()) == 1


def test_audited_create_with_invalid_entry_writes_nothing(store: CheckpointStore) -> None:
    invalid = AuditEntry("operator", "spawn", "arbor://agent/spawn/alpha", "maybe")

    with pytest.raises(InvalidAuditEntry):
        store.create_agent_audited(make_record(), invalid)

    assert store.get_agent("alpha") is None
    assert store.list_audit() == []


def test_first_incarnation_commits_epoch_and_checkpoint(store: CheckpointStore) -> None:
    store.create_agent(make_record())

    started = store.begin_first_incarnation("alpha", 0, "node-a", None, '{"count": 5}')

    record = store.get_agent("alpha")
    checkpoint = store.load_checkpoint("alpha")
    assert started is not None
    assert started == record
    assert record is not None
    assert (record.epoch, record.status, record.node_id) == (1, RUNNING, "node-a")
    assert record.checkpoint_version == 1
    assert record.started_at is not None
    assert record.checkpointed_at is not None
    assert checkpoint is not None
    assert (checkpoint.version, checkpoint.epoch, checkpoint.state) == (1, 1, {"count": 5})
    assert checkpoint.processed == []
    assert checkpoint.outbox == []


def test_first_incarnation_after_another_began_writes_nothing(store: CheckpointStore) -> None:
    store.create_agent(make_record())
    store.begin_incarnation("alpha", "node-a")

    assert store.begin_first_incarnation("alpha", 0, "node-b", None, "{}") is None

    record = store.get_agent("alpha")
    assert record is not None
    assert (record.epoch, record.node_id, record.checkpoint_version) == (1, "node-a", 0)
    assert store.load_checkpoint("alpha") is None


def test_first_incarnation_of_checkpointed_agent_writes_nothing(store: CheckpointStore) -> None:
    epoch = running_agent(store)
    write(store, epoch, {"count": 1})

    assert store.begin_first_incarnation("alpha", epoch, "node-b", None, "{}") is None

    record = store.get_agent("alpha")
    assert record is not None
    assert (record.epoch, record.checkpoint_version) == (epoch, 1)


def test_first_incarnation_of_stopped_agent_writes_nothing(store: CheckpointStore) -> None:
    store.create_agent(make_record())
    store.set_status("alpha", STOPPED)

    assert store.begin_first_incarnation("alpha", 0, "node-a", None, "{}") is None

    record = store.get_agent("alpha")
    assert record is not None
    assert (record.epoch, record.status) == (0, STOPPED)


def test_first_incarnation_fences_older_epoch(store: CheckpointStore) -> None:
    store.create_agent(make_record())
    store.begin_first_incarnation("alpha", 0, "node-a", None, "{}")

    with pytest.raises(CheckpointConflict):
        write(store, 0, {"count": 2})


def test_first_incarnation_of_cluster_without_lease_is_refused(store: CheckpointStore) -> None:
    store.create_agent(make_record())
    store.claim_cluster_lease("green")

    with pytest.raises(ClusterLeaseLost):
        store.begin_first_incarnation("alpha", 0, "node-a", "blue", "{}")

    record = store.get_agent("alpha")
    assert record is not None
    assert (record.epoch, record.checkpoint_version) == (0, 0)


def test_stopping_incarnation_of_stopped_agent(store: CheckpointStore) -> None:
    epoch = running_agent(store)
    store.set_status("alpha", STOPPED)

    with pytest.raises(AgentNotFound):
        store.begin_incarnation("alpha", "node-b")
    stopping = store.begin_incarnation("alpha", "node-b", stopping=True)

    record = store.get_agent("alpha")
    assert record is not None
    assert stopping == epoch + 1
    assert (record.epoch, record.status, record.node_id) == (epoch + 1, STOPPED, "node-b")
    with pytest.raises(CheckpointConflict):
        write(store, epoch, {"count": 2})
    assert write(store, stopping, {"count": 3}) == 1


def test_stopping_incarnation_of_running_agent(store: CheckpointStore) -> None:
    epoch = running_agent(store)

    assert store.begin_incarnation("alpha", "node-b", stopping=True) == epoch + 1

    record = store.get_agent("alpha")
    assert record is not None
    assert record.status == RUNNING


def test_created_first_incarnation(
    store: CheckpointStore,
) -> None:
    record = make_record(options={"actor": "arbor-warm-1"})

    created = store.create_first_incarnation(record, spawn_entry(), "node-a", None, '{"count": 5}')

    stored = store.get_agent("alpha")
    checkpoint = store.load_checkpoint("alpha")
    audit = store.list_audit()
    assert created is not None
    assert created == stored
    assert stored is not None
    assert (stored.status, stored.epoch, stored.checkpoint_version) == (RUNNING, 1, 1)
    assert (stored.node_id, stored.spawn_id, stored.options) == (
        "node-a",
        "spawn-1",
        {"actor": "arbor-warm-1"},
    )
    assert stored.started_at is not None
    assert stored.checkpointed_at is not None
    assert checkpoint is not None
    assert (checkpoint.version, checkpoint.epoch, checkpoint.state) == (1, 1, {"count": 5})
    assert [(row.action, row.resource) for row in audit] == [("spawn", "arbor://agent/spawn/alpha")]
    assert store.verify_audit().ok


def test_created_first_incarnation_of_taken_name(store: CheckpointStore) -> None:
    store.create_agent(make_record(spawn_id="spawn-0"))

    # The same spawn id as the stored one (a retried spawn) writes nothing either.
    for spawn_id in ("spawn-0", "spawn-1"):
        created = store.create_first_incarnation(
            make_record(spawn_id=spawn_id), spawn_entry(), "node-a", None, "{}"
        )
        assert created is None

    record = store.get_agent("alpha")
    assert record is not None
    assert (record.spawn_id, record.epoch, record.checkpoint_version) == ("spawn-0", 0, 0)
    assert store.load_checkpoint("alpha") is None
    assert store.list_audit() == []


def test_created_first_incarnation_with_invalid_entry(
    store: CheckpointStore,
) -> None:
    invalid = AuditEntry("operator", "spawn", "arbor://agent/spawn/alpha", "maybe")

    with pytest.raises(InvalidAuditEntry):
        store.create_first_incarnation(make_record(), invalid, "node-a", None, "{}")

    assert store.get_agent("alpha") is None
    assert store.load_checkpoint("alpha") is None
    assert store.list_audit() == []


def test_created_first_incarnation_without_lease(
    store: CheckpointStore,
) -> None:
    store.claim_cluster_lease("green")

    with pytest.raises(ClusterLeaseLost):
        store.create_first_incarnation(make_record(), spawn_entry(), "node-a", "blue", "{}")

    assert store.get_agent("alpha") is None
    assert store.list_audit() == []


def test_rehearsed_first_incarnation(store: CheckpointStore) -> None:
    store.claim_cluster_lease("green")
    store.append_audit(spawn_entry("beta"))

    store.rehearse_first_incarnation("green")

    assert store.list_agents() == []
    assert [row.resource for row in store.list_audit()] == ["arbor://agent/spawn/beta"]
    assert store.verify_audit().ok
    # The next append links to the row before the rehearsal.
    store.append_audit(spawn_entry("gamma"))
    assert store.verify_audit().ok


def test_rehearsal_without_lease(pg_store: CheckpointStore) -> None:
    pg_store.claim_cluster_lease("green")

    with pytest.raises(ClusterLeaseLost):
        pg_store.rehearse_first_incarnation("blue")


# The cluster lease


def test_cluster_lease_is_none_before_any_claim(store: CheckpointStore) -> None:
    assert store.cluster_lease() is None


def test_lease_claim_bumps_generation(store: CheckpointStore) -> None:
    first = store.claim_cluster_lease("blue")
    again = store.claim_cluster_lease("blue")
    taken = store.claim_cluster_lease("green")

    assert (first.holder, first.generation) == ("blue", 1)
    assert (again.holder, again.generation) == ("blue", 1)
    assert (taken.holder, taken.generation) == ("green", 2)
    assert taken.claimed_at >= first.claimed_at
    assert store.cluster_lease() == taken


def test_incarnation_of_cluster_without_lease_is_refused(store: CheckpointStore) -> None:
    store.create_agent(make_record())
    store.claim_cluster_lease("green")

    with pytest.raises(ClusterLeaseLost) as raised:
        store.begin_incarnation("alpha", "node-a", "blue")

    assert raised.value.holder == "green"
    assert "arbor lease --claim" in str(raised.value)
    assert store.get_agent("alpha").epoch == 0  # type: ignore[union-attr]
    assert store.begin_incarnation("alpha", "node-a", "green") == 1
    # Code that runs cells without a registry passes no cluster id and is not checked.
    assert store.begin_incarnation("alpha", "node-a") == 2


def test_count_agents_counts_given_statuses(store: CheckpointStore) -> None:
    for name in ("a", "b", "c"):
        store.create_agent(make_record(name=name, spawn_id=f"spawn-{name}"))
    store.begin_incarnation("a", "node-a")
    store.set_status("c", STOPPED)

    assert store.count_agents((RUNNING,)) == 1
    assert store.count_agents((RUNNING, STARTING)) == 2
    assert store.count_agents((FAILED,)) == 0
