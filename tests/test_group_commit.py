"""Batched durability: group commit in both stores, the committer, and hosted agents on Ray."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import ray

import arbor
from arbor.config import NAMESPACE, REGISTRY_NAME, Settings
from arbor.errors import CheckpointConflict, StoreUnavailable
from arbor.persistence import AgentRecord, CheckpointStore, CheckpointWrite, open_store
from arbor.persistence.base import EncodedCheckpoint
from arbor.persistence.group import GroupCommitter
from arbor.persistence.pgbatch import BatchConnections
from tests.agents import Counter
from tests.conftest import arbor_cluster

STATE = json.dumps({"count": 1})


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CheckpointStore]:
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path}/group.db"
    opened = open_store(url, Settings(database_url=url, db_pool_max=4))
    yield opened
    opened.close()


def started(store: CheckpointStore, *names: str) -> dict[str, int]:
    """Register ``names`` and start an incarnation of each; returns their epochs."""
    epochs = {}
    for name in names:
        store.create_agent(
            AgentRecord(
                name=name, type_path="tests.agents:Counter", status="running", spawn_id=name
            )
        )
        epochs[name] = store.begin_incarnation(name, None)
    return epochs


def test_batch_commits_current_epochs_and_skips_stale(store: CheckpointStore) -> None:
    epochs = started(store, "g/a", "g/b", "g/c")
    store.fence("g/b")
    writes = [
        CheckpointWrite("g/a", epochs["g/a"], '{"n": 1}', [["m1", {"v": 1}]], 10),
        CheckpointWrite("g/b", epochs["g/b"], '{"n": 2}', [], 10),
        CheckpointWrite("g/c", epochs["g/c"], '{"n": 3}', [], 10, [["x", "y"]]),
    ]

    results = store.write_checkpoints(writes)

    assert results[0] == 1
    assert isinstance(results[1], CheckpointConflict)
    assert (results[1].agent, results[1].current_epoch) == ("g/b", epochs["g/b"] + 1)
    assert results[2] == 1
    checkpoint_a = store.load_checkpoint("g/a")
    assert checkpoint_a is not None
    assert (checkpoint_a.state, checkpoint_a.processed) == ({"n": 1}, [["m1", {"v": 1}]])
    assert store.load_checkpoint("g/b") is None
    checkpoint_c = store.load_checkpoint("g/c")
    assert checkpoint_c is not None
    assert checkpoint_c.outbox == [["x", "y"]]
    assert store.get_agent("g/c").checkpoint_version == 1  # type: ignore[union-attr]


def test_batch_prunes_old_versions(store: CheckpointStore) -> None:
    epochs = started(store, "g/p", "g/q")
    for _ in range(5):
        store.write_checkpoints(
            [CheckpointWrite(name, epochs[name], STATE, [], 2) for name in ("g/p", "g/q")]
        )

    assert [info.version for info in store.list_checkpoints("g/p")] == [5, 4]
    assert [info.version for info in store.list_checkpoints("g/q")] == [5, 4]


def test_batch_repeated_agent_writes_in_order(store: CheckpointStore) -> None:
    epochs = started(store, "g/twice")
    write = CheckpointWrite("g/twice", epochs["g/twice"], STATE, [], 10)

    assert store.write_checkpoints([write, write]) == [1, 2]


def test_committer_groups_concurrent_writes(store: CheckpointStore) -> None:
    names = [f"g/w{index}" for index in range(8)]
    epochs = started(store, *names)
    committer = GroupCommitter(store, window_s=0.01)
    versions: dict[str, list[int]] = {name: [] for name in names}

    def write_many(name: str) -> None:
        for _ in range(10):
            versions[name].append(committer.write_checkpoint(name, epochs[name], STATE, [], 10))

    threads = [threading.Thread(target=write_many, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    committer.close()

    assert all(versions[name] == list(range(1, 11)) for name in names)
    assert committer.writes == 80
    assert committer.batches < 80


def test_committer_raises_conflict_for_stale_writer_only(store: CheckpointStore) -> None:
    epochs = started(store, "g/old", "g/new")
    store.fence("g/old")
    committer = GroupCommitter(store, window_s=0.05)
    outcomes: dict[str, Any] = {}

    def write(name: str) -> None:
        try:
            outcomes[name] = committer.write_checkpoint(name, epochs[name], STATE, [], 10)
        except CheckpointConflict as error:
            outcomes[name] = error

    threads = [threading.Thread(target=write, args=(name,)) for name in ("g/old", "g/new")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    committer.close()

    assert isinstance(outcomes["g/old"], CheckpointConflict)
    assert outcomes["g/new"] == 1


def test_batch_state_round_trips_exactly(store: CheckpointStore) -> None:
    name = "g/odd 'name' \\ \"quoted\" é"
    epochs = started(store, name, "g/plain")
    state = json.dumps({"text": 'tab\there, nul-free \u0001 \\ "q" 日本 🙂', "n": [1, 2.5]})
    processed = [["m\\1", {"reply": "line\nbreak"}]]

    results = store.write_checkpoints(
        [
            CheckpointWrite(name, epochs[name], state, processed, 10, [["to", "é"]]),
            CheckpointWrite("g/plain", epochs["g/plain"], STATE, [], 10),
        ]
    )

    assert results == [1, 1]
    checkpoint = store.load_checkpoint(name)
    assert checkpoint is not None
    assert checkpoint.state == json.loads(state)
    assert checkpoint.processed == processed
    assert checkpoint.outbox == [["to", "é"]]


def test_failed_batch_statement_commits_nothing(pg_url: str) -> None:
    store = open_store(pg_url, Settings(database_url=pg_url, db_pool_max=2))
    try:
        epochs = started(store, "g/good", "g/bad")
        writes = [
            CheckpointWrite("g/good", epochs["g/good"], STATE, [], 10),
            CheckpointWrite("g/bad", epochs["g/bad"], '{"truncated": ', [], 10),
        ]

        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            store.write_checkpoints(writes)

        assert store.load_checkpoint("g/good") is None
        assert store.get_agent("g/good").checkpoint_version == 0  # type: ignore[union-attr]
        # The connection is usable again after the failed statement.
        assert store.write_checkpoints(writes[:1]) == [1]
    finally:
        store.close()


def test_dropped_batch_connection_is_replaced(pg_url: str) -> None:
    store = open_store(pg_url, Settings(database_url=pg_url, db_pool_max=2))
    try:
        epochs = started(store, "g/drop")
        write = CheckpointWrite("g/drop", epochs["g/drop"], STATE, [], 10)
        assert store.write_checkpoints([write]) == [1]
        with psycopg.connect(pg_url, autocommit=True) as admin:
            (terminated,) = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND query LIKE %s",
                ("%unnest%",),
            ).fetchone()  # type: ignore[misc]
        assert terminated == 1

        # The first attempt fails on the dropped connection and the retry opens another.
        assert store.write_checkpoints([write]) == [2]
    finally:
        store.close()


def test_unreachable_batch_server_raises_store_unavailable(pg_url: str) -> None:
    settings = Settings(
        database_url=pg_url, db_pool_max=2, db_retry_attempts=2, db_retry_backoff_s=0.01
    )
    store = open_store(pg_url, settings)
    try:
        epochs = started(store, "g/away")
        # Port 1 on loopback refuses connections, as a stopped database server does.
        unreachable = BatchConnections("postgresql://postgres@127.0.0.1:1/arbor", 1)
        store._batches.close()  # type: ignore[attr-defined]
        store._batches = unreachable  # type: ignore[attr-defined]
        write = CheckpointWrite("g/away", epochs["g/away"], STATE, [], 10)

        with pytest.raises(StoreUnavailable, match="write_checkpoints failed .* after 2 attempts"):
            store.write_checkpoints([write])
    finally:
        store.close()


def test_unencodable_checkpoint_fails_only_its_writer(store: CheckpointStore) -> None:
    epochs = started(store, "g/fine")
    committer = GroupCommitter(store, window_s=0.0)
    try:
        with pytest.raises(TypeError, match="not JSON serializable"):
            committer.write_checkpoint("g/fine", epochs["g/fine"], STATE, [["m", object()]], 10)

        assert committer.write_checkpoint("g/fine", epochs["g/fine"], STATE, [], 10) == 1
    finally:
        committer.close()
    assert committer.writes == 1


class _BrokenStore:
    """A store whose batches fail, as after the retries of a database outage ran out."""

    def write_encoded_checkpoints(self, writes: list[EncodedCheckpoint]) -> list[int]:
        raise StoreUnavailable("the database is unreachable")


def test_async_writes_share_batches_and_keep_order(store: CheckpointStore) -> None:
    names = [f"g/async{index}" for index in range(8)]
    epochs = started(store, *names)
    committer = GroupCommitter(store, window_s=0.01)

    async def write_many(name: str) -> list[int]:
        return [
            await committer.write_checkpoint_async(name, epochs[name], STATE, [], 10)
            for _ in range(10)
        ]

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(write_many(name) for name in names))

    versions = asyncio.run(main())
    committer.close()

    assert versions == [list(range(1, 11))] * len(names)
    assert committer.writes == 80
    assert committer.batches < 80
    assert store.load_checkpoint("g/async3").version == 10


def test_async_write_raises_conflict_and_outage() -> None:
    async def write(committer: GroupCommitter) -> BaseException | int:
        try:
            return await committer.write_checkpoint_async("g/x", 1, STATE, [], 10)
        except (CheckpointConflict, StoreUnavailable) as error:
            return error

    broken = GroupCommitter(_BrokenStore(), window_s=0.0)  # type: ignore[arg-type]
    outage = asyncio.run(write(broken))
    broken.close()
    stale = GroupCommitter(_StaleStore(), window_s=0.0)  # type: ignore[arg-type]
    conflict = asyncio.run(write(stale))
    stale.close()

    assert isinstance(outage, StoreUnavailable)
    assert "unreachable" in str(outage)
    assert isinstance(conflict, CheckpointConflict)


class _StaleStore:
    """A store that finds every write's epoch superseded."""

    def write_encoded_checkpoints(self, writes: list[EncodedCheckpoint]) -> list[Any]:
        return [CheckpointConflict(write.name, 1, 2) for write in writes]


