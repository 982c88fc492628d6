"""Topics: the event log and subscriptions in both stores, and delivery on a real cluster.

The store tests run against PostgreSQL and SQLite; the rest share one Ray cluster on
PostgreSQL, with capabilities enforced (the default).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

import arbor
from arbor.config import NAMESPACE, REGISTRY_NAME, get_settings
from arbor.persistence import CheckpointStore, open_store
from tests.conftest import PLACEMENTS, arbor_cluster
from tests.topic_agents import Gated, Listener, Publisher

# --- the store, on both databases ---------------------------------------------------------


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CheckpointStore]:
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path}/arbor.db"
    opened = open_store(url)
    yield opened
    opened.close()


def test_store_appends_in_order(store: Any) -> None:
    assert store.append_topic_event("t/a", "p1", "pub", '{"n":1}') == (1, True)
    assert store.append_topic_event("t/a", "p2", None, '{"n":2}') == (2, True)
    assert store.append_topic_event("t/b", "p1", None, "3") == (1, True)

    events = store.read_topic_events("t/a", 0, 10)

    assert [(event.seq, event.publisher, event.event_json) for event in events] == [
        (1, "pub", '{"n":1}'),
        (2, None, '{"n":2}'),
    ]
    assert [event.seq for event in store.read_topic_events("t/a", 1, 10)] == [2]
    assert store.topic_heads() == {"t/a": 2, "t/b": 1}


def test_store_appends_publish_id_once(store: Any) -> None:
    store.append_topic_event("t/a", "p1", None, "1")

    assert store.append_topic_event("t/a", "p1", None, "1") == (1, False)
    assert store.append_topic_event("t/a", "p2", None, "2") == (2, True)
    assert len(store.read_topic_events("t/a", 0, 10)) == 2


def test_store_subscription_starts_at_head(store: Any) -> None:
    store.append_topic_event("t/a", "p1", None, "1")
    first = store.save_subscription("t/a", "agent/1", "agent", "on_event", 50)
    store.append_topic_event("t/a", "p2", None, "2")
    assert store.advance_subscription("t/a", "agent/1", 2, 1, 0)

    again = store.save_subscription("t/a", "agent/1", "agent", "other", 7)

    assert first.position == 1
    assert (again.handler, again.max_lag, again.position, again.delivered) == ("other", 7, 2, 1)
    assert not store.advance_subscription("t/a", "agent/1", 1, 1, 0)
    assert store.list_subscriptions(subscriber="agent/1")[0].position == 2


def test_store_trims_passed_events(store: Any) -> None:
    for n in range(1, 11):
        store.append_topic_event("t/a", f"p{n}", None, str(n))
    store.save_subscription("t/a", "slow", "agent", "on_event", 100)
    store.save_subscription("t/a", "lagging", "agent", "on_event", 3)
    # Both subscribed at the head, 10; move them back to test each one's max_lag floor.
    with store._transaction() as connection:
        connection.execute(store._topic_sql("UPDATE arbor_subscriptions SET position = ?"), (2,))

    assert store.trim_topic("t/a") == (2, False)
    assert [event.seq for event in store.read_topic_events("t/a", 0, 20)][0] == 3

    store.delete_subscription("t/a", "slow")

    assert store.trim_topic("t/a") == (5, False)
    assert [event.seq for event in store.read_topic_events("t/a", 0, 20)] == [8, 9, 10]
    store.delete_subscriptions("lagging")
    assert store.trim_topic("t/a") == (3, True)
    assert store.read_topic_events("t/a", 0, 20) == []


# --- a new Ray cluster on the same database -----------------------------------------------


def test_subscription_survives_new_cluster(pg_url: str) -> None:
    arbor.init(database_url=pg_url, num_cpus=2, object_store_memory=100 * 1024**2)
    try:
        listener("fresh/l1", "fresh")
    finally:
        arbor.shutdown()

    arbor.init(database_url=pg_url, num_cpus=2, object_store_memory=100 * 1024**2)
    try:
        arbor.publish("fresh", "in the new cluster")
        ref = arbor.get("fresh/l1")
        received = wait_for(
            lambda: ref.ask("received", timeout=90), 90, "the event in the new cluster"
        )
    finally:
        arbor.shutdown()

    assert received == [["fresh", "in the new cluster"]]


# --- delivery on one shared cluster -------------------------------------------------------


@pytest.fixture(scope="module", params=PLACEMENTS)
def cluster(request: pytest.FixtureRequest) -> Iterator[str]:
    with arbor_cluster(request.param) as url:
        yield url


@pytest.fixture(scope="module")
def cluster_store(cluster: str) -> Iterator[CheckpointStore]:
    opened = open_store(cluster)
    yield opened
    opened.close()


def wait_for(condition: Callable[[], Any], timeout: float, description: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {description}")
        time.sleep(0.1)


def listener(name: str, topic: str, max_lag: int | None = None) -> arbor.AgentRef:
    ref = arbor.spawn(Listener, name, capabilities=[f"arbor://topic/subscribe/{topic}"])
    ref.ask("join", topic, max_lag)
    return ref


def subscription(topic: str, subscriber: str) -> arbor.SubscriptionInfo:
    [info] = arbor.subscriptions(topic, subscriber)
    return info


def test_subscribers_get_every_event_in_order(cluster: str) -> None:
    assert get_settings().enforce_capabilities
    refs = [listener(f"news/l{n}", "news") for n in range(3)]

    for n in range(1, 21):
        arbor.publish("news", {"n": n})
    victim = refs[1]
    wait_for(lambda: victim.ask("count") >= 5, 30, "the first deliveries to news/l1")
    old_pid = victim.info()["pid"]
    os.kill(old_pid, signal.SIGKILL)
    for n in range(21, 61):
        arbor.publish("news", {"n": n})

    expected = [["news", {"n": n}] for n in range(1, 61)]
    for ref in refs:
        wait_for(lambda ref=ref: ref.ask("count") >= 60, 60, f"60 events at {ref.name}")
        assert ref.ask("received") == expected
    assert victim.info()["pid"] != old_pid


def test_agent_events_keep_publisher_order(cluster: str) -> None:
    subscriber = listener("orders/sub", "orders")
    publisher = arbor.spawn(Publisher, "orders/pub", capabilities=["arbor://topic/publish/orders"])

    first = publisher.ask("emit", "orders", [1, 2, 3])
    publisher.ask("emit", "orders", [4, 5])

    assert first == [1, 2, 3]
    wait_for(lambda: subscriber.ask("count") == 5, 30, "five events")
    assert [event for _, event in subscriber.ask("received")] == [1, 2, 3, 4, 5]


def test_stalled_subscriber_overflows(cluster: str, cluster_store: Any, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    fast = [listener(f"ticks/fast{n}", "ticks") for n in range(2)]
    stalled = arbor.spawn(
        Gated, "ticks/stalled", str(gate), capabilities=["arbor://topic/subscribe/ticks"]
    )
    stalled.ask("join", "ticks", 5)

    arbor.publish("ticks", 1)
    wait_for(Path(f"{gate}.entered").exists, 30, "the stalled agent to take the first event")
    for n in range(2, 31):
        arbor.publish("ticks", n)
    for ref in fast:
        wait_for(lambda ref=ref: ref.ask("count") == 30, 30, f"30 events at {ref.name}")
    assert subscription("ticks", "ticks/stalled").position == 0

    gate.touch()

    wait_for(lambda: len(stalled.ask("received")) == 6, 30, "the stalled agent to catch up")
    assert stalled.ask("received") == [1, 26, 27, 28, 29, 30]
    info = wait_for(
        lambda: (info := subscription("ticks", "ticks/stalled")).position == 30 and info,
        10,
        "the stalled agent's position to be recorded",
    )
    assert (info.delivered, info.skipped) == (6, 24)
    assert subscription("ticks", "ticks/fast0").skipped == 0
    wait_for(
        lambda: cluster_store.read_topic_events("ticks", 0, 100) == [],
        20,
        "the log of ticks to be trimmed",
    )


def test_client_iterator_gets_agent_events(cluster: str) -> None:
    publisher = arbor.spawn(Publisher, "feed/pub", capabilities=["arbor://topic/publish/feed"])

    with arbor.subscribe("feed") as feed:
        publisher.ask("emit", "feed", [{"k": "a"}, {"k": "b"}, {"k": "c"}])
        events = [feed.poll(timeout=20) for _ in range(3)]

    assert [event.data for event in events if event] == [{"k": "a"}, {"k": "b"}, {"k": "c"}]
    assert [event.publisher for event in events if event] == ["feed/pub"] * 3
    assert [event.seq for event in events if event] == [1, 2, 3]
    assert feed.closed
    assert arbor.subscriptions("feed") == []


def test_client_overflow_skips_oldest(cluster: str) -> None:
    with arbor.subscribe("burst", max_lag=3) as burst:
        for n in range(1, 11):
            arbor.publish("burst", n)
        # The registry reads every topic's head each second, so it has seen all ten by now.
        time.sleep(1.5)
        received = [burst.poll(timeout=20) for _ in range(3)]
        info = subscription("burst", burst.id)

    assert [event.data for event in received if event] == [8, 9, 10]
    assert burst.skipped == 7
    assert info.skipped == 7


def test_client_async_iterator_closes(cluster: str) -> None:
    async def consume() -> list[Any]:
        received = []
        subscription = arbor.subscribe("async/feed")
        for n in range(4):
            arbor.publish("async/feed", n)
        async for event in subscription:
            received.append(event.data)
            if len(received) == 4:
                await subscription.aclose()
        return received

    assert asyncio.run(asyncio.wait_for(consume(), 30)) == [0, 1, 2, 3]


def test_client_close_ends_iteration(cluster: str) -> None:
    subscription = arbor.subscribe("quiet")
    started = time.monotonic()
    threading.Timer(0.5, subscription.close).start()

    assert list(subscription) == []
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("timeout", [-1, float("nan"), "1", True])
def test_client_poll_rejects_bad_timeout(cluster: str, timeout: Any) -> None:
    with arbor.subscribe("quiet") as subscription:
        with pytest.raises(arbor.InvalidArguments, match="timeout="):
            subscription.poll(timeout=timeout)
        with pytest.raises(arbor.InvalidArguments, match="timeout="):
            asyncio.run(subscription.poll_async(timeout=timeout))
        assert subscription.poll(timeout=0) is None


def test_unsubscribe_stops_deliveries(cluster: str) -> None:
    ref = listener("alerts/l1", "alerts")
    arbor.publish("alerts", "first")
    wait_for(lambda: ref.ask("count") == 1, 30, "the first alert")

    assert ref.ask("leave", "alerts") is True
    arbor.publish("alerts", "second")
    time.sleep(2.0)

    assert ref.ask("received") == [["alerts", "first"]]
    assert arbor.subscriptions("alerts") == []
    assert ref.ask("leave", "alerts") is False


def test_subscription_survives_registry_crash(cluster: str) -> None:
    ref = listener("durable/l1", "durable")
    registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
    old_pid = ray.get(registry.ping.remote())["pid"]

    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: ray.get(registry.ping.remote())["pid"] != old_pid, 60, "a new registry")
    arbor.publish("durable", "after restart")

    wait_for(lambda: ref.ask("count") == 1, 30, "the event after the restart")
    assert ref.ask("received") == [["durable", "after restart"]]


def test_redelivery_is_deduplicated(cluster: str, cluster_store: Any) -> None:
    ref = listener("dedup/l1", "dedup")
    # A client subscription that never polls keeps the log from being trimmed.
    holder = arbor.subscribe("dedup")
    for n in range(1, 6):
        arbor.publish("dedup", n)
    wait_for(
        lambda: subscription("dedup", "dedup/l1").position == 5, 30, "five recorded deliveries"
    )

    # Rewind the stored position, as if the registry crashed before it recorded it.
    with cluster_store._transaction() as connection:
        connection.execute(
            "UPDATE arbor_subscriptions SET position = 0 WHERE subscriber = %s", ("dedup/l1",)
        )
    registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
    old_pid = ray.get(registry.ping.remote())["pid"]
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: ray.get(registry.ping.remote())["pid"] != old_pid, 60, "a new registry")
    arbor.publish("dedup", 6)

    info = wait_for(
        lambda: (info := subscription("dedup", "dedup/l1")).position == 6 and info,
        30,
        "the sixth recorded delivery",
    )
    holder.close()
    assert info.delivered == 11
    assert ref.ask("received") == [["dedup", n] for n in range(1, 7)]


def test_stopped_agent_loses_subscriptions(cluster: str) -> None:
    listener("gone/l1", "gone")

    arbor.stop("gone/l1")

    assert arbor.subscriptions(subscriber="gone/l1") == []


# --- capabilities and bad input -----------------------------------------------------------


def test_publish_needs_capability(cluster: str, cluster_store: Any) -> None:
    publisher = arbor.spawn(Publisher, "deny/pub", capabilities=["arbor://topic/publish/open"])

    outcome = publisher.ask("try_publish", "closed", {"n": 1})

    assert outcome.startswith("CapabilityDenied: ")
    assert "'deny/pub' may not publish on arbor://topic/publish/closed" in outcome
    assert publisher.ask("try_publish", "open", {"n": 1}) == "published"
    assert cluster_store.topic_heads().get("closed") is None
    denied = cluster_store.list_audit(principal="deny/pub", decision="denied", limit=10)
    assert [entry.resource for entry in denied] == ["arbor://topic/publish/closed"]


def test_subscribe_needs_capability(cluster: str) -> None:
    publisher = arbor.spawn(Publisher, "deny/sub")

    outcome = publisher.ask("try_subscribe", "news")

    assert outcome.startswith("CapabilityDenied: ")
    assert "'deny/sub' may not subscribe on arbor://topic/subscribe/news" in outcome
    assert arbor.subscriptions(subscriber="deny/sub") == []


def test_revoked_subscription_stops(cluster: str, cluster_store: Any) -> None:
    ref = arbor.spawn(Listener, "revoked/l1")
    grant = arbor.grant("revoked/l1", "arbor://topic/subscribe/revoked")
    ref.ask("join", "revoked")
    arbor.publish("revoked", "before")
    wait_for(lambda: ref.ask("count") == 1, 30, "the event before the revocation")

    arbor.revoke(grant.id)
    time.sleep(1.0)
    arbor.publish("revoked", "after")

    wait_for(lambda: arbor.subscriptions("revoked") == [], 30, "the subscription to be deleted")
    assert ref.ask("received") == [["revoked", "before"]]
    denied = cluster_store.list_audit(principal="revoked/l1", decision="denied", limit=10)
    assert [entry.resource for entry in denied] == ["arbor://topic/subscribe/revoked"]


@pytest.mark.parametrize(
    ("topic", "rule"),
    [
        ("", "is invalid"),
        ("bad topic", "is invalid"),
        ("a//b", "is invalid"),
        ("../x", "is invalid"),
        ("t" * 201, "longer than 200"),
        (7, "must be a string"),
    ],
)
def test_invalid_topic_names_rejected(cluster: str, topic: Any, rule: str) -> None:
    with pytest.raises(arbor.InvalidTopicName) as publishing:
        arbor.publish(topic, 1)
    with pytest.raises(arbor.InvalidTopicName):
        arbor.subscribe(topic)

    assert rule in str(publishing.value)


@pytest.mark.parametrize(
    ("event", "detail"),
    [
        (float("nan"), "event: nan is not a finite number"),
        ({"blob": b"x"}, "event['blob']"),
        ({1: "x"}, "event"),
        ("x" * (256 * 1024), "more than the 262144 allowed"),
    ],
)
def test_unserialisable_events_rejected(cluster: str, event: Any, detail: str) -> None:
    with pytest.raises(arbor.InvalidArguments) as caught:
        arbor.publish("bad/events", event)

    assert "event for topic 'bad/events'" in str(caught.value)
    assert detail in str(caught.value)


def test_subscribe_unknown_handler_rejected(cluster: str) -> None:
    ref = arbor.spawn(Listener, "bad/handler", capabilities=["arbor://topic/subscribe/x"])

    with pytest.raises(arbor.HandlerError) as unknown:
        ref.ask("join_with", "x", "missing")
    with pytest.raises(arbor.HandlerError) as wrong:
        ref.ask("join_with", "x", "wrong_signature")

    assert unknown.value.error_type == "arbor.errors.UnknownHandler"
    assert "cannot subscribe to topic 'x': Listener has no handler 'missing'" in str(unknown.value)
    assert wrong.value.error_type == "arbor.errors.InvalidArguments"
    assert "define it as wrong_signature(self, topic, event)" in str(wrong.value)


def test_invalid_max_lag_rejected(cluster: str) -> None:
    with pytest.raises(arbor.InvalidArguments) as caught:
        arbor.subscribe("lagging", max_lag=0)

    assert "max_lag=0 is invalid; pass a positive number of events" in str(caught.value)


def test_event_json_round_trip(cluster: str) -> None:
    event = {"text": "naïve ☃", "big": 2.5e300, "list": [1, None, True]}

    with arbor.subscribe("round/trip") as feed:
        arbor.publish("round/trip", event)
        received = feed.poll(timeout=20)

    assert received is not None
    assert received.data == event
    assert json.dumps(received.data) == json.dumps(event)
