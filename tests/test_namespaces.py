"""Namespaces on a real cluster: separate names, capability walls, caps, topics, reminders.

One Ray cluster on PostgreSQL for the module, with capabilities enforced (the default).
``ARBOR_NAMESPACE_MAX_AGENTS`` caps the namespace ``team-q`` at two agents.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import arbor
from arbor.config import reset_settings
from tests.agents import Counter, Delegator
from tests.reminder_agents import Reminded
from tests.topic_agents import Listener

QUOTA = 2


@pytest.fixture(scope="module", autouse=True)
def cluster(module_pg_url: str) -> Iterator[str]:
    os.environ["ARBOR_NAMESPACE_MAX_AGENTS"] = json.dumps({"team-q": QUOTA})
    reset_settings()
    arbor.init(database_url=module_pg_url, num_cpus=2, object_store_memory=100 * 1024**2)
    yield module_pg_url
    arbor.shutdown()
    del os.environ["ARBOR_NAMESPACE_MAX_AGENTS"]
    reset_settings()


@pytest.fixture
def use(cluster: str) -> Iterator[Callable[[str], Any]]:
    """Switch this client's namespace with arbor.init; the test ends in ``default``."""

    @contextmanager
    def switch(namespace: str) -> Iterator[None]:
        arbor.init(database_url=cluster, namespace=namespace)
        try:
            yield
        finally:
            arbor.init(database_url=cluster, namespace="default")

    yield switch


