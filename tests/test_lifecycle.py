"""Lifecycle hooks, handler time limits, mailbox limits and the agent cap, on real Ray."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import arbor
from arbor.config import Settings
from arbor.messages import Envelope
from arbor.observability.logs import ContextFilter
from arbor.persistence import AgentRecord, open_store
from arbor.runtime.cell import AgentCell
from arbor.runtime.context import RuntimeContext
from tests.agents import BrokenRecovery, Counter, FragileStart, Lifecycle, Sleeper, SlowStopper
from tests.conftest import PLACEMENTS, arbor_cluster, hosted

STOP_TIMEOUT_S = 2
MAX_AGENTS = 12


@pytest.fixture(scope="module", autouse=True, params=PLACEMENTS)
def cluster(request: pytest.FixtureRequest) -> Iterator[str]:
    settings = {"ARBOR_STOP_TIMEOUT_S": str(STOP_TIMEOUT_S), "ARBOR_MAX_AGENTS": str(MAX_AGENTS)}
    with arbor_cluster(request.param, settings) as url:
        yield url


def stored_state(database_url: str, name: str) -> dict[str, object]:
    store = open_store(database_url, migrate=False)
    try:
        checkpoint = store.load_checkpoint(name)
    finally:
        store.close()
    assert checkpoint is not None
    state: dict[str, object] = checkpoint.state
    return state


def test_crash_calls_on_recover_with_crash() -> None:
    ref = arbor.spawn(Lifecycle, "life/crash")
    ref.ask("add")

    os.kill(ref.info()["pid"], signal.SIGKILL)

    assert ref.ask("state", timeout=60) == {"count": 1, "recoveries": ["crash"]}
    arbor.stop("life/crash", purge=True)


def test_restore_calls_on_recover_with_rollback() -> None:
    ref = arbor.spawn(Lifecycle, "life/rollback")
    ref.ask("add")
    version = max(info.version for info in arbor.list_checkpoints("life/rollback"))
    ref.ask("add")

    arbor.restore("life/rollback", version)

    assert ref.ask("state", timeout=60) == {"count": 1, "recoveries": ["rollback"]}
    arbor.stop("life/rollback", purge=True)


def test_restore_of_stopped_agent_raises_not_found(cluster: str) -> None:
    ref = arbor.spawn(Lifecycle, "life/stopped")
    ref.ask("add")
    version = max(info.version for info in arbor.list_checkpoints("life/stopped"))
    arbor.stop("life/stopped")

    with pytest.raises(arbor.AgentNotFound, match="it is stopped"):
        arbor.restore("life/stopped", version)

    assert stored_state(cluster, "life/stopped")["count"] == 1
    arbor.stop("life/stopped", purge=True)


def test_reconciler_recreation_calls_on_recover_with_recreated() -> None:
    import ray

    ref = arbor.spawn(Lifecycle, "life/recreated")
    ref.ask("add")
    # The agent's own actor, or for a hosted agent its host, with every agent in it.
    ray.kill(ray.get_actor(ref.info()["actor"], namespace="arbor"), no_restart=True)

    # The background reconciler may recreate it first; the ask waits for either.
    arbor.reconcile()
    assert ref.ask("state", timeout=60) == {"count": 1, "recoveries": ["recreated"]}
    arbor.stop("life/recreated", purge=True)


def test_failing_on_recover_does_not_stop_recovery() -> None:
    ref = arbor.spawn(BrokenRecovery, "life/broken")
    ref.ask("add")

    os.kill(ref.info()["pid"], signal.SIGKILL)

    assert ref.ask("add", timeout=60) == 2
    arbor.stop("life/broken", purge=True)


def test_fresh_spawn_does_not_call_on_recover() -> None:
    ref = arbor.spawn(Lifecycle, "life/fresh")

    assert ref.ask("state") == {"count": 0, "recoveries": []}
    arbor.stop("life/fresh", purge=True)


def test_graceful_stop_commits_on_stop_changes(cluster: str) -> None:
    ref = arbor.spawn(Lifecycle, "life/stop")
    ref.ask("add")

    arbor.stop("life/stop")

    state = stored_state(cluster, "life/stop")
    assert state["stopped"] is True
    assert state["count"] == 1


def test_slow_on_stop_is_killed(cluster: str) -> None:
    ref = arbor.spawn(SlowStopper, "life/slow-stop")
    ref.ask("add")

    started = time.monotonic()
    arbor.stop("life/slow-stop")
    elapsed = time.monotonic() - started

    assert elapsed < STOP_TIMEOUT_S + 10
    assert elapsed >= STOP_TIMEOUT_S
    state = stored_state(cluster, "life/slow-stop")
    assert state == {"count": 1, "stopped": False}
    with pytest.raises(arbor.AgentNotFound, match="stopped"):
        arbor.get("life/slow-stop")


def test_restart_that_keeps_failing_marks_agent_failed() -> None:
    if hosted():
        pytest.skip("a host starts a hosted agent again at its next message, not in a loop")
    ref = arbor.spawn(FragileStart, "life/fragile")
    ref.ask("arm")

    os.kill(ref.info()["pid"], signal.SIGKILL)

    with pytest.raises(arbor.AgentNotFound, match="recreation failed"):
        ref.ask("get", timeout=90)
    (info,) = [info for info in arbor.list_agents() if info.name == "life/fragile"]
    assert info.status == "failed"
    assert info.last_error is not None
    assert "failed to start 3 times in a row after a restart" in info.last_error
    assert "on_start refused to start" in info.last_error
    arbor.stop("life/fragile", purge=True)


def test_handler_past_its_timeout_fails_with_ask_timeout() -> None:
    ref = arbor.spawn(Lifecycle, "life/hang")
    ref.ask("add")
    incarnation = ref.info()["incarnation"]

    started = time.monotonic()
    with pytest.raises(arbor.AskTimeout, match="1 s limit"):
        ref.ask("hang", timeout=60)
    elapsed = time.monotonic() - started

    assert elapsed < 15
    # The agent replies again, without the timed-out message's change.
    assert ref.ask("state", timeout=30) == {"count": 1, "recoveries": ["timeout"]}
    assert ref.ask("add") == 2
    # A dedicated agent's process restarts, and takes the next epoch. A hosted agent
    # stays in its host, whose timeout record takes one epoch and the new cell the next.
    assert ref.info()["incarnation"] > incarnation
    arbor.stop("life/hang", purge=True)


def test_retry_of_timed_out_message_gets_same_error() -> None:
    ref = arbor.spawn(Lifecycle, "life/hang-retry")
    with pytest.raises(arbor.AskTimeout):
        ref.ask("hang", message_id="hang-1", timeout=60)

    started = time.monotonic()
    with pytest.raises(arbor.AskTimeout, match="limit"):
        ref.ask("hang", message_id="hang-1", timeout=60)

    assert time.monotonic() - started < 1.0
    assert ref.ask("state")["count"] == 0
    arbor.stop("life/hang-retry", purge=True)


def test_full_mailbox_fails_fast_with_agent_overloaded() -> None:
    ref = arbor.spawn(Sleeper, "life/sleeper", max_pending=2)
    ref.send("nap", 1.0)
    ref.send("nap", 1.0)

    started = time.perf_counter()
    with pytest.raises(arbor.AgentOverloaded) as raised:
        ref.send("nap", 1.0)
    elapsed = time.perf_counter() - started

    assert elapsed < 0.010
    assert raised.value.limit == 2
    assert "life/sleeper" in str(raised.value)
    assert "max_pending" in str(raised.value)
    with pytest.raises(arbor.AgentOverloaded):
        arbor.get("life/sleeper").ask("nap", 0)
    # Once the mailbox drains, messages go through again.
    deadline = time.monotonic() + 30
    while True:
        try:
            assert ref.ask("nap", 0, timeout=30) == 0
            break
        except arbor.AgentOverloaded:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    arbor.stop("life/sleeper", purge=True)


def test_mailbox_limit_holds_for_concurrent_senders() -> None:
    arbor.spawn(Sleeper, "life/raced", max_pending=2)
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def ask() -> None:
        ref = arbor.get("life/raced")
        barrier.wait()
        try:
            ref.ask("nap", 1.0, timeout=30)
            outcomes.append("ok")
        except arbor.AgentOverloaded:
            outcomes.append("overloaded")

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert sorted(outcomes) == ["ok", "ok", "overloaded", "overloaded"]
    arbor.stop("life/raced", purge=True)


def test_agent_without_limit_queues_past_any_count() -> None:
    ref = arbor.spawn(Sleeper, "life/unlimited")
    for _ in range(20):
        ref.send("nap", 0.01)

    assert ref.ask("nap", 0, timeout=30) == 0
    arbor.stop("life/unlimited", purge=True)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_invalid_max_pending_is_rejected(value: object) -> None:
    with pytest.raises(arbor.InvalidArguments, match="max_pending"):
        arbor.spawn(Sleeper, "life/bad-pending", max_pending=value)


def test_bare_handler_decorator_marks_without_limit() -> None:
    class Marked(arbor.Agent):
        @arbor.handler
        def work(self) -> int:
            return 1

    assert Marked.work._arbor_timeout is None  # type: ignore[attr-defined]
    with pytest.raises(arbor.InvalidArguments, match="pass options by keyword"):
        arbor.handler(30)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, -1, True, "5"])
def test_invalid_handler_timeout_is_rejected(value: object) -> None:
    with pytest.raises(arbor.InvalidArguments, match="timeout"):
        arbor.handler(timeout=value)  # type: ignore[arg-type]


def test_spawn_past_agent_cap_raises_quota_exceeded() -> None:
    running = sum(info.status in ("running", "starting") for info in arbor.list_agents())
    names = [f"life/quota/{index}" for index in range(MAX_AGENTS - running)]
    for name in names:
        arbor.spawn(Counter, name)

    with pytest.raises(arbor.QuotaExceeded) as raised:
        arbor.spawn(Counter, "life/quota/over")

    assert raised.value.limit == MAX_AGENTS
    assert "ARBOR_MAX_AGENTS" in str(raised.value)
    assert "life/quota/over" not in {info.name for info in arbor.list_agents()}
    arbor.stop(names[0], purge=True)
    arbor.spawn(Counter, "life/quota/over")
    for name in [*names[1:], "life/quota/over"]:
        arbor.stop(name, purge=True)


def test_hook_error_log_names_the_agent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/hooks.db"
    store = open_store(url, Settings(database_url=url))
    store.create_agent(
        AgentRecord(
            name="hooked",
            type_path="tests.agents:BrokenRecovery",
            status="running",
            spawn_id="s1",
        )
    )
    first = AgentCell("hooked", BrokenRecovery, store, RuntimeContext("hooked"), init_kwargs={})
    first.handle_now(Envelope(handler="add"), asyncio.run)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    handler.addFilter(ContextFilter())
    logging.getLogger("arbor.runtime.cell").addHandler(handler)
    try:
        AgentCell(
            "hooked", BrokenRecovery, store, RuntimeContext("hooked"), recovery=lambda: "crash"
        )
    finally:
        logging.getLogger("arbor.runtime.cell").removeHandler(handler)
        store.close()

    (failure,) = [record for record in records if "on_recover raised" in record.getMessage()]
    assert failure.agent_id == "hooked"  # type: ignore[attr-defined]
    assert failure.agent_type == "BrokenRecovery"  # type: ignore[attr-defined]
    assert failure.incarnation == 2  # type: ignore[attr-defined]
