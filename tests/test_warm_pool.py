"""Spawns that claim a warm actor: the same behaviour as a cold spawn, from a started process."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray

import arbor
import arbor.client
from arbor import direct_spawn
from arbor.config import NAMESPACE, reset_settings
from arbor.names import qualify
from arbor.persistence import STARTING, AgentRecord, CheckpointStore, open_store
from arbor.registry.info import AgentInfo
from arbor.registry.spec import build_spawn_spec, spawn_audit
from arbor.runtime.actor import WARM_PREFIX
from arbor.runtime.ref import registry_handle
from tests.agents import Counter, Explicit, Picky, Relay, Sleeper

POOL_SIZE = 2


@pytest.fixture(scope="module", autouse=True)
def cluster(module_pg_url: str) -> Iterator[str]:
    os.environ["ARBOR_WARM_POOL_SIZE"] = str(POOL_SIZE)
    # A fixed size: growth with the spawn rate is tested in test_warm_nodes.py.
    os.environ["ARBOR_WARM_POOL_MAX"] = str(POOL_SIZE)
    os.environ["ARBOR_NAMESPACE_MAX_AGENTS"] = json.dumps({"capped": 2})
    reset_settings()
    arbor.init(database_url=module_pg_url, num_cpus=2, object_store_memory=100 * 1024**2)
    yield module_pg_url
    arbor.shutdown()
    del os.environ["ARBOR_WARM_POOL_SIZE"]
    del os.environ["ARBOR_WARM_POOL_MAX"]
    del os.environ["ARBOR_NAMESPACE_MAX_AGENTS"]
    reset_settings()


@pytest.fixture(scope="module")
def store(cluster: str) -> Iterator[CheckpointStore]:
    opened = open_store(cluster)
    yield opened
    opened.close()


def wait_for_pool(type_path: str, count: int = POOL_SIZE, timeout: float = 60.0) -> None:
    registry = registry_handle()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ray.get(registry.warm_pool.remote()).get(type_path, 0) >= count:
            return
        time.sleep(0.1)
    pytest.fail(f"the warm pool of {type_path} did not reach {count} within {timeout} s")


def warm_spawn(agent_class: type[arbor.Agent], name: str, **kwargs: Any) -> arbor.AgentRef:
    """Spawn once the class has warm actors ready, and check that the spawn took one."""
    path = f"{agent_class.__module__}:{agent_class.__qualname__}"
    if ray.get(registry_handle().warm_pool.remote()).get(path) is None:
        # The first spawn of a class starts cold and starts its pool.
        arbor.spawn(agent_class, f"{name}-first")
    wait_for_pool(path)
    ref = arbor.spawn(agent_class, name, **kwargs)
    assert actor_of(name).startswith(WARM_PREFIX)
    return ref


def ready(type_path: str = "tests.agents:Counter") -> int:
    return int(ray.get(registry_handle().warm_pool.remote()).get(type_path, 0))


def spawn_rows(store: CheckpointStore, name: str) -> list[Any]:
    """Return the audit rows of spawns of ``name``."""
    resource = f"arbor://agent/spawn/{name}"
    return [row for row in store.list_audit(resource_prefix=resource) if row.resource == resource]


def actor_of(name: str) -> str:
    (info,) = [agent for agent in arbor.list_agents() if agent.name == name]
    return info.actor


def test_spawn_claims_warm_actor() -> None:
    ref = warm_spawn(Counter, "warm/basic", start=5)
    assert ref.ask("add", 3) == 8
    # A fresh reference finds the agent through the registry, by its Arbor name.
    assert arbor.get("warm/basic").ask("get") == 8
    assert ref.info()["actor"] == actor_of("warm/basic")
    with pytest.raises(arbor.NameTaken):
        arbor.spawn(Counter, "warm/basic")


def test_pool_refills_after_a_claim() -> None:
    warm_spawn(Counter, "warm/refill")
    wait_for_pool("tests.agents:Counter")


def test_warm_actor_shows_agent_class() -> None:
    warm_spawn(Counter, "warm/class")
    actor = actor_of("warm/class")
    entries = [entry for entry in ray._private.state.actors().values() if entry["Name"] == actor]
    assert entries and entries[-1]["ActorClassName"].endswith("Counter")


def test_placement_options_start_cold() -> None:
    wait_for_pool("tests.agents:Counter")
    arbor.spawn(Counter, "warm/placed", num_cpus=0)
    assert actor_of("warm/placed") == "warm/placed"


def test_failing_warm_init_frees_name() -> None:
    warm_spawn(Picky, "warm/picky-ok")
    wait_for_pool("tests.agents:Picky")
    with pytest.raises(arbor.HandlerError, match="no licence key") as caught:
        arbor.spawn(Picky, "warm/picky", fail=True)
    assert caught.value.handler == "__init__"
    with pytest.raises(arbor.AgentNotFound):
        arbor.get("warm/picky")
    assert arbor.spawn(Picky, "warm/picky").ask("set", 4) == 4


def test_warm_actor_kill_9_loses_nothing() -> None:
    ref = warm_spawn(Counter, "warm/crash")
    info = ref.info()
    total = 300
    errors: list[BaseException] = []

    def ask_many() -> None:
        try:
            for _ in range(total):
                ref.ask("add", 1)
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    worker = threading.Thread(target=ask_many)
    worker.start()
    while ref.info()["messages_processed"] < 50:
        time.sleep(0.01)
    os.kill(info["pid"], signal.SIGKILL)
    worker.join(timeout=120)
    assert not errors
    assert ref.ask("get") == total
    after = ref.info()
    assert after["pid"] != info["pid"]
    assert after["actor"] == info["actor"]
    assert after["incarnation"] > info["incarnation"]


def test_removed_warm_actor_recreated_cold() -> None:
    ref = warm_spawn(Counter, "warm/removed", start=7)
    ref.ask("add", 1)
    actor = actor_of("warm/removed")
    ray.kill(ray.get_actor(actor, namespace=NAMESPACE), no_restart=True)
    deadline = time.monotonic() + 60
    while actor_of("warm/removed") != "warm/removed" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert actor_of("warm/removed") == "warm/removed"
    assert arbor.get("warm/removed").ask("get", timeout=60) == 8
    assert ref.ask("get", timeout=60) == 8


def test_stop_kills_warm_actor() -> None:
    ref = warm_spawn(Counter, "warm/stopped", start=3)
    actor = actor_of("warm/stopped")
    arbor.stop("warm/stopped")
    with pytest.raises(arbor.AgentNotFound):
        ref.ask("get")
    with pytest.raises(ValueError):
        ray.get_actor(actor, namespace=NAMESPACE)
    arbor.stop("warm/stopped", purge=True)
    assert arbor.spawn(Counter, "warm/stopped", start=1).ask("get") == 1


def test_outbox_sends_reach_warm_agent() -> None:
    warm_spawn(Counter, "warm/target")
    relay = arbor.spawn(Relay, "warm/relay", capabilities=["arbor://agent/send/warm/target"])
    for n in range(1, 6):
        relay.ask("forward", "warm/target", n)
    target = arbor.get("warm/target")
    deadline = time.monotonic() + 30
    while target.ask("get") != 15 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert target.ask("get") == 15


def test_new_registry_removes_unclaimed_warm_actors() -> None:
    warm_spawn(Counter, "warm/kept", start=2)
    wait_for_pool("tests.agents:Counter")
    registry = registry_handle()
    old_pid = ray.get(registry.ping.remote())["pid"]
    ray.kill(registry, no_restart=False)
    deadline = time.monotonic() + 60
    bound = {agent.actor for agent in arbor.list_agents()}
    while time.monotonic() < deadline:
        try:
            if ray.get(registry_handle().ping.remote(), timeout=5)["pid"] != old_pid:
                break
        except Exception:  # noqa: BLE001 - the registry is restarting
            time.sleep(0.1)
    while time.monotonic() < deadline:
        names = {
            entry["name"]
            for entry in ray.util.list_named_actors(all_namespaces=True)
            if entry["name"].startswith(WARM_PREFIX)
        }
        if names <= bound:
            break
        time.sleep(0.1)
    assert names <= bound
    assert arbor.get("warm/kept").ask("get") == 2


def test_warm_spawn_commits_once(store: CheckpointStore) -> None:
    warm_spawn(Counter, "warm/committed", start=6)

    record = store.get_agent("warm/committed")
    checkpoint = store.load_checkpoint("warm/committed")
    rows = spawn_rows(store, "warm/committed")
    assert record is not None
    assert (record.status, record.epoch, record.checkpoint_version) == ("running", 1, 1)
    assert record.options["actor"].startswith(WARM_PREFIX)
    assert checkpoint is not None
    assert (checkpoint.version, checkpoint.state["count"]) == (1, 6)
    assert [(row.action, row.decision) for row in rows] == [("spawn", "allowed")]
    assert store.verify_audit().ok


def test_warm_spawn_of_taken_name(store: CheckpointStore) -> None:
    ref = warm_spawn(Counter, "warm/owner", start=4)
    ref.ask("add", 1)
    before = ref.info()
    wait_for_pool("tests.agents:Counter")

    with pytest.raises(arbor.NameTaken):
        arbor.spawn(Counter, "warm/owner", start=100)

    # The warm actor that the refused spawn took went back to the pool.
    assert ready() == POOL_SIZE
    after = ref.info()
    assert (after["pid"], after["incarnation"]) == (before["pid"], before["incarnation"])
    assert arbor.get("warm/owner").ask("get") == 5
    assert len(spawn_rows(store, "warm/owner")) == 1


def test_failing_warm_spawn_of_taken_name() -> None:
    warm_spawn(Picky, "warm/picky-owner").ask("set", 9)
    wait_for_pool("tests.agents:Picky")

    with pytest.raises((arbor.NameTaken, arbor.HandlerError)):
        arbor.spawn(Picky, "warm/picky-owner", fail=True)

    # The failed spawn removed only what it wrote: the agent of that name still runs.
    assert arbor.get("warm/picky-owner").ask("set", 10) == 10
    assert [agent.status for agent in arbor.list_agents() if agent.name == "warm/picky-owner"] == [
        "running"
    ]


def test_retried_warm_spawn() -> None:
    warm_spawn(Counter, "warm/retry-first")
    wait_for_pool("tests.agents:Counter")
    spec = build_spawn_spec(Counter, qualify("warm/retried", arbor.current_namespace()), (3,), {})
    registry = registry_handle()

    first = ray.get(registry.spawn.remote(spec))
    again = ray.get(registry.spawn.remote(spec))

    assert first.actor.startswith(WARM_PREFIX)
    assert (again.name, again.actor, again.incarnation) == (
        first.name,
        first.actor,
        first.incarnation,
    )
    assert arbor.get("warm/retried").ask("get") == 3


def test_warm_spawn_with_capabilities() -> None:
    warm_spawn(Counter, "warm/granted-target")
    relay = warm_spawn(
        Relay, "warm/granted", capabilities=["arbor://agent/send/warm/granted-target"]
    )
    relay.ask("forward", "warm/granted-target", 4)
    target = arbor.get("warm/granted-target")
    deadline = time.monotonic() + 30
    while target.ask("get") != 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert target.ask("get") == 4
    assert {cap.pattern for cap in arbor.capabilities("warm/granted")} >= {
        "arbor://agent/send/warm/granted-target"
    }


def test_warm_spawn_past_namespace_cap() -> None:
    warm_spawn(Counter, "warm/cap-pool")
    arbor.spawn(Counter, "capped:one")
    arbor.spawn(Counter, "capped:two")
    wait_for_pool("tests.agents:Counter")

    with pytest.raises(arbor.QuotaExceeded):
        arbor.spawn(Counter, "capped:three")

    assert ready() == POOL_SIZE
    with pytest.raises(arbor.AgentNotFound):
        arbor.get("capped:three")


def test_lent_actor_spawns_without_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    warm_spawn(Counter, "warm/lend-first")
    wait_for_pool("tests.agents:Counter")

    def no_registry() -> None:
        raise AssertionError("the spawn called the registry")

    # A spawn that has a lent warm actor claims it without calling the registry.
    monkeypatch.setattr(arbor.client, "_registry", no_registry)
    ref = arbor.spawn(Counter, "warm/lent", start=11)
    monkeypatch.undo()

    assert ref.ask("add", 1) == 12
    assert actor_of("warm/lent").startswith(WARM_PREFIX)
    # The registry recorded the spawn: the pool refills, and the name is taken.
    wait_for_pool("tests.agents:Counter")
    with pytest.raises(arbor.NameTaken):
        arbor.spawn(Counter, "warm/lent")


def test_stale_loan_cannot_take_running_actor() -> None:
    warm_spawn(Counter, "warm/stale-first")
    wait_for_pool("tests.agents:Counter")
    # The loan that the next spawn uses.
    loan = direct_spawn._take("tests.agents:Counter")
    assert loan is not None
    direct_spawn._give_back("tests.agents:Counter", loan)
    arbor.spawn(Counter, "warm/stale-a", start=1)

    # The same actor lent again, as after a loan that outlived its time.
    loan.requested_at = time.monotonic()
    direct_spawn._give_back("tests.agents:Counter", loan)
    arbor.spawn(Counter, "warm/stale-b", start=2)

    assert actor_of("warm/stale-a") == loan.actor
    assert actor_of("warm/stale-b") != loan.actor
    assert arbor.get("warm/stale-a").ask("get") == 1
    assert arbor.get("warm/stale-b").ask("get") == 2


def test_old_loan_goes_through_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    warm_spawn(Counter, "warm/old-first")
    wait_for_pool("tests.agents:Counter")
    monkeypatch.setattr(direct_spawn, "WARM_LEND_USE_S", 0.0)
    calls = []
    registry = arbor.client._registry

    def counted() -> Any:
        calls.append(1)
        return registry()

    monkeypatch.setattr(arbor.client, "_registry", counted)
    arbor.spawn(Counter, "warm/old", start=3)

    assert calls == [1]
    assert actor_of("warm/old").startswith(WARM_PREFIX)
    assert arbor.get("warm/old").ask("get") == 3


@pytest.fixture(autouse=True)
def stop_new_agents() -> Iterator[None]:
    """Stop and purge the agents each test spawned, which frees their database connections."""
    before = {agent.name for agent in arbor.list_agents()}
    yield
    for agent in arbor.list_agents():
        if agent.name not in before:
            with contextlib.suppress(arbor.AgentNotFound):
                arbor.stop(agent.name, purge=True)


def spec_of(agent_class: type[arbor.Agent], name: str) -> Any:
    return build_spawn_spec(agent_class, qualify(name, arbor.current_namespace()), (), {})


def warm_names(type_path: str) -> set[str]:
    """Return the Ray names of the registry's ready and lent warm actors of ``type_path``."""
    actors = ray.get(registry_handle().warm_actors.remote())
    return {actor["name"] for actor in actors if actor["type_path"] == type_path}


