"""Hosted agents: isolation of host-mates, host crashes, passivation, scale, local delivery."""

from __future__ import annotations

import collections
import concurrent.futures
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import ray

import arbor
from arbor.config import NAMESPACE
from arbor.names import qualify
from arbor.persistence import open_store
from arbor.registry.spec import build_spawn_spec
from arbor.runtime.ref import registry_handle
from tests.agents import Counter, Lifecycle, Peer, Picky, Poison, Sleeper
from tests.conftest import arbor_cluster

HOSTED: dict[str, Any] = {"placement": "hosted"}


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[str]:
    with arbor_cluster("dedicated", {"ARBOR_HOST_THREADS": "8"}) as url:
        yield url


def host_of(name: str) -> Any:
    actor = next(info.actor for info in arbor.list_agents() if info.name == name)
    return ray.get_actor(actor, namespace=NAMESPACE)


def host_gone(name: str) -> bool:
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return True
    return False


def host_report(name: str) -> dict[str, Any]:
    report: dict[str, Any] = ray.get(host_of(name).ping.remote(), timeout=30)
    return report


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def test_hosted_agents_share_a_host_process() -> None:
    first = arbor.spawn(Counter, "h/share-a", placement="hosted")
    second = arbor.spawn(Counter, "h/share-b", placement="hosted")

    assert first.info()["pid"] == second.info()["pid"]
    infos = {info.name: info for info in arbor.list_agents()}
    assert infos["h/share-a"].placement == "hosted"
    assert infos["h/share-a"].actor.startswith("arbor-host-")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"placement": "nowhere"}, "placement='nowhere' is invalid"),
        ({"placement": "hosted", "num_cpus": 1}, "cannot be combined with num_cpus"),
        ({"placement": "hosted", "spread": True}, "cannot be combined with spread"),
        ({"passivate_idle_s": 5}, "hosted agents only"),
        ({"placement": "hosted", "passivate_idle_s": -1}, "passivate_idle_s=-1"),
        ({"placement": "hosted", "passivate_idle_s": "soon"}, "passivate_idle_s='soon'"),
        ({"placement": "hosted", "passivate_idle_s": float("inf")}, "passivate_idle_s=inf"),
        ({"placement": "hosted", "passivate_idle_s": float("nan")}, "passivate_idle_s=nan"),
        ({"placement": "dedicated", "passivate_idle_s": 5}, "hosted agents only"),
    ],
)
def test_invalid_hosted_options_are_rejected(options: dict[str, Any], message: str) -> None:
    with pytest.raises(arbor.InvalidArguments, match=message):
        arbor.spawn(Counter, "h/bad-options", **options)
    assert "h/bad-options" not in {info.name for info in arbor.list_agents()}


