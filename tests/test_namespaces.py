"""Namespaces on a real cluster: separate names, capability walls, caps, topics, reminders.

One Ray cluster on PostgreSQL for the module, with capabilities enforced (the default).
``ARBOR_NAMESPACE_MAX_AGENTS`` caps the namespace ``team-q`` at two agents. The listing
queries of the stores run against fresh SQLite and PostgreSQL databases as well.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import ray

import arbor
from arbor.config import NAMESPACE, REGISTRY_NAME, Settings, reset_settings
from arbor.persistence import RUNNING, STOPPED, AgentRecord, CheckpointStore, open_store
from arbor.persistence import base as store_base
from arbor.persistence.base import agent_listing
from arbor.persistence.capabilities import CapabilityRecord
from arbor.persistence.reminders import ReminderRecord
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


# --- listings filtered by the registry and the stores ----------------------------------


def registry() -> Any:
    return ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)


def add_stopped_agents(store: CheckpointStore, names: list[str]) -> None:
    """Store records the reconciler leaves alone, without starting actors."""
    for name in names:
        store.create_agent(AgentRecord(name, "tests.agents.Counter", STOPPED, uuid.uuid4().hex))


def test_registry_returns_only_the_namespace_rows(cluster: str) -> None:
    store = open_store(cluster)
    listed_namespace = [f"team-list:bulk/{index:02d}" for index in range(12)]
    neighbours = [f"team-listx:bulk/{index}" for index in range(5)]
    defaults = [f"listbulk/{index}" for index in range(5)]
    add_stopped_agents(store, listed_namespace + neighbours + defaults)
    live = arbor.spawn(Counter, "team-list:live")
    try:
        names = [info.name for info in ray.get(registry().list_agents.remote(None, "team-list"))]
        assert names == sorted([*listed_namespace, "team-list:live"])

        running = ray.get(registry().list_agents.remote(RUNNING, "team-list"))
        assert [info.name for info in running] == ["team-list:live"]

        in_default = [info.name for info in ray.get(registry().list_agents.remote(None, "default"))]
        assert set(defaults) <= set(in_default)
        assert [name for name in in_default if ":" in name] == []

        everywhere = {info.name for info in ray.get(registry().list_agents.remote())}
        assert {*listed_namespace, *neighbours, *defaults, live.name} <= everywhere

        assert [info.name for info in arbor.list_agents(namespace="team-list")] == names
        assert [info.name for info in arbor.list_agents(namespace="team-listx")] == neighbours
    finally:
        arbor.stop(live.name, purge=True)
        for name in listed_namespace + neighbours + defaults:
            store.delete_agent(name)
        store.close()


def test_registry_pages_one_namespace(cluster: str) -> None:
    store = open_store(cluster)
    names = [f"team-page:p/{index}" for index in range(5)]
    add_stopped_agents(store, [*names, "team-page:other/1", "team-pagex:p/9"])
    try:
        first = ray.get(registry().list_agents.remote(None, "team-page", "team-page:p/", None, 2))
        assert [info.name for info in first] == names[:2]
        second = ray.get(
            registry().list_agents.remote(None, "team-page", "team-page:p/", first[-1].name, 2)
        )
        assert [info.name for info in second] == names[2:4]
        last = ray.get(
            registry().list_agents.remote(None, "team-page", "team-page:p/", second[-1].name, 2)
        )
        assert [info.name for info in last] == names[4:]
    finally:
        for name in [*names, "team-page:other/1", "team-pagex:p/9"]:
            store.delete_agent(name)
        store.close()


def test_registry_lists_capabilities_reminders_subscriptions_by_namespace(
    use: Callable[[str], Any],
) -> None:
    key = "key:00112233445566ff"
    key_grant = arbor.grant(key, "arbor://agent/inspect/team-c:**")
    with use("team-c"):
        listener = arbor.spawn(
            Listener, "registry-lister", capabilities=["arbor://topic/subscribe/news"]
        )
        listener.ask("join", "news")
        reminded = arbor.spawn(Reminded, "registry-reminded")
        reminded.ask("remind", "later", delay=3600)
    try:
        capabilities = ray.get(registry().capabilities.remote(None, False, "team-c"))
        assert {info.principal for info in capabilities} == {"team-c:registry-lister"}
        for namespace in ("default", "team-d"):
            principals = {
                info.principal
                for info in ray.get(registry().capabilities.remote(None, False, namespace))
            }
            assert "team-c:registry-lister" not in principals
            assert key not in principals
        every_principal = {info.principal for info in ray.get(registry().capabilities.remote())}
        assert {key, "team-c:registry-lister"} <= every_principal

        reminders = ray.get(registry().reminders.remote(None, None, "team-c"))
        assert [(info.agent, info.name) for info in reminders] == [
            ("team-c:registry-reminded", "later")
        ]
        assert ray.get(registry().reminders.remote(None, None, "team-d")) == []

        subscriptions = ray.get(registry().topic.remote("list", None, None, "team-c"))
        assert [(info.topic, info.subscriber) for info in subscriptions] == [
            ("team-c:news", "team-c:registry-lister")
        ]
        assert ray.get(registry().topic.remote("list", None, None, "team-d")) == []
    finally:
        arbor.revoke(key_grant.id)
        arbor.stop("team-c:registry-lister", purge=True)
        arbor.stop("team-c:registry-reminded", purge=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The URL of an empty database of each dialect."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(fixture))


def open_listing_store(url: str) -> CheckpointStore:
    return open_store(url, Settings(database_url=url, db_retry_attempts=4))


STORED_AGENTS = ["alpha", "team-a:x", "team-ab:y", "team-a:z/1", "zeta/2", "team-b:w"]


def fill_listing_tables(store: CheckpointStore) -> None:
    """Store one agent, reminder, subscription and capability per name of STORED_AGENTS."""
    now = datetime.now(UTC)
    add_stopped_agents(store, STORED_AGENTS)
    for index, name in enumerate(STORED_AGENTS):
        store.save_reminder(  # type: ignore[attr-defined]
            ReminderRecord(name, "r", uuid.uuid4().hex, 1_000 * (index + 1), None, "{}", now)
        )
        topic = name.replace("/", "-") + "/events"
        store.save_subscription(topic, name, "agent", "on_event", 10)  # type: ignore[attr-defined]
        store.save_capability(  # type: ignore[attr-defined]
            CapabilityRecord(
                uuid.uuid4().hex,
                name,
                None,
                "arbor://agent/ask/x",
                ("ask",),
                "t",
                "operator",
                now + timedelta(seconds=index),
                now + timedelta(days=1),
            )
        )
    store.save_capability(  # type: ignore[attr-defined]
        CapabilityRecord(
            uuid.uuid4().hex,
            "key:0123456789abcdef",
            None,
            "arbor://agent/ask/x",
            ("ask",),
            "t",
            "operator",
            now,
            now + timedelta(days=1),
        )
    )


def check_listings_by_namespace(store: CheckpointStore) -> None:
    expected = {
        "default": ["alpha", "zeta/2"],
        "team-a": ["team-a:x", "team-a:z/1"],
        "team-ab": ["team-ab:y"],
        "team-b": ["team-b:w"],
        "team": [],
        "key": [],
    }
    for namespace, names in expected.items():
        agents = [record.name for record in store.list_agents(namespace=namespace)]
        assert agents == names, namespace
        reminders = store.list_reminders(namespace=namespace)  # type: ignore[attr-defined]
        assert sorted(record.agent for record in reminders) == names, namespace
        subscriptions = store.list_subscriptions(namespace=namespace)  # type: ignore[attr-defined]
        assert sorted(record.subscriber for record in subscriptions) == names, namespace
        if namespace != "key":
            held = store.list_capabilities(namespace=namespace)  # type: ignore[attr-defined]
            assert sorted(record.principal for record in held) == names, namespace
    keys = store.list_capabilities(namespace="key")  # type: ignore[attr-defined]
    assert [record.principal for record in keys] == ["key:0123456789abcdef"]
    assert [record.name for record in store.list_agents()] == sorted(STORED_AGENTS)


def test_store_lists_only_the_namespace_rows(store_url: str) -> None:
    store = open_listing_store(store_url)
    try:
        fill_listing_tables(store)
        check_listings_by_namespace(store)

        store.set_status("team-a:x", RUNNING)
        running = store.list_agents(RUNNING, "team-a")
        assert [record.name for record in running] == ["team-a:x"]
        assert store.count_agents((RUNNING,), "team-a") == 1
        assert store.count_agents((RUNNING, STOPPED), "default") == 2
        assert store.count_agents((RUNNING, STOPPED), "team-ab") == 1
        assert store.count_agents((RUNNING, STOPPED)) == len(STORED_AGENTS)
    finally:
        store.close()


def test_store_pages_and_prefixes_agents(store_url: str) -> None:
    store = open_listing_store(store_url)
    try:
        add_stopped_agents(store, STORED_AGENTS)
        first = store.list_agents(namespace="team-a", limit=1)
        assert [record.name for record in first] == ["team-a:x"]
        second = store.list_agents(namespace="team-a", after="team-a:x", limit=1)
        assert [record.name for record in second] == ["team-a:z/1"]
        assert store.list_agents(namespace="team-a", after="team-a:z/1", limit=1) == []

        prefixed = store.list_agents(prefix="team-a")
        assert [record.name for record in prefixed] == ["team-a:x", "team-a:z/1", "team-ab:y"]
        assert [record.name for record in store.list_agents(prefix="team-a:z")] == ["team-a:z/1"]
        assert [record.name for record in store.list_agents(prefix="ze")] == ["zeta/2"]
    finally:
        store.close()


def test_migration_gives_existing_rows_their_namespace(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dialect = "sqlite" if store_url.startswith("sqlite") else "postgresql"
    module = f"arbor.persistence.{'sqlite' if dialect == 'sqlite' else 'postgres'}"
    before = [script for script in store_base.migration_scripts(dialect) if script[0] < 10]
    monkeypatch.setattr(f"{module}.migration_scripts", lambda _: before)
    old = open_listing_store(store_url)
    try:
        fill_listing_tables(old)
    finally:
        old.close()
    monkeypatch.undo()

    store = open_listing_store(store_url)
    try:
        with store._transaction() as connection:  # type: ignore[attr-defined]
            versions = [
                row[0]
                for row in connection.execute(
                    "SELECT version FROM arbor_schema_migrations ORDER BY version"
                )
            ]
        assert versions[-1] == 10
        check_listings_by_namespace(store)

        # Rows written after the migration get their namespace as well.
        add_stopped_agents(store, ["team-a:after"])
        listed = [record.name for record in store.list_agents(namespace="team-a")]
        assert listed == ["team-a:after", "team-a:x", "team-a:z/1"]
    finally:
        store.close()


def test_sqlite_namespace_listings_read_through_indexes(sqlite_url: str) -> None:
    store = open_listing_store(sqlite_url)
    statements: list[str] = []
    try:
        fill_listing_tables(store)
        store._connection.set_trace_callback(statements.append)  # type: ignore[attr-defined]
        store.list_agents(namespace="team-a")
        store.list_agents(RUNNING, "team-a", after="team-a:x", limit=5)
        store.list_reminders(namespace="team-a")  # type: ignore[attr-defined]
        store.list_subscriptions(namespace="team-a")  # type: ignore[attr-defined]
        store.list_capabilities(namespace="team-a")  # type: ignore[attr-defined]
        store._connection.set_trace_callback(None)  # type: ignore[attr-defined]

        selects = [text for text in statements if text.lstrip().upper().startswith("SELECT")]
        assert len(selects) == 5
        indexes = [
            "arbor_agents_namespace",
            "arbor_agents_namespace",
            "arbor_reminders_namespace",
            "arbor_subscriptions_namespace",
            "arbor_capabilities_namespace",
        ]
        for select, index in zip(selects, indexes, strict=True):
            plan = " ".join(
                str(row[3])
                for row in store._connection.execute(  # type: ignore[attr-defined]
                    f"EXPLAIN QUERY PLAN {select}"
                )
            )
            expected = rf"SEARCH arbor_\w+ USING (COVERING )?INDEX {index} \(namespace="
            assert re.search(expected, plan), (select, plan)
            assert "SCAN" not in plan, plan
    finally:
        store.close()


def test_postgresql_agent_listing_reads_through_an_index(pg_url: str) -> None:
    store = open_listing_store(pg_url)
    store.close()
    clauses, parameters = agent_listing("postgresql", None, "team-a", None, "team-a:a", 100)
    queries = [
        (f"SELECT name FROM arbor_agents{clauses}", parameters, "arbor_agents_namespace"),
        (
            "SELECT agent FROM arbor_reminders WHERE namespace = %s ORDER BY due_at, agent, name",
            ["team-a"],
            "arbor_reminders_namespace",
        ),
        (
            "SELECT topic FROM arbor_subscriptions WHERE namespace = %s ORDER BY topic, subscriber",
            ["team-a"],
            "arbor_subscriptions_namespace",
        ),
        (
            "SELECT id FROM arbor_capabilities WHERE namespace = %s AND revoked_at IS NULL "
            "ORDER BY created_at, id",
            ["team-a"],
            "arbor_capabilities_namespace",
        ),
    ]
    with psycopg.connect(pg_url) as connection:
        # The planner prefers a sequential scan of an empty table, so it is disabled here.
        # A plan that still contains one has no index for the predicate.
        connection.execute("SET enable_seqscan = off")
        for query, values, index in queries:
            plan = "\n".join(
                row[0] for row in connection.execute(f"EXPLAIN {query}".encode(), values)
            )
            assert index in plan, plan
            assert "Seq Scan" not in plan, plan
