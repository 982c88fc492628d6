"""Sends made by a handler are committed with its checkpoint and redelivered after a crash."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from arbor.config import Settings
from arbor.messages import Envelope
from arbor.persistence import AgentRecord, CheckpointStore, open_store
from arbor.runtime.cell import AgentCell
from arbor.runtime.context import RuntimeContext
from arbor.runtime.outbox import Outbox
from tests.agents import Relay


class Wire:
    """A stand-in for Ray delivery that records every dispatch."""

    def __init__(self, store: CheckpointStore, delivered: bool | None = None) -> None:
        self.store = store
        self.sent: list[tuple[str, str, int]] = []
        self.delivered_result = delivered

    def dispatch(self, target: str, wire: list[Any]) -> Any:
        checkpoint = self.store.load_checkpoint("relay")
        version = checkpoint.version if checkpoint else 0
        self.sent.append((target, wire[4], version))
        return object()

    def delivered(self, reply: Any) -> bool | None:
        return self.delivered_result


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CheckpointStore]:
    url = f"sqlite:///{tmp_path}/outbox.db"
    store = open_store(url, Settings(database_url=url))
    record = AgentRecord(
        name="relay", type_path="tests.agents:Relay", status="starting", spawn_id="s"
    )
    store.create_agent(record)
    yield store
    store.close()


def start_relay(store: CheckpointStore, wire: Wire, fresh: bool = True) -> AgentCell:
    context = RuntimeContext("relay")
    cell = AgentCell(
        "relay",
        Relay,
        store,
        context,
        init_kwargs={} if fresh else None,
        offload_io=False,
        outbox=Outbox(wire.dispatch, wire.delivered),
    )
    context.attach(cell)
    return cell


def forward(cell: AgentCell, message_id: str) -> Any:
    envelope = Envelope("forward", ("counter", 5), message_id=message_id)
    return asyncio.run(cell.handle(envelope))


def test_send_dispatches_after_its_checkpoint_commits(store: CheckpointStore) -> None:
    wire = Wire(store)
    cell = start_relay(store, wire)
    forward(cell, "m-1")
    assert wire.sent == [("counter", "m-1.1", 2)]


def test_checkpoint_keeps_undelivered_send(store: CheckpointStore) -> None:
    cell = start_relay(store, Wire(store))
    forward(cell, "m-1")
    checkpoint = store.load_checkpoint("relay")
    assert checkpoint is not None
    assert [[entry[0], entry[1]] for entry in checkpoint.outbox] == [["m-1.1", "counter"]]
    assert checkpoint.outbox[0][2][:3] == ["add", [5], {}]


def test_new_incarnation_redelivers_committed_send(store: CheckpointStore) -> None:
    forward(start_relay(store, Wire(store)), "m-1")
    wire = Wire(store)
    cell = start_relay(store, wire, fresh=False)
    assert cell.outbox is not None
    cell.outbox.flush()
    assert [sent[:2] for sent in wire.sent] == [("counter", "m-1.1")]


def test_delivered_send_leaves_next_checkpoint(store: CheckpointStore) -> None:
    wire = Wire(store, delivered=True)
    cell = start_relay(store, wire)
    forward(cell, "m-1")
    asyncio.run(cell.handle(Envelope("forward", ("counter", 1), message_id="m-2")))
    checkpoint = store.load_checkpoint("relay")
    assert checkpoint is not None
    assert [entry[0] for entry in checkpoint.outbox] == ["m-2.1"]


def test_lost_send_is_dispatched_again(store: CheckpointStore) -> None:
    wire = Wire(store, delivered=False)
    cell = start_relay(store, wire)
    forward(cell, "m-1")
    asyncio.run(cell.handle(Envelope("forward", ("counter", 1), message_id="m-2")))
    assert [sent[1] for sent in wire.sent] == ["m-1.1", "m-1.1", "m-2.1"]


def test_sent_message_ids_derive_from_handled_message(store: CheckpointStore) -> None:
    wire = Wire(store)
    cell = start_relay(store, wire)
    forward(cell, "parent")
    forward(cell, "parent")
    assert [sent[1] for sent in wire.sent] == ["parent.1"]