def test_passivation_uses_cluster_placement(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry's ARBOR_DEFAULT_PLACEMENT decides, not the spawning process's."""
    from arbor.config import reset_settings

    monkeypatch.setenv("ARBOR_DEFAULT_PLACEMENT", "hosted")
    reset_settings()
    try:
        with pytest.raises(arbor.InvalidArguments, match="ARBOR_DEFAULT_PLACEMENT is 'dedicated'"):
            arbor.spawn(Counter, "h/driver-default", passivate_idle_s=5)
    finally:
        monkeypatch.undo()
        reset_settings()
    assert "h/driver-default" not in {info.name for info in arbor.list_agents()}


def run_poisoned(poison: arbor.AgentRef, handler: str, mates: list[arbor.AgentRef]) -> None:
    """Ask the poisoned handler in a thread while its host-mates reply to their own messages."""
    outcome: dict[str, Any] = {}

    def ask_poisoned() -> None:
        try:
            poison.ask(handler, timeout=60)
        except BaseException as error:
            outcome["error"] = error
        outcome["finished_at"] = time.monotonic()

    worker = threading.Thread(target=ask_poisoned)
    worker.start()
    time.sleep(0.2)
    answered_at = []
    for round_number in range(5):
        for mate in mates:
            assert mate.ask("add", 1, timeout=30) == round_number + 1
        answered_at.append(time.monotonic())
    worker.join(60)

    assert isinstance(outcome.get("error"), arbor.AskTimeout)
    assert "1 s limit" in str(outcome["error"])
    # Every host-mate replied while the poisoned handler was still running.
    assert answered_at[0] < outcome["finished_at"]


def test_spinning_handler_leaves_host_mates_answering() -> None:
    mates = [arbor.spawn(Counter, f"h/spin-mate-{index}", **HOSTED) for index in range(3)]
    poison = arbor.spawn(Poison, "h/spin", **HOSTED)
    poison.ask("add")

    run_poisoned(poison, "spin", mates)

    # The agent restarted from its checkpoint without the timed-out change.
    assert poison.ask("get", timeout=30) == 1
    assert poison.ask("add") == 2
    # The host raised an exception in the spinning thread, which ended the loop.
    wait_for(lambda: host_report("h/spin")["abandoned_threads"] == 0, 20, "the thread to end")


def test_stalled_async_handler_leaves_host_mates_answering() -> None:
    mates = [arbor.spawn(Counter, f"h/stall-mate-{index}", **HOSTED) for index in range(3)]
    poison = arbor.spawn(Poison, "h/stall", **HOSTED)
    poison.ask("add")

    run_poisoned(poison, "stall", mates)

    assert poison.ask("get", timeout=30) == 1
    assert host_report("h/stall")["abandoned_threads"] == 0


def test_retry_of_timed_out_hosted_message_gets_same_error() -> None:
    poison = arbor.spawn(Poison, "h/spin-retry", **HOSTED)
    with pytest.raises(arbor.AskTimeout):
        poison.ask("spin", message_id="spin-1", timeout=60)

    started = time.monotonic()
    with pytest.raises(arbor.AskTimeout, match="limit"):
        poison.ask("spin", message_id="spin-1", timeout=60)

    assert time.monotonic() - started < 1.0
    assert poison.ask("get") == 0


def test_raising_handler_leaves_agent_and_host_mates() -> None:
    mate = arbor.spawn(Counter, "h/raise-mate", **HOSTED)
    poison = arbor.spawn(Poison, "h/raise", **HOSTED)

    with pytest.raises(arbor.HandlerError, match="poisoned on purpose"):
        poison.ask("crash")

    assert mate.ask("add", 2) == 2
    assert poison.ask("add") == 1


def test_passivated_agent_keeps_state_and_comes_back() -> None:
    ref = arbor.spawn(Lifecycle, "h/idle", passivate_idle_s=0.3, **HOSTED)
    ref.ask("add")
    ref.ask("add")
    host = host_of("h/idle")

    wait_for(lambda: "h/idle" not in ray.get(host.active_agents.remote()), 10, "the passivation")
    listed = next(info for info in arbor.list_agents() if info.name == "h/idle")
    assert listed.status == "running"
    assert listed.passivated

    # Reactivation restores the checkpoint; it is no recovery, so on_recover is not called.
    assert ref.ask("state") == {"count": 2, "recoveries": []}
    assert "h/idle" in ray.get(host.active_agents.remote())
    assert ref.info()["incarnation"] == 2
    listed = next(info for info in arbor.list_agents() if info.name == "h/idle")
    assert not listed.passivated


def test_stop_of_passivated_agent(cluster: str) -> None:
    ref = arbor.spawn(Lifecycle, "h/idle-stop", passivate_idle_s=0.3, **HOSTED)
    ref.ask("add")
    host = host_of("h/idle-stop")
    wait_for(
        lambda: "h/idle-stop" not in ray.get(host.active_agents.remote()), 10, "the passivation"
    )

    arbor.stop("h/idle-stop")

    store = open_store(cluster)
    try:
        checkpoint = store.load_checkpoint("h/idle-stop")
        record = store.get_agent("h/idle-stop")
    finally:
        store.close()
    assert checkpoint is not None
    assert (checkpoint.state["count"], checkpoint.state["stopped"]) == (1, True)
    assert record is not None
    assert record.status == "stopped"
    assert "h/idle-stop" not in ray.get(host.active_agents.remote())
    with pytest.raises(arbor.AgentNotFound):
        ref.ask("add")


def test_outbox_sends_pass_hosted_mailbox_limit() -> None:
    target = arbor.spawn(Peer, "h/limit-target", max_pending=1, **HOSTED)
    sender = arbor.spawn(Peer, "h/limit-sender", **HOSTED)
    arbor.grant("h/limit-sender", "arbor://agent/send/h/limit-target")

    sender.ask("fan_out", "h/limit-target", 5)

    def received() -> list[Any]:
        try:
            items: list[Any] = target.ask("items")
        except arbor.AgentOverloaded:
            # An ask is refused while the queued sends fill the mailbox.
            return []
        return items

    # Outbox sends are not refused at the limit, so none of the five is lost.
    assert wait_for(lambda: received() == [0, 1, 2, 3, 4], 30, "the five sends")


def test_outbox_drops_send_to_stopped_agent(cluster: str) -> None:
    arbor.spawn(Peer, "h/gone", **HOSTED)
    arbor.stop("h/gone")
    sender = arbor.spawn(Peer, "h/to-gone", **HOSTED)
    arbor.grant("h/to-gone", "arbor://agent/send/h/gone")
    sender.ask("fan_out", "h/gone", 1)

    def outbox_is_empty() -> bool:
        sender.ask("append", "tick")
        store = open_store(cluster, migrate=False)
        try:
            checkpoint = store.load_checkpoint("h/to-gone")
        finally:
            store.close()
        return checkpoint is not None and checkpoint.outbox == []

    # The dispatch learns that the target is stopped and drops the message for good.
    wait_for(outbox_is_empty, 30, "the outbox to drop the send")


def test_agent_with_timer_is_not_passivated() -> None:
    from tests.reminder_agents import Ticker

    ref = arbor.spawn(Ticker, "h/ticking", passivate_idle_s=0.2, **HOSTED)
    ref.ask("start", "beat", every=5.0)
    time.sleep(1.0)

    assert "h/ticking" in ray.get(host_of("h/ticking").active_agents.remote())


@pytest.mark.parametrize("durability", ["durable", "batched"])
def test_host_kill_under_load_loses_no_acknowledged_update(durability: str) -> None:
    names = [f"h/load-{durability}-{index}" for index in range(12)]
    for name in names:
        arbor.spawn(Counter, name, durability=durability, **HOSTED)
    acknowledged: collections.Counter[str] = collections.Counter()
    errors: list[BaseException] = []
    stop = threading.Event()

    def load(share: list[str]) -> None:
        refs = [arbor.get(name) for name in share]
        try:
            while not stop.is_set():
                for ref in refs:
                    ref.ask("add", 1, timeout=60)
                    acknowledged[ref.name] += 1
        except BaseException as error:
            errors.append(error)

    workers = [threading.Thread(target=load, args=(names[index::3],)) for index in range(3)]
    for worker in workers:
        worker.start()
    wait_for(lambda: sum(acknowledged.values()) >= 60, 30, "the first acknowledged updates")
    old_pid = host_report(names[0])["pid"]
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: sum(acknowledged.values()) >= 200, 60, "updates after the kill")
    stop.set()
    for worker in workers:
        worker.join(120)

    assert errors == []
    assert host_report(names[0])["pid"] != old_pid
    for name in names:
        assert arbor.get(name).ask("get") == acknowledged[name]


def test_local_delivery_keeps_order_and_counts() -> None:
    sender = arbor.spawn(Peer, "h/peer-a", capabilities=["arbor://agent/*/h/peer-b"], **HOSTED)
    receiver = arbor.spawn(Peer, "h/peer-b", **HOSTED)
    before = host_report("h/peer-a")["local_deliveries"]

    sender.ask("fan_out", "h/peer-b", 50)
    wait_for(lambda: len(receiver.ask("items")) == 50, 10, "50 sends")
    assert receiver.ask("items") == list(range(50))
    assert sender.ask("fan_out_async", "h/peer-b", 50, 20) == 70
    assert receiver.ask("items") == list(range(70))

    # 50 sends, then 21 ask calls, and none of them went through Ray.
    assert host_report("h/peer-a")["local_deliveries"] - before == 71


def test_local_delivery_deduplicates_by_message_id() -> None:
    sender = arbor.spawn(Peer, "h/dedup-a", capabilities=["arbor://agent/*/h/dedup-b"], **HOSTED)
    receiver = arbor.spawn(Peer, "h/dedup-b", **HOSTED)

    assert sender.ask("ask_with_id", "h/dedup-b", "x", "once-1") == 1
    assert sender.ask("ask_with_id", "h/dedup-b", "y", "once-1") == 1
    assert receiver.ask("items") == ["x"]


def test_local_delivery_copies_mutable_arguments() -> None:
    sender = arbor.spawn(Peer, "h/copy-a", capabilities=["arbor://agent/*/h/copy-b"], **HOSTED)
    arbor.spawn(Peer, "h/copy-b", **HOSTED)

    assert sender.ask("share", "h/copy-b") == [[1, 2]]


def test_local_delivery_checks_capabilities() -> None:
    sender = arbor.spawn(Peer, "h/nocap-a", **HOSTED)
    receiver = arbor.spawn(Peer, "h/nocap-b", **HOSTED)

    with pytest.raises(arbor.HandlerError, match="CapabilityDenied"):
        sender.ask("ask_with_id", "h/nocap-b", "x", "denied-1")
    assert receiver.ask("items") == []


def test_local_ask_times_out_and_still_runs() -> None:
    sender = arbor.spawn(Peer, "h/nap-a", capabilities=["arbor://agent/*/h/nap-b"], **HOSTED)
    receiver = arbor.spawn(Peer, "h/nap-b", **HOSTED)
    before = host_report("h/nap-a")["local_deliveries"]

    started = time.monotonic()
    assert sender.ask("ask_nap", "h/nap-b", 1.5, 0.2) == "AskTimeout"
    assert time.monotonic() - started < 1.2
    # A timeout does not take the message back: the nap ends and is recorded.
    wait_for(lambda: receiver.ask("items") == ["napped"], 10, "the nap to end")
    assert sender.ask("ask_nap", "h/nap-b", 0.05, 5.0) == "replied"
    assert host_report("h/nap-a")["local_deliveries"] - before == 2


def test_hosted_agent_moves_when_its_host_is_gone() -> None:
    ref = arbor.spawn(Counter, "h/orphan", start=4, **HOSTED)
    ref.ask("add", 1)
    old_host = host_of("h/orphan")
    old_name = next(info.actor for info in arbor.list_agents() if info.name == "h/orphan")

    ray.kill(old_host, no_restart=True)
    # The kill takes effect a moment later; an ask sent before it would reach the old host.
    wait_for(lambda: host_gone(old_name), 30, "the host's death")

    assert ref.ask("get", timeout=60) == 5
    new_name = next(info.actor for info in arbor.list_agents() if info.name == "h/orphan")
    assert new_name != old_name


def test_two_thousand_hosted_agents_run() -> None:
    count = 2000
    names = [f"h/many/{index}" for index in range(count)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        refs = list(
            pool.map(
                lambda index: arbor.spawn(Counter, names[index], start=index, **HOSTED),
                range(count),
            )
        )
        values = list(pool.map(lambda ref: ref.ask("add", 1, timeout=60), refs))

    assert values == [index + 1 for index in range(count)]
    running = {info.name for info in arbor.list_agents("running")}
    assert set(names) <= running


@ray.remote(num_cpus=0)
class _Sender:
    """A separate sending process, so that no sender reaches the limit on its own."""

    def ready(self) -> bool:
        return True

    def ask(self, name: str, seconds: float) -> str:
        try:
            arbor.get(name).ask("nap", seconds, timeout=60)
        except arbor.AgentOverloaded as error:
            return f"overloaded: {error}"
        return "ok"


def test_hosted_mailbox_limit_counts_every_sender() -> None:
    arbor.spawn(Sleeper, "h/limited", placement="hosted", max_pending=2)
    senders = [_Sender.remote() for _ in range(4)]
    ray.get([sender.ready.remote() for sender in senders], timeout=120)

    outcomes = ray.get([sender.ask.remote("h/limited", 2.0) for sender in senders], timeout=120)

    # Each process sent one message, under the limit of 2; the host counted all four.
    assert sorted(outcome.split(":")[0] for outcome in outcomes) == [
        "ok",
        "ok",
        "overloaded",
        "overloaded",
    ]
    overloaded = next(outcome for outcome in outcomes if outcome.startswith("overloaded"))
    assert "'h/limited' already has 2 unfinished messages, its max_pending limit" in overloaded
    for sender in senders:
        ray.kill(sender)


def test_hosted_spawn_commits_once(cluster: str) -> None:
    arbor.spawn(Counter, "hosted/committed", 6, **HOSTED)

    store = open_store(cluster)
    try:
        record = store.get_agent("hosted/committed")
        checkpoint = store.load_checkpoint("hosted/committed")
        resource = "arbor://agent/spawn/hosted/committed"
        rows = [
            row for row in store.list_audit(resource_prefix=resource) if row.resource == resource
        ]
        assert record is not None
        assert (record.status, record.epoch, record.checkpoint_version) == ("running", 1, 1)
        assert record.options["host"] == host_report("hosted/committed")["name"]
        assert checkpoint is not None
        assert (checkpoint.version, checkpoint.state["count"]) == (1, 6)
        assert [(row.action, row.decision) for row in rows] == [("spawn", "allowed")]
        assert store.verify_audit().ok
    finally:
        store.close()


def test_hosted_spawn_of_taken_name() -> None:
    ref = arbor.spawn(Counter, "hosted/owner", 4, **HOSTED)
    ref.ask("add", 1)
    before = ref.info()

    with pytest.raises(arbor.NameTaken):
        arbor.spawn(Counter, "hosted/owner", 100, **HOSTED)
    with pytest.raises((arbor.NameTaken, arbor.HandlerError)):
        arbor.spawn(Picky, "hosted/owner", fail=True, **HOSTED)

    after = ref.info()
    assert (after["pid"], after["incarnation"]) == (before["pid"], before["incarnation"])
    assert arbor.get("hosted/owner").ask("get") == 5
    assert [agent.status for agent in arbor.list_agents() if agent.name == "hosted/owner"] == [
        "running"
    ]


def test_hosted_spawn_after_host_is_killed() -> None:
    arbor.spawn(Counter, "h/before-kill", **HOSTED)
    host = host_of("h/before-kill")
    name = host_report("h/before-kill")["name"]
    ray.kill(host, no_restart=True)
    wait_for(lambda: host_gone(name), 30, "the host's death")

    # Some spawns choose the killed host before the reconciler notices; they start elsewhere.
    refs = [arbor.spawn(Counter, f"h/after-kill/{index}", index, **HOSTED) for index in range(4)]

    assert [ref.ask("get") for ref in refs] == [0, 1, 2, 3]
    hosts = {info.actor for info in arbor.list_agents() if info.name.startswith("h/after-kill/")}
    assert name not in hosts


def test_retried_hosted_spawn() -> None:
    name = qualify("hosted/retried", arbor.current_namespace())
    spec = build_spawn_spec(Counter, name, (3,), dict(HOSTED))
    registry = registry_handle()

    first = ray.get(registry.spawn.remote(spec))
    again = ray.get(registry.spawn.remote(spec))

    assert (again.name, again.actor, again.incarnation) == (
        first.name,
        first.actor,
        first.incarnation,
    )
    assert arbor.get("hosted/retried").ask("get") == 3