def eventually(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def test_same_name_in_two_namespaces_names_two_agents(use: Callable[[str], Any]) -> None:
    with use("team-a"):
        ref_a = arbor.spawn(Counter, "shared", start=1)
        assert arbor.current_namespace() == "team-a"
    with use("team-b"):
        ref_b = arbor.spawn(Counter, "shared", start=2)

    assert (ref_a.name, ref_b.name) == ("team-a:shared", "team-b:shared")
    with use("team-a"):
        assert arbor.get("shared").ask("add", 10) == 11
        assert [info.name for info in arbor.list_agents()] == ["team-a:shared"]
        assert arbor.list_agents()[0].namespace == "team-a"
        # An operator may name another namespace explicitly.
        assert arbor.get("team-b:shared").ask("get") == 2
    with use("team-b"):
        assert arbor.get("shared").ask("get") == 2
    assert "team-a:shared" not in {info.name for info in arbor.list_agents()}
    everywhere = {info.name for info in arbor.list_agents(namespace="*")}
    assert {"team-a:shared", "team-b:shared"} <= everywhere
    assert [info.name for info in arbor.list_agents(namespace="team-b")] == ["team-b:shared"]
    with pytest.raises(arbor.AgentNotFound):
        arbor.get("shared")

    arbor.stop("team-a:shared", purge=True)
    arbor.stop("team-b:shared", purge=True)


def test_agent_reaches_other_namespace_only_when_granted(use: Callable[[str], Any]) -> None:
    with use("team-b"):
        arbor.spawn(Counter, "target", start=7)
    with use("team-a"):
        arbor.spawn(Counter, "target", start=3)
        # A pattern written in team-a covers team-a's agents only, however wide it is.
        asker = arbor.spawn(Delegator, "asker", capabilities=["arbor://agent/ask/**"])
        assert asker.ask("ask_other", "target", "get") == 3

        with pytest.raises(arbor.HandlerError) as denied:
            asker.ask("ask_other", "team-b:target", "get")
        assert denied.value.error_type == "arbor.errors.CapabilityDenied"
        assert "arbor://agent/ask/team-b:target" in str(denied.value)

        granted = arbor.grant("asker", "arbor://agent/ask/team-b:target")
        assert granted.principal == "team-a:asker"
        assert granted.pattern == "arbor://agent/ask/team-b:target"
        assert asker.ask("ask_other", "team-b:target", "get") == 7
        # The grant names one agent, so its neighbours stay out of reach.
        with use("team-b"):
            arbor.spawn(Counter, "other")
        with pytest.raises(arbor.HandlerError, match="CapabilityDenied|may not ask"):
            asker.ask("ask_other", "team-b:other", "get")

    for name in ("team-a:asker", "team-a:target", "team-b:target", "team-b:other"):
        arbor.stop(name, purge=True)


def test_agent_cannot_delegate_into_another_namespace(use: Callable[[str], Any]) -> None:
    with use("team-a"):
        holder = arbor.spawn(Delegator, "holder")
        held = arbor.grant("holder", "arbor://agent/ask/**", depth=1)
        arbor.spawn(Counter, "helper")

        with pytest.raises(arbor.HandlerError) as widened:
            holder.ask("delegate", held.id, "helper", "arbor://agent/ask/team-b:**")
        assert widened.value.error_type == "arbor.errors.CapabilityDenied"

        with pytest.raises(arbor.HandlerError, match="delegates within its own namespace"):
            holder.ask("delegate", held.id, "team-b:helper", "arbor://agent/ask/workers/*")

        narrowed = holder.ask("delegate", held.id, "helper", "arbor://agent/ask/workers/*")
        (copy,) = [info for info in arbor.capabilities("helper") if info.id == narrowed]
        assert copy.pattern == "arbor://agent/ask/team-a:workers/*"
        assert copy.principal == "team-a:helper"

    arbor.stop("team-a:holder", purge=True)
    arbor.stop("team-a:helper", purge=True)


def test_namespace_cap_raises_quota_exceeded(use: Callable[[str], Any]) -> None:
    with use("team-q"):
        for index in range(QUOTA):
            arbor.spawn(Counter, f"q/{index}")
        with pytest.raises(arbor.QuotaExceeded) as raised:
            arbor.spawn(Counter, "q/over")
        assert raised.value.namespace == "team-q"
        assert raised.value.limit == QUOTA
        assert "ARBOR_NAMESPACE_MAX_AGENTS" in str(raised.value)
        assert "team-q:q/over" not in {info.name for info in arbor.list_agents()}
    with use("team-a"):
        assert arbor.spawn(Counter, "q/free").ask("get") == 0

    arbor.stop("team-q:q/0", purge=True)
    with use("team-q"):
        arbor.spawn(Counter, "q/over")
    for name in ("team-q:q/1", "team-q:q/over", "team-a:q/free"):
        arbor.stop(name, purge=True)


def test_racing_spawns_fill_the_cap_exactly(cluster: str) -> None:
    outcomes: list[str] = []

    def spawn(index: int) -> None:
        try:
            arbor.spawn(Counter, f"team-q:race/{index}")
            outcomes.append("spawned")
        except arbor.QuotaExceeded as error:
            outcomes.append(str(error))

    threads = [threading.Thread(target=spawn, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert outcomes.count("spawned") == QUOTA
    refused = [outcome for outcome in outcomes if outcome != "spawned"]
    assert len(refused) == 6 - QUOTA
    assert "namespace 'team-q' has 2 agents starting or running" in refused[0]
    assert "its cap is 2 (ARBOR_NAMESPACE_MAX_AGENTS)" in refused[0]
    running = [info.name for info in arbor.list_agents(namespace="team-q")]
    assert len(running) == QUOTA
    for name in running:
        arbor.stop(name, purge=True)


def test_topics_are_separate_per_namespace(use: Callable[[str], Any]) -> None:
    listeners = {}
    for namespace in ("team-a", "team-b"):
        with use(namespace):
            listener = arbor.spawn(
                Listener, "listener", capabilities=["arbor://topic/subscribe/events"]
            )
            assert listener.ask("join", "events")[:2] == [f"{namespace}:events", listener.name]
            listeners[namespace] = listener

    with use("team-a"):
        arbor.publish("events", {"n": 1})
    with use("team-b"):
        arbor.publish("events", {"n": 2})
        arbor.publish("events", {"n": 3})
        assert {info.topic for info in arbor.subscriptions(subscriber="listener")} == {
            "team-b:events"
        }

    assert eventually(lambda: listeners["team-b"].ask("count") == 2)
    assert listeners["team-a"].ask("received") == [["team-a:events", {"n": 1}]]
    assert listeners["team-b"].ask("received") == [
        ["team-b:events", {"n": 2}],
        ["team-b:events", {"n": 3}],
    ]

    # An agent of team-a cannot subscribe to team-b's topic with its team-a capability.
    with pytest.raises(arbor.HandlerError) as denied:
        listeners["team-a"].ask("join", "team-b:events")
    assert denied.value.error_type == "arbor.errors.CapabilityDenied"

    for namespace in ("team-a", "team-b"):
        arbor.stop(f"{namespace}:listener", purge=True)


def test_reminders_are_listed_per_namespace(use: Callable[[str], Any]) -> None:
    with use("team-a"):
        reminded = arbor.spawn(Reminded, "reminded")
        reminded.ask("remind", "later", delay=3600)
        assert [(info.agent, info.name) for info in arbor.reminders()] == [
            ("team-a:reminded", "later")
        ]
        assert [info.name for info in arbor.reminders("reminded")] == ["later"]
    with use("team-b"):
        assert arbor.reminders() == []
        assert arbor.cancel_reminder("team-a:reminded", "later") is True

    arbor.stop("team-a:reminded", purge=True)


def test_spawn_capabilities_are_relative_to_the_new_agent(use: Callable[[str], Any]) -> None:
    with use("team-a"):
        arbor.spawn(Counter, "team-b:born", capabilities=["arbor://agent/ask/peers/*"])
        (held,) = arbor.capabilities("team-b:born")
    assert held.pattern == "arbor://agent/ask/team-b:peers/*"
    arbor.stop("team-b:born", purge=True)


def test_agent_context_reports_its_namespace(use: Callable[[str], Any]) -> None:
    with use("team-a"):
        ref = arbor.spawn(Counter, "who")
        assert ref.ask("whoami") == {"name": "team-a:who", "namespace": "team-a", "incarnation": 1}
    arbor.stop("team-a:who", purge=True)


def test_listings_keep_to_the_namespace(use: Callable[[str], Any]) -> None:
    with use("team-a"):
        listener = arbor.spawn(Listener, "lister", capabilities=["arbor://topic/subscribe/feed"])
        listener.ask("join", "feed")
        assert [info.principal for info in arbor.capabilities()] == ["team-a:lister"]
        assert [info.topic for info in arbor.subscriptions()] == ["team-a:feed"]
    with use("team-b"):
        assert arbor.capabilities() == []
        assert arbor.subscriptions() == []
        assert "team-a:lister" in {info.principal for info in arbor.capabilities(namespace="*")}
        assert "team-a:feed" in {info.topic for info in arbor.subscriptions(namespace="*")}
    arbor.stop("team-a:lister", purge=True)


def test_list_agents_rejects_unknown_status(cluster: str) -> None:
    with pytest.raises(arbor.InvalidArguments, match="status='bogus' is invalid"):
        arbor.list_agents(status="bogus")


def test_bad_namespace_gets_a_clear_error(cluster: str) -> None:
    with pytest.raises(arbor.InvalidArguments, match="namespace 'Team_A' is invalid"):
        arbor.init(database_url=cluster, namespace="Team_A")
    assert arbor.current_namespace() == "default"
    with pytest.raises(arbor.InvalidAgentName, match="names an invalid namespace"):
        arbor.get("Team_A:counter")
    with pytest.raises(arbor.InvalidTopicName, match="names an invalid namespace"):
        arbor.publish("Team_A:events", 1)
    with pytest.raises(arbor.InvalidArguments, match="'key' is reserved"):
        arbor.list_agents(namespace="key")


def test_default_prefix_is_the_default_namespace(cluster: str) -> None:
    ref = arbor.spawn(Counter, "default:plain", start=4)
    assert ref.name == "plain"
    assert arbor.get("plain").ask("get") == 4
    arbor.stop("default:plain", purge=True)
