"""Routes to hosted agents that move between hosts, and a host's order state after a stop.

The cluster runs two hosts on its one node, so the reconciler's rebalancing moves agents
from the fuller host to the emptier one once the agents of one host are stopped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import ray

import arbor
from arbor.config import NAMESPACE
from tests.agents import Counter
from tests.conftest import arbor_cluster

MOVE_TIMEOUT_S = 60.0


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[str]:
    with arbor_cluster("hosted", {"ARBOR_HOSTS_PER_NODE": "2"}) as url:
        yield url


def hosts_of(names: list[str]) -> dict[str, str]:
    return {info.name: info.actor for info in arbor.list_agents() if info.name in names}


def host_report(host: str) -> dict[str, Any]:
    report: dict[str, Any] = ray.get(
        ray.get_actor(host, namespace=NAMESPACE).ping.remote(), timeout=30
    )
    return report


def active_on(host: str) -> list[str]:
    active: list[str] = ray.get(
        ray.get_actor(host, namespace=NAMESPACE).active_agents.remote(), timeout=30
    )
    return active


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def moved() -> dict[str, Any]:
    """Move two agents to the other host while stale references still route to the old one.

    Eight agents go to the two hosts, four each, and each gets two references whose routes
    are cached by an ask. Stopping the four of one host leaves the other with all the agents
    that run, so the reconciler moves two of them to the emptied host.
    """
    names = [f"route/{index}" for index in range(8)]
    refs = {name: arbor.spawn(Counter, name) for name in names}
    for ref in refs.values():
        assert ref.ask("add", 1) == 1
    senders = {name: arbor.get(name) for name in names}
    for sender in senders.values():
        assert sender.ask("get") == 1
    before = hosts_of(names)
    assert len(set(before.values())) == 2
    full, emptied = sorted(set(before.values()))
    staying = [name for name in names if before[name] == full]

    for name in names:
        if before[name] == emptied:
            arbor.stop(name)

    def moved_and_adopted() -> list[str]:
        now = hosts_of(staying)
        gone = [name for name in staying if now[name] == emptied]
        if len(gone) == 2 and set(gone) <= set(active_on(emptied)):
            return gone
        return []

    gone = wait_for(moved_and_adopted, MOVE_TIMEOUT_S, "two agents to move to the emptied host")
    return {"refs": refs, "senders": senders, "old": full, "new": emptied, "names": gone}


def test_stale_ask_follows_moved_agent(moved: dict[str, Any]) -> None:
    name = moved["names"][0]
    ref = moved["refs"][name]
    old_replies = host_report(moved["old"])["moved_replies"]

    assert ref.ask("add", 1, message_id=f"{name}-after-move") == 2

    # The old host replied "moved" once and ran nothing, so the ask ran on the new host.
    assert host_report(moved["old"])["moved_replies"] == old_replies + 1
    assert name in active_on(moved["new"])
    assert name not in active_on(moved["old"])
    # The reference now routes to the new host directly.
    assert ref.ask("add", 1) == 3
    assert host_report(moved["old"])["moved_replies"] == old_replies + 1
    # The resent message kept its id, so a retry with that id is not applied again.
    assert arbor.get(name).ask("add", 1, message_id=f"{name}-after-move") == 2
    assert arbor.get(name).ask("get") == 3


def test_stale_async_ask_follows_moved_agent(moved: dict[str, Any]) -> None:
    name = moved["names"][1]
    ref = moved["refs"][name]
    old_replies = host_report(moved["old"])["moved_replies"]

    assert asyncio.run(ref.ask_async("add", 1)) == 2

    assert host_report(moved["old"])["moved_replies"] == old_replies + 1
    assert asyncio.run(ref.ask_async("add", 1)) == 3
    assert host_report(moved["old"])["moved_replies"] == old_replies + 1


def test_stale_send_is_forwarded(moved: dict[str, Any]) -> None:
    name = moved["names"][0]
    stale = moved["senders"][name]
    before = arbor.get(name).ask("get")
    old_replies = host_report(moved["old"])["moved_replies"]

    stale.send("add", 5)

    # A send has no caller that could resend it, so the old host forwards it.
    assert wait_for(lambda: arbor.get(name).ask("get") == before + 5, 30, "the send")
    assert host_report(moved["old"])["moved_replies"] == old_replies


def test_stop_drops_order_state() -> None:
    ref = arbor.spawn(Counter, "route/stopped")
    ref.ask("add", 1)
    host = hosts_of(["route/stopped"])["route/stopped"]
    streams = host_report(host)["order_streams"]

    arbor.stop("route/stopped")

    # The driver's stream to the stopped agent is gone from its host.
    assert host_report(host)["order_streams"] == streams - 1
