"""Group commit of checkpoints (durability="batched") against PostgreSQL and SQLite."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator

import pytest

from arbor.errors import CheckpointConflict
from arbor.persistence import RUNNING, AgentRecord, CheckpointStore, open_store
from arbor.persistence.base import CheckpointWrite
from arbor.persistence.group_commit import GroupCommitter


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[CheckpointStore]:
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path}/arbor.db"
    opened = open_store(url)
    yield opened
    opened.close()


def start_agents(store: CheckpointStore, count: int) -> dict[str, int]:
    epochs = {}
    for index in range(count):
        name = f"g/{index}"
        store.create_agent(AgentRecord(name=name, type_path="m:C", status=RUNNING, spawn_id="s"))
        epochs[name] = store.begin_incarnation(name, None)
    return epochs


def test_group_write_commits_each_and_rejects_stale_epoch(store: CheckpointStore) -> None:
    epochs = start_agents(store, 3)
    writes = [
        CheckpointWrite("g/0", epochs["g/0"], '{"n": 0}', [], 5),
        CheckpointWrite("g/1", epochs["g/1"] - 1, '{"n": 1}', [], 5),
        CheckpointWrite("g/2", epochs["g/2"], '{"n": 2}', [["m1", {"v": 1}]], 5, [["x", "y", []]]),
    ]

    results = store.write_checkpoints(writes)

    assert results[0] == 1
    assert isinstance(results[1], CheckpointConflict)
    assert results[2] == 1
    assert store.load_checkpoint("g/1") is None
    kept = store.load_checkpoint("g/2")
    assert kept is not None
    assert kept.state == {"n": 2}
    assert kept.processed == [["m1", {"v": 1}]]
    assert kept.outbox == [["x", "y", []]]


def test_committer_groups_concurrent_writers(store: CheckpointStore) -> None:
    epochs = start_agents(store, 16)
    committer = GroupCommitter(store, window_s=0.02)

    def write_three(name: str) -> list[int]:
        return [
            committer.write_checkpoint(name, epochs[name], f'{{"round": {n}}}', [], 10)
            for n in range(3)
        ]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        versions = list(pool.map(write_three, epochs))

    assert versions == [[1, 2, 3]] * 16
    assert committer.writes == 48
    # Sixteen writers that wait for their commits share transactions.
    assert committer.groups < committer.writes
    for name in epochs:
        checkpoint = store.load_checkpoint(name)
        assert checkpoint is not None
        assert checkpoint.state == {"round": 2}


def test_committer_raises_conflict_of_stale_writer(store: CheckpointStore) -> None:
    epochs = start_agents(store, 1)
    committer = GroupCommitter(store, window_s=0.0)
    store.fence("g/0")

    with pytest.raises(CheckpointConflict):
        committer.write_checkpoint("g/0", epochs["g/0"], "{}", [], 5)