def wait_for_reply(path: str) -> None:
    """Wait until this process has a loan of ``path`` or the reply to its request."""
    deadline = time.monotonic() + 30
    while path not in direct_spawn._loans and time.monotonic() < deadline:
        pending = direct_spawn._replies.get(path)
        if pending is not None and pending[1].done():
            return
        time.sleep(0.05)


def loan_with_spare(agent_class: type[arbor.Agent], name: str) -> str:
    """Spawn an ``agent_class`` agent, then hold a loan whose reply named a spare.

    Returns the agent class's type path.
    """
    path = f"{agent_class.__module__}:{agent_class.__qualname__}"
    arbor.spawn(agent_class, name)
    for _ in range(3):
        wait_for_pool(path)
        # The request for the loan goes out a moment after the spawn.
        time.sleep(0.1)
        wait_for_reply(path)
        # Taking the loan reads the reply; giving it back keeps it for the next spawn.
        loan = direct_spawn._take(path)
        if loan is not None and direct_spawn._has_spare(path):
            direct_spawn._give_back(path, loan)
            return path
        # A reply sent when one actor was ready names no spare. A request to a full pool
        # gets one.
        if loan is not None:
            ray.get(loan.registry.return_loan.remote(loan.actor))
        direct_spawn.request(path, registry_handle())
    pytest.fail(f"no loan reply for {path} named a spare")


