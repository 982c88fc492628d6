"""Timers and durable reminders: firing, recovery, cancelling, listing and bad input.

The store tests run against PostgreSQL and SQLite; the rest share one Ray cluster on
PostgreSQL, with capabilities enforced (the default).
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import ray

import arbor
from arbor.client import ensure_registry
from arbor.config import NAMESPACE, REGISTRY_NAME, get_settings
from arbor.persistence import CheckpointStore, open_store
from arbor.persistence.reminders import ReminderRecord
from arbor.registry.reminder_spec import ReminderRequest, next_due_ms
from tests.conftest import PLACEMENTS, arbor_cluster
from tests.reminder_agents import Heartbeat, Reminded, Ticker, Unreminded

# --- the store, on both databases ---------------------------------------------------------


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[CheckpointStore]:
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path}/arbor.db"
    opened = open_store(url)
    yield opened
    opened.close()


def reminder(name: str, due_ms: int, period_ms: int | None = None, rid: str = "r1") -> Any:
    return ReminderRecord(
        agent="a1",
        name=name,
        id=rid,
        due_ms=due_ms,
        period_ms=period_ms,
        payload_json='{"k":[1,2.5e300]}',
        created_at=datetime(2030, 1, 1, tzinfo=UTC),
    )


def test_store_keeps_reminder_exactly(store: Any) -> None:
    store.save_reminder(reminder("tick", 1_900_000_000_123, 60_000))

    [stored] = store.list_reminders("a1")

    assert stored == reminder("tick", 1_900_000_000_123, 60_000)
    assert store.list_reminders("other") == []


def test_store_advances_only_matching_row(store: Any) -> None:
    store.save_reminder(reminder("tick", 1_000, 500))

    assert store.advance_reminders([("a1", "tick", "stale-id", 1_000, 1_500)]) == 0
    assert store.advance_reminders([("a1", "tick", "r1", 999, 1_500)]) == 0
    assert store.advance_reminders([("a1", "tick", "r1", 1_000, 1_500)]) == 1
    assert store.advance_reminders([("a1", "tick", "r1", 1_000, 2_000)]) == 0

    [stored] = store.list_reminders("a1")
    assert stored.due_ms == 1_500
    assert stored.fired == 1


def test_store_advances_batch(store: Any) -> None:
    store.save_reminder(reminder("once", 1_000))

    store.save_reminder(reminder("tick", 2_000, 500, rid="r2"))

    changed = store.advance_reminders(
        [("a1", "once", "r1", 1_000, None), ("a1", "tick", "r2", 2_000, 2_500)]
    )

    assert changed == 2
    assert [(r.name, r.due_ms) for r in store.list_reminders()] == [("tick", 2_500)]


def test_store_replaces_reminder_set_again(store: Any) -> None:
    store.save_reminder(reminder("tick", 1_000, 500))
    store.advance_reminders([("a1", "tick", "r1", 1_000, 1_500)])

    store.save_reminder(reminder("tick", 9_000, None, rid="r2"))

    [stored] = store.list_reminders("a1")
    assert (stored.id, stored.due_ms, stored.period_ms, stored.fired) == ("r2", 9_000, None, 0)


def test_store_deletes_reminders(store: Any) -> None:
    store.save_reminder(reminder("a", 1_000))
    store.save_reminder(reminder("b", 2_000))

    assert store.delete_reminder("a1", "a")
    assert not store.delete_reminder("a1", "a")
    assert store.delete_reminders("a1") == 1
    assert store.list_reminders() == []


# --- scheduling rules ---------------------------------------------------------------------


def test_next_due_skips_missed_periods() -> None:
    assert next_due_ms(due_ms=1_000, period_ms=100, now_ms=1_000) == 1_100
    assert next_due_ms(due_ms=1_000, period_ms=100, now_ms=1_050) == 1_100
    assert next_due_ms(due_ms=1_000, period_ms=100, now_ms=1_100) == 1_200
    assert next_due_ms(due_ms=1_000, period_ms=100, now_ms=1_549) == 1_600
    assert next_due_ms(due_ms=1_000, period_ms=100, now_ms=900) == 1_100


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"delay": -1}, "delay=-1 is invalid; pass a number of seconds >= 0"),
        ({"delay": math.nan}, "delay=nan is invalid"),
        ({"delay": True}, "delay=True is invalid"),
        ({"at": 10.0, "delay": 1}, "at=10.0 and delay=1 were both given; pass at="),
        ({}, "has no time; pass at= (a datetime or Unix seconds), delay="),
        ({"at": datetime(2030, 1, 1)}, "has no time zone; pass an aware datetime"),
        ({"at": "tomorrow"}, "at='tomorrow' is invalid; pass a timezone-aware datetime"),
        ({"every": 0.5}, "every=0.5 is invalid; pass a number of seconds >= 1 (ARBOR_"),
        ({"delay": 1, "payload": b"raw"}, "payload is not JSON: bytes is not JSON"),
        ({"delay": 1, "payload": {"x": math.inf}}, "payload['x'] is not JSON: inf is not"),
        ({"delay": 1, "payload": "x" * 70_000}, "over the limit of 65536"),
    ],
)
def test_request_rejects_bad_input(options: dict[str, Any], expected: str) -> None:
    with pytest.raises(arbor.InvalidArguments) as caught:
        ReminderRequest.parse("a1", "tick", **options)

    assert expected in str(caught.value)
    assert "'a1'" in str(caught.value)


@pytest.mark.parametrize(("name", "expected"), [("", "pass a non-empty string"), (7, "7")])
def test_request_rejects_bad_name(name: Any, expected: str) -> None:
    with pytest.raises(arbor.InvalidArguments, match="reminder name") as caught:
        ReminderRequest.parse("a1", name, delay=1)

    assert expected in str(caught.value)


# --- on a Ray cluster ---------------------------------------------------------------------


@pytest.fixture(scope="module", params=PLACEMENTS)
def cluster(request: pytest.FixtureRequest) -> Iterator[str]:
    with arbor_cluster(request.param) as url:
        yield url


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def names(deliveries: list[list[Any]], name: str) -> list[list[Any]]:
    return [delivery for delivery in deliveries if delivery[0] == name]


def periodic_times(agent: str, minimum: int) -> list[float]:
    """Wait until ``agent`` has ``minimum`` periodic deliveries; return their times, sorted."""

    def times() -> list[float]:
        deliveries = arbor.get(agent).ask("received", timeout=60)
        return sorted(delivery[2] for delivery in names(deliveries, "periodic"))

    wait_for(lambda: len(times()) >= minimum, 60, f"{minimum} periodic deliveries")
    return times()


def first_boundary_after(first_due: float, period: float, moment: float) -> float:
    """Return the first time after ``moment`` on the schedule ``first_due + k * period``."""
    return first_due + (math.floor((moment - first_due) / period) + 1) * period


def test_reminder_fires_with_payload(cluster: str) -> None:
    assert get_settings().enforce_capabilities
    ref = arbor.spawn(Reminded, "rem/basic")
    set_at = time.time()

    info = ref.ask("remind", "once", delay=0.5, payload={"job": [1, "two"]})
    deliveries = wait_for(lambda: ref.ask("received"), 10, "the reminder")

    assert info["every"] is None
    assert abs(info["due"] - (set_at + 0.5)) < 0.5
    assert [[name, payload] for name, payload, _ in deliveries] == [["once", {"job": [1, "two"]}]]
    assert deliveries[0][2] >= info["due"]
    # The one-shot row is deleted once the registry records the agent's reply.
    wait_for(lambda: arbor.reminders("rem/basic") == [], 10, "the row to be deleted")


def test_reminder_fires_after_agent_process_killed(cluster: str) -> None:
    ref = arbor.spawn(Reminded, "rem/crash")
    info = ref.ask("remind", "after-crash", delay=2.0)
    time.sleep(1.0)
    old_pid = ref.info()["pid"]

    os.kill(old_pid, signal.SIGKILL)
    deliveries = wait_for(lambda: ref.ask("received", timeout=30), 20, "the reminder")
    time.sleep(1.0)

    assert [delivery[0] for delivery in ref.ask("received")] == ["after-crash"]
    assert deliveries[0][2] >= info["due"]
    assert ref.info()["pid"] != old_pid


def test_reminders_due_during_outage_fire_once(cluster: str) -> None:
    ref = arbor.spawn(Reminded, "rem/outage")
    ref.ask("remind", "once", delay=1.0)
    first_due = ref.ask("remind", "periodic", delay=1.0, every=1.0)["due"]
    registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
    # The agent's own actor, or for a hosted agent its host.
    actor = next(info.actor for info in arbor.list_agents() if info.name == "rem/outage")
    agent_actor = ray.get_actor(actor, namespace=NAMESPACE)

    # The registry and the agent are gone for 5 s, past both due times and 4 periods.
    ray.kill(registry, no_restart=True)
    ray.kill(agent_actor, no_restart=True)
    time.sleep(5.0)
    restarted_at = time.time()
    ensure_registry()
    periodic = periodic_times("rem/outage", 2)
    # The two reminders are delivered independently, so the one-shot may come later.
    wait_for(lambda: names(arbor.get("rem/outage").ask("received"), "once"), 20, "the one-shot")
    time.sleep(1.0)
    deliveries = arbor.get("rem/outage").ask("received")

    assert len(names(deliveries, "once")) == 1
    assert periodic[0] >= restarted_at
    # One delivery stands for the missed periods, and the next waits for the schedule.
    assert periodic[1] >= first_boundary_after(first_due, 1.0, periodic[0]) - 0.001


def test_cancelled_reminders_never_fire(cluster: str) -> None:
    ref = arbor.spawn(Reminded, "rem/cancel")
    ref.ask("remind", "by-agent", delay=1.0)
    ref.ask("remind", "by-operator", delay=1.0, every=1.0)

    assert ref.ask("cancel", "by-agent") is True
    assert arbor.cancel_reminder("rem/cancel", "by-operator") is True
    assert ref.ask("cancel", "by-agent") is False
    time.sleep(2.5)

    assert ref.ask("received") == []
    assert arbor.reminders("rem/cancel") == []


def test_periodic_reminder_fires_and_lists(cluster: str) -> None:
    ref = arbor.spawn(Reminded, "rem/periodic")
    ref.ask("remind", "beat", every=1.0, payload="p")

    # A firing is sent only after the previous one is recorded, so 3 are recorded after 4.
    wait_for(lambda: len(ref.ask("received")) >= 4, 10, "four firings")
    [listed] = ref.ask("listed")
    [info] = arbor.reminders("rem/periodic")
    ref.ask("cancel", "beat")
    count = len(ref.ask("received"))
    time.sleep(1.5)

    assert listed[0] == "beat"
    assert listed[2:4] == [1.0, "p"]
    assert listed[4] >= 3
    assert info.name == "beat"
    assert info.agent == "rem/periodic"
    assert info.every == 1.0
    assert info.due_at > datetime.now(UTC) - timedelta(seconds=1)
    assert len(ref.ask("received")) == count
    assert arbor.reminders("rem/periodic") == []


def test_reminder_set_again_replaces_it(cluster: str) -> None:
    ref = arbor.spawn(Reminded, "rem/replace")
    ref.ask("remind", "job", delay=30.0, payload="first")
    ref.ask("remind", "job", at=datetime.now(UTC) + timedelta(seconds=0.5), payload="second")

    deliveries = wait_for(lambda: ref.ask("received"), 10, "the replaced reminder")

    assert [delivery[:2] for delivery in deliveries] == [["job", "second"]]
    wait_for(lambda: arbor.reminders("rem/replace") == [], 10, "the row to be deleted")


def test_stopped_agent_loses_reminders(cluster: str) -> None:
    ref = arbor.spawn(Reminded, "rem/stopped")
    ref.ask("remind", "later", delay=60.0)
    purged = arbor.spawn(Reminded, "rem/purged")
    purged.ask("remind", "later", delay=60.0)

    arbor.stop("rem/stopped")
    arbor.stop("rem/purged", purge=True)

    assert arbor.reminders("rem/stopped") == []
    # A purged agent has no record left to list reminders of, and none of its remain.
    with pytest.raises(arbor.AgentNotFound, match="rem/purged"):
        arbor.reminders("rem/purged")
    assert "rem/purged" not in {info.agent for info in arbor.reminders(namespace="*")}


def test_remind_without_handler_names_agent_and_fix(cluster: str) -> None:
    ref = arbor.spawn(Unreminded, "rem/nohandler")

    with pytest.raises(arbor.HandlerError) as caught:
        ref.ask("remind", "tick", delay=1.0)

    assert caught.value.error_type == "arbor.errors.UnknownHandler"
    assert (
        "agent 'rem/nohandler' cannot set reminder 'tick': Unreminded has no handler "
        "on_reminder; define on_reminder(self, name, payload) on Unreminded"
    ) in str(caught.value)
    assert arbor.reminders("rem/nohandler") == []


def test_remind_bad_input_reaches_caller(cluster: str) -> None:
    ref = arbor.spawn(Reminded, "rem/bad")

    with pytest.raises(arbor.HandlerError) as caught:
        ref.ask("remind", "tick", delay=-2)

    assert caught.value.error_type == "arbor.errors.InvalidArguments"
    assert "agent 'rem/bad' reminder 'tick': delay=-2 is invalid" in str(caught.value)
    assert arbor.reminders("rem/bad") == []


def test_agent_cannot_manage_other_agents_reminders(cluster: str) -> None:
    arbor.spawn(Reminded, "rem/victim")
    registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
    request = ReminderRequest.parse("rem/victim", "tick", delay=1.0)

    for call in (
        registry.set_reminder.remote("rem/victim", request, "rem/intruder"),
        registry.reminders.remote("rem/victim", "rem/intruder"),
        registry.reminders.remote(None, "rem/intruder"),
        registry.cancel_reminder.remote("rem/victim", "tick", "rem/intruder"),
    ):
        with pytest.raises(ray.exceptions.RayTaskError) as caught:
            ray.get(call, timeout=30)
        assert isinstance(caught.value.cause, arbor.InvalidArguments)
        assert "agent 'rem/intruder' cannot manage the reminders of " in str(caught.value.cause)
        assert "an agent manages only its own" in str(caught.value.cause)
    assert arbor.reminders("rem/victim") == []


def test_operator_reminder_calls_check_agent(cluster: str) -> None:
    registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
    request = ReminderRequest.parse("rem/missing", "tick", delay=1.0)

    with pytest.raises(ray.exceptions.RayTaskError) as caught:
        ray.get(registry.set_reminder.remote("rem/missing", request), timeout=30)

    assert isinstance(caught.value.cause, arbor.AgentNotFound)
    with pytest.raises(arbor.AgentNotFound, match="rem/missing"):
        arbor.cancel_reminder("rem/missing", "tick")
    with pytest.raises(arbor.AgentNotFound, match="rem/missing"):
        arbor.reminders("rem/missing")


# --- timers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_ticker(cluster: str) -> arbor.AgentRef:
    return arbor.spawn(Ticker, "tim/bad")


def test_timers_fire_in_due_order(cluster: str) -> None:
    ref = arbor.spawn(Ticker, "tim/order")
    ref.ask("start", "c", delay=0.6)
    ref.ask("start", "a", delay=0.2)
    ref.ask("start_method", "b", delay=0.4)

    events = wait_for(lambda: len(ref.ask("log")) == 3 and ref.ask("log"), 10, "three timers")

    assert [event[0] for event in events] == ["a", "b", "c"]


def test_timer_waits_for_running_message(cluster: str) -> None:
    ref = arbor.spawn(Ticker, "tim/queue")
    ref.ask("start", "tick", delay=0.1)

    ref.ask("slow", 1.0)
    events = wait_for(lambda: len(ref.ask("log")) == 2 and ref.ask("log"), 10, "the timer")

    assert [event[0] for event in events] == ["slow", "tick"]
    slow_end, tick_at = events[0][2], events[1][1]
    assert tick_at >= slow_end


def test_periodic_timer_fires_until_cancelled(cluster: str) -> None:
    ref = arbor.spawn(Ticker, "tim/periodic")
    timer_id = ref.ask("start", "beat", every=0.2)

    wait_for(lambda: len(ref.ask("log")) >= 4, 10, "four ticks")
    assert ref.ask("cancel", timer_id) is True
    time.sleep(0.3)
    count = len(ref.ask("log"))
    time.sleep(0.6)

    assert len(ref.ask("log")) == count
    assert ref.ask("cancel", timer_id) is False


def test_timers_die_with_incarnation(cluster: str) -> None:
    ref = arbor.spawn(Ticker, "tim/crash")
    ref.ask("start", "beat", every=0.2)
    wait_for(lambda: len(ref.ask("log")) >= 2, 10, "two ticks")

    os.kill(ref.info()["pid"], signal.SIGKILL)
    count = len(ref.ask("log", timeout=30))
    time.sleep(1.0)

    assert ref.info()["incarnation"] == 2
    assert len(ref.ask("log")) == count


def test_timer_from_on_start_runs_each_incarnation(cluster: str) -> None:
    ref = arbor.spawn(Heartbeat, "tim/heartbeat")
    wait_for(lambda: len(ref.ask("log")) >= 2, 10, "two beats")

    os.kill(ref.info()["pid"], signal.SIGKILL)

    def second_incarnation_beats() -> list[list[Any]]:
        return [beat for beat in ref.ask("log", timeout=30) if beat[0] == 2]

    wait_for(lambda: len(second_incarnation_beats()) >= 2, 10, "two beats of incarnation 2")
    beats = second_incarnation_beats()[:2]

    assert len(beats) == 2
    assert beats[1][1] > beats[0][1]


@pytest.mark.parametrize(
    ("handler", "options", "expected"),
    [
        ("tick", {"delay": -1}, "timer for 'tick': delay=-1 is invalid; pass a number of seconds"),
        ("tick", {"every": 0}, "every=0 is invalid; pass a number of seconds > 0"),
        ("tick", {}, "timer for 'tick' has no time; pass delay="),
        ("nope", {"delay": 1}, "cannot schedule a timer: Ticker has no handler 'nope'"),
        ("_private", {"delay": 1}, "'_private' is private and cannot be called"),
        (len, {"delay": 1}, "pass the name of one of its handlers, or a bound method"),
    ],
)
def test_schedule_rejects_bad_input(
    bad_ticker: arbor.AgentRef, handler: Any, options: dict[str, Any], expected: str
) -> None:
    with pytest.raises(arbor.HandlerError) as caught:
        bad_ticker.ask("schedule_raw", handler, **options)

    assert expected in str(caught.value)
    assert caught.value.error_message.startswith("agent 'tim/bad'")
    assert bad_ticker.ask("log") == []


# --- a new Ray cluster; this test replaces the module's cluster, so it runs last ----------


def test_new_cluster_fires_missed_reminders_once(cluster: str, tmp_path: Any) -> None:
    sqlite_url = f"sqlite:///{tmp_path}/arbor.db"
    arbor.shutdown()
    try:
        arbor.init(database_url=sqlite_url, num_cpus=2, object_store_memory=100 * 1024**2)
        ref = arbor.spawn(Reminded, "rem/new-cluster")
        ref.ask("remind", "once", delay=1.0)
        first_due = ref.ask("remind", "periodic", delay=1.0, every=1.0)["due"]
        down_at = time.monotonic()
        arbor.shutdown()
        time.sleep(max(5.0 - (time.monotonic() - down_at), 0))

        restarted_at = time.time()
        arbor.init(database_url=sqlite_url, num_cpus=2, object_store_memory=100 * 1024**2)
        periodic = periodic_times("rem/new-cluster", 2)
        # The two reminders are delivered independently, so the one-shot may come later.
        wait_for(
            lambda: names(arbor.get("rem/new-cluster").ask("received"), "once"),
            20,
            "the one-shot",
        )
        time.sleep(1.0)
        deliveries = arbor.get("rem/new-cluster").ask("received")
    finally:
        arbor.shutdown()
        arbor.init(database_url=cluster, num_cpus=2, object_store_memory=100 * 1024**2)

    assert len(names(deliveries, "once")) == 1
    assert periodic[0] >= restarted_at
    assert periodic[1] >= first_boundary_after(first_due, 1.0, periodic[0]) - 0.001
