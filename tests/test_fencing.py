"""Epoch fencing between two incarnations of one agent, without Ray."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from arbor.config import Settings
from arbor.messages import Envelope
from arbor.persistence import AgentRecord, CheckpointStore, open_store
from arbor.runtime.cell import AgentCell
from arbor.runtime.context import RuntimeContext
from tests.agents import Counter


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[CheckpointStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/fencing.db"
    else:
        url = request.getfixturevalue("pg_url")
    store = open_store(url, Settings(database_url=url))
    store.create_agent(
        AgentRecord(
            name="zombie", type_path="tests.agents:Counter", status="starting", spawn_id="s1"
        )
    )
    yield store
    store.close()


def start_cell(store: CheckpointStore) -> AgentCell:
    return AgentCell("zombie", Counter, store, RuntimeContext("zombie"), init_kwargs={"start": 0})


def test_spawn_commits_epoch_with_first_checkpoint(store: CheckpointStore) -> None:
    cell = AgentCell("zombie", Counter, store, RuntimeContext("zombie"), init_kwargs={"start": 3})

    record = store.get_agent("zombie")
    checkpoint = store.load_checkpoint("zombie")
    assert (cell.epoch, cell.checkpoint_version) == (1, 1)
    assert record is not None
    assert (record.epoch, record.checkpoint_version, record.status) == (1, 1, "running")
    assert checkpoint is not None
    assert (checkpoint.epoch, checkpoint.state["count"]) == (1, 3)


def test_spawn_with_stale_record_restores_checkpoint(store: CheckpointStore) -> None:
    stale = store.get_agent("zombie")
    first = start_cell(store)
    asyncio.run(first.handle(Envelope("add", (5,))))

    second = AgentCell(
        "zombie",
        Counter,
        store,
        RuntimeContext("zombie"),
        init_kwargs={"start": 100},
        record=stale,
    )

    assert (second.epoch, second.checkpoint_version) == (2, 2)
    assert second.agent.count == 5
    reply = asyncio.run(first.handle(Envelope("add", (1,))))
    assert reply.error is not None
    assert reply.error.kind == "conflict"


def test_spawn_after_incarnation_without_checkpoint_starts_fresh(store: CheckpointStore) -> None:
    stale = store.get_agent("zombie")
    store.begin_incarnation("zombie", None)

    cell = AgentCell(
        "zombie",
        Counter,
        store,
        RuntimeContext("zombie"),
        init_kwargs={"start": 7},
        record=stale,
    )

    checkpoint = store.load_checkpoint("zombie")
    assert (cell.epoch, cell.checkpoint_version) == (2, 1)
    assert cell.agent.count == 7
    assert checkpoint is not None
    assert (checkpoint.epoch, checkpoint.state["count"]) == (2, 7)


def test_stale_incarnation_write_is_rejected(store: CheckpointStore) -> None:
    old = start_cell(store)
    new = start_cell(store)
    assert (old.epoch, new.epoch) == (1, 2)

    reply = asyncio.run(old.handle(Envelope("add", (5,))))

    assert reply.error is not None
    assert reply.error.kind == "conflict"
    assert old.fenced is True
    checkpoint = store.load_checkpoint("zombie")
    assert checkpoint is not None
    assert checkpoint.version == 1
    assert checkpoint.state["count"] == 0


def test_fenced_incarnation_refuses_later_messages(store: CheckpointStore) -> None:
    old = start_cell(store)
    start_cell(store)
    asyncio.run(old.handle(Envelope("add", (5,))))
    reply = asyncio.run(old.handle(Envelope("get")))
    assert reply.error is not None
    assert "fenced" in reply.error.message


def test_current_incarnation_keeps_writing(store: CheckpointStore) -> None:
    old = start_cell(store)
    new = start_cell(store)
    asyncio.run(old.handle(Envelope("add", (5,))))
    reply = asyncio.run(new.handle(Envelope("add", (2,))))
    assert reply.value == 2
    checkpoint = store.load_checkpoint("zombie")
    assert checkpoint is not None
    assert checkpoint.state["count"] == 2


def test_new_incarnation_restores_and_deduplicates(store: CheckpointStore) -> None:
    first = start_cell(store)
    reply = asyncio.run(first.handle(Envelope("add", (4,), message_id="m-1")))
    second = AgentCell("zombie", Counter, store, RuntimeContext("zombie"))
    replay = asyncio.run(second.handle(Envelope("add", (4,), message_id="m-1")))
    assert reply.value == 4
    assert replay.value == 4
    assert replay.duplicate is True
    assert second.agent.count == 4