def test_committer_failure_fails_every_writer_of_the_batch() -> None:
    committer = GroupCommitter(_BrokenStore(), window_s=0.05)  # type: ignore[arg-type]
    errors: list[BaseException] = []

    def write(name: str) -> None:
        try:
            committer.write_checkpoint(name, 1, STATE, [], 10)
        except StoreUnavailable as error:
            errors.append(error)

    threads = [threading.Thread(target=write, args=(f"g/{index}",)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    committer.close()

    assert len(errors) == 3
    assert all("unreachable" in str(error) for error in errors)


class _SlowStore:
    """A store whose batches take a few milliseconds and always commit."""

    def write_encoded_checkpoints(self, writes: list[EncodedCheckpoint]) -> list[int]:
        time.sleep(0.003)
        return [1] * len(writes)


def test_committer_threads_survive_racing_for_one_batch() -> None:
    # With a window, both committer threads can wait for the same queued writes. The one
    # that finds them taken must go on waiting instead of ending as if closed.
    committer = GroupCommitter(_SlowStore(), window_s=0.02)  # type: ignore[arg-type]

    def write(name: str) -> None:
        committer.write_checkpoint(name, 1, STATE, [], 10)

    for round_index in range(30):
        threads = [
            threading.Thread(target=write, args=(f"g/{round_index}-{index}",))
            for index in range(1 + round_index % 6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    alive = [thread.is_alive() for thread in committer._threads]
    committer.close()

    assert alive == [True, True]
    assert committer.writes == sum(1 + index % 6 for index in range(30))


def test_closed_committer_rejects_writes(store: CheckpointStore) -> None:
    committer = GroupCommitter(store, window_s=0.0)
    committer.close()

    with pytest.raises(StoreUnavailable, match="'g/late'.*closed"):
        committer.write_checkpoint("g/late", 1, STATE, [], 10)


# --- hosted agents with batched durability, on Ray ---------------------------------------

AGENTS = 12
ASKS = 40


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with arbor_cluster("hosted", {"ARBOR_HOSTS_PER_NODE": "1"}) as url:
        yield url


def host_report() -> dict[str, Any]:
    registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
    (report,) = ray.get(registry.hosts.remote(), timeout=60)
    return report  # type: ignore[no-any-return]


def test_invalid_durability_names_the_modes(cluster: str) -> None:
    with pytest.raises(arbor.InvalidArguments, match="'durable', 'batched' or 'periodic'"):
        arbor.spawn(Counter, "gb/bad", durability="fast")


def test_host_kill_loses_no_acknowledged_batched_update(cluster: str) -> None:
    refs = [
        arbor.spawn(Counter, f"gb/{index}", durability="batched", placement="hosted")
        for index in range(AGENTS)
    ]
    acknowledged = [0] * AGENTS
    errors: list[BaseException] = []

    def ask_stream(index: int) -> None:
        ref = arbor.get(f"gb/{index}")
        try:
            for _ in range(ASKS):
                acknowledged[index] = ref.ask("add", 1, timeout=120)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=ask_stream, args=(index,)) for index in range(AGENTS)]
    for thread in threads:
        thread.start()
    while sum(acknowledged) < AGENTS * ASKS // 3 and any(t.is_alive() for t in threads):
        time.sleep(0.01)
    before = host_report()
    os.kill(before["pid"], signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=300)

    assert errors == []
    assert acknowledged == [ASKS] * AGENTS
    assert [ref.ask("get", timeout=120) for ref in refs] == [ASKS] * AGENTS
    # Concurrent messages to the host's agents shared commits before the kill.
    assert before["group_commit_writes"] > before["group_commits"] > 0
    assert host_report()["pid"] != before["pid"]