def test_spawn_right_after_another_claims_spare(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = loan_with_spare(Explicit, "warm/spare-first")

    def no_registry() -> None:
        raise AssertionError("the spawn called the registry")

    # The first spawn claims the loan, the second the spare, neither through the registry.
    monkeypatch.setattr(arbor.client, "_registry", no_registry)
    first = arbor.spawn(Explicit, "warm/spare-a")
    second = arbor.spawn(Explicit, "warm/spare-b")
    monkeypatch.undo()

    assert (first.ask("add", 2), second.ask("add", 3)) == (2, 3)
    actors = {actor_of("warm/spare-a"), actor_of("warm/spare-b")}
    assert len(actors) == 2
    assert all(actor.startswith(WARM_PREFIX) for actor in actors)
    # The registry counted both claims: neither actor is in its pool, which refills.
    wait_for_pool(path)
    assert not actors & warm_names(path)
    for name in ("warm/spare-a", "warm/spare-b"):
        with pytest.raises(arbor.NameTaken):
            arbor.spawn(Explicit, name)


def test_registry_spawn_skips_claimed_spare() -> None:
    path = "tests.agents:Sleeper"
    registry = registry_handle()
    # Through the registry without a loan, so that this process has no loan of Sleeper.
    ray.get(registry.spawn.remote(spec_of(Sleeper, "warm/race-first")))
    wait_for_pool(path)
    lent = ray.get(registry.lend.remote(path))
    (spare,) = lent["spares"]

    # A client claims the spare, and the registry has not heard of it yet.
    client = spec_of(Sleeper, "warm/race-client")
    record = AgentRecord(
        name=client.name,
        type_path=client.type_path,
        status=STARTING,
        spawn_id=client.spawn_id,
        options={"actor": spare["actor"]},
    )
    report = ray.get(
        spare["handle"].claim.remote(client.name, (), {}, "durable", record, spawn_audit(client))
    )
    # The spare is the only ready actor, so the registry's next spawn takes it, finds it
    # claimed, and starts its agent elsewhere.
    other = ray.get(registry.spawn.remote(spec_of(Sleeper, "warm/race-registry")))
    ray.get(
        registry.claimed_directly.remote(
            client, spare["actor"], AgentInfo.from_record(report["record"])
        )
    )
    ray.get(registry.return_loan.remote(lent["actor"]))

    assert other.actor != spare["actor"]
    assert actor_of("warm/race-client") == spare["actor"]
    assert arbor.get("warm/race-client").ask("nap", 0) == 0
    assert arbor.get("warm/race-registry").ask("nap", 0) == 0
    assert spare["actor"] not in warm_names(path)


def test_spawn_whose_spare_was_taken_goes_through_registry() -> None:
    path = loan_with_spare(Explicit, "warm/taken-first")
    # The loan is held elsewhere, so the next spawn in this process uses the spare.
    loan = direct_spawn._take(path)
    assert loan is not None
    registry = registry_handle()
    # A spawn through the registry takes the spare first: it is the only ready actor.
    taker = ray.get(registry.spawn.remote(spec_of(Explicit, "warm/taken-registry")))
    spare = direct_spawn._spares[path][0].actor
    assert taker.actor == spare

    ref = arbor.spawn(Explicit, "warm/taken-client")
    direct_spawn._give_back(path, loan)

    assert actor_of("warm/taken-client") not in (spare, loan.actor)
    assert ref.ask("add", 1) == 1
    assert arbor.get("warm/taken-registry").ask("add", 2) == 2


def test_lend_reply_while_the_process_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    # At interpreter exit the loan thread's executor rejects new work. A reply that
    # arrives then is dropped instead of raising in Ray's callback thread.
    stopped = concurrent.futures.ThreadPoolExecutor(1)
    stopped.shutdown()
    monkeypatch.setattr(direct_spawn, "_warmer", stopped)
    reply: concurrent.futures.Future[Any] = concurrent.futures.Future()
    reply.set_result({"actor": "arbor-warm-x", "handle": None, "spares": []})

    direct_spawn._lent_reply(reply)


def test_keep_drops_actor_whose_claim_failed() -> None:
    path = "tests.agents:Picky"
    warm_spawn(Picky, "warm/failed-claim-first")
    wait_for_pool(path)
    loan = direct_spawn._take(path)
    assert loan is not None
    direct_spawn._give_back(path, loan)

    with pytest.raises(arbor.HandlerError):
        arbor.spawn(Picky, "warm/failed-claim", fail=True)

    # A reply that the registry sent before it heard of the failed claim, and so lends
    # the actor it has since killed, gives this process nothing to claim.
    with direct_spawn._lock:
        direct_spawn._loans.pop(path, None)
        direct_spawn._spares.pop(path, None)
    lent = {"actor": loan.actor, "handle": loan.handle, "durability": "durable", "capped": []}
    direct_spawn.keep(path, loan.registry, lent, time.monotonic(), first_call=False)
    # Another reply on its way may lend another actor.
    taken = direct_spawn._take(path)
    assert taken is None or taken.actor != loan.actor
    if taken is not None:
        direct_spawn._give_back(path, taken)
