"""How a cell detects a changed state and skips an unchanged one, without Ray."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import arbor
from arbor.config import Settings
from arbor.messages import Envelope
from arbor.persistence import AgentRecord, CheckpointStore, open_store
from arbor.runtime.cell import AgentCell
from arbor.runtime.context import RuntimeContext


class Shapes(arbor.Agent):
    """Holds values whose JSON text can stay the same while the objects change."""

    def __init__(self) -> None:
        self.items: Any = [1, 2]
        self.table: dict[Any, Any] = {}

    def read(self) -> Any:
        return self.items

    def push(self, value: Any) -> int:
        self.items.append(value)
        return len(self.items)

    def as_tuple(self) -> None:
        self.items = tuple(self.items)

    def as_list(self) -> None:
        self.items = list(self.items)

    def put(self, key: Any, value: Any) -> None:
        self.table[key] = value


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CheckpointStore]:
    url = f"sqlite:///{tmp_path}/changes.db"
    opened = open_store(url, Settings(database_url=url))
    opened.create_agent(
        AgentRecord(name="shapes", type_path="tests:Shapes", status="starting", spawn_id="s1")
    )
    yield opened
    opened.close()


def send(cell: AgentCell, handler: str, *args: Any) -> Any:
    reply = asyncio.run(cell.handle(Envelope(handler, args)))
    return reply


def test_reads_commit_nothing(store: CheckpointStore) -> None:
    cell = AgentCell("shapes", Shapes, store, RuntimeContext("shapes"), init_kwargs={})
    for _ in range(3):
        assert send(cell, "read").value == [1, 2]
    assert cell.checkpoint_version == 1


def test_change_in_place_commits_after_reads(store: CheckpointStore) -> None:
    cell = AgentCell("shapes", Shapes, store, RuntimeContext("shapes"), init_kwargs={})
    send(cell, "read")
    send(cell, "read")
    assert send(cell, "push", 3).value == 3
    send(cell, "read")
    assert cell.checkpoint_version == 2
    checkpoint = store.load_checkpoint("shapes")
    assert checkpoint is not None
    assert checkpoint.state["items"] == [1, 2, 3]


def test_same_json_in_another_type_commits_nothing(store: CheckpointStore) -> None:
    cell = AgentCell("shapes", Shapes, store, RuntimeContext("shapes"), init_kwargs={})
    send(cell, "read")
    send(cell, "as_tuple")
    send(cell, "read")
    send(cell, "as_list")
    assert cell.checkpoint_version == 1


def test_non_json_key_is_named_and_rolled_back(store: CheckpointStore) -> None:
    cell = AgentCell("shapes", Shapes, store, RuntimeContext("shapes"), init_kwargs={})
    send(cell, "read")
    reply = send(cell, "put", 7, "x")
    assert reply.error is not None
    assert "state['table'][7]" in reply.error.message
    assert cell.agent.table == {}
    assert send(cell, "read").value == [1, 2]
    assert cell.checkpoint_version == 1


def test_rejected_send_is_logged(store: CheckpointStore, caplog: pytest.LogCaptureFixture) -> None:
    cell = AgentCell("shapes", Shapes, store, RuntimeContext("shapes"), init_kwargs={})
    caplog.set_level(logging.WARNING, logger="arbor.runtime.cell")

    unknown = asyncio.run(cell.handle(Envelope("nosuch", kind="send", message_id="send-1")))
    wrong = asyncio.run(cell.handle(Envelope("push", (1,), {"timeout": 3}, "send", "send-2")))
    ask = asyncio.run(cell.handle(Envelope("nosuch", kind="ask", message_id="ask-1")))

    assert unknown.error is not None
    assert unknown.error.kind == "unknown_handler"
    assert wrong.error is not None
    assert wrong.error.kind == "invalid_arguments"
    assert ask.error is not None
    lines = [record.getMessage() for record in caplog.records]
    assert any("rejected send send-1" in line and "nosuch" in line for line in lines)
    assert any("rejected send send-2" in line and "timeout" in line for line in lines)
    # The caller of an ask gets the error itself, so the ask is not logged.
    assert not any("ask-1" in line for line in lines)
    assert send(cell, "read").value == [1, 2]
