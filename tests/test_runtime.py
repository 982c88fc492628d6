"""The agent API against a real Ray cluster and a real PostgreSQL store."""

from __future__ import annotations

import asyncio
import importlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

import arbor
from arbor.persistence import open_store
from tests.agents import BrokenInit, Counter, Explicit, Parent
from tests.conftest import PLACEMENTS, arbor_cluster, hosted


@pytest.fixture(scope="module", autouse=True, params=PLACEMENTS)
def cluster(request: pytest.FixtureRequest) -> Iterator[str]:
    # The dashboard serves Ray's state API, which the actor-list test reads.
    with arbor_cluster(request.param, {"ARBOR_DASHBOARD": "true"}) as url:
        yield url


def test_ask_returns_handler_value() -> None:
    ref = arbor.spawn(Counter, "rt/ask", start=5)
    assert ref.ask("add", 3) == 8
    assert ref.ask("get") == 8


def test_send_returns_message_id_and_applies_in_order() -> None:
    ref = arbor.spawn(Counter, "rt/order")
    ids = [ref.send("append", index) for index in range(100)]
    assert len(set(ids)) == 100
    assert ref.ask("items") == list(range(100))


def test_get_finds_agent_from_name() -> None:
    arbor.spawn(Counter, "rt/get", start=2)
    assert arbor.get("rt/get").ask("get") == 2


def test_get_unknown_name_raises_agent_not_found() -> None:
    with pytest.raises(arbor.AgentNotFound, match="rt/missing"):
        arbor.get("rt/missing")


def test_spawn_taken_name_raises_name_taken() -> None:
    arbor.spawn(Counter, "rt/taken")
    with pytest.raises(arbor.NameTaken, match="rt/taken"):
        arbor.spawn(Counter, "rt/taken")


@pytest.mark.parametrize("name", ["", "a b", "../x", "x//y", "arbor-registry", "ü"])
def test_spawn_invalid_name_raises(name: str) -> None:
    with pytest.raises(arbor.InvalidAgentName):
        arbor.spawn(Counter, name)


def test_handler_error_carries_agent_handler_and_traceback() -> None:
    ref = arbor.spawn(Counter, "rt/error", start=1)
    with pytest.raises(arbor.HandlerError) as caught:
        ref.ask("fail", "disk full")
    error = caught.value
    assert error.agent == "rt/error"
    assert error.handler == "fail"
    assert error.error_type == "builtins.ValueError"
    assert "raise ValueError(message)" in error.traceback
    assert "disk full" in str(error)


def test_agent_keeps_running_after_handler_error() -> None:
    ref = arbor.spawn(Counter, "rt/survives", start=1)
    with pytest.raises(arbor.HandlerError):
        ref.ask("fail", "boom")
    assert ref.ask("add", 1) == 2


def test_unknown_handler_lists_available_handlers() -> None:
    ref = arbor.spawn(Counter, "rt/unknown")
    with pytest.raises(arbor.UnknownHandler, match="no handler 'launch'.*add"):
        ref.ask("launch")


def test_private_method_is_not_a_handler() -> None:
    ref = arbor.spawn(Counter, "rt/private")
    with pytest.raises(arbor.UnknownHandler, match="private"):
        ref.ask("_private")


def test_reserved_method_is_not_a_handler() -> None:
    ref = arbor.spawn(Counter, "rt/reserved")
    with pytest.raises(arbor.UnknownHandler):
        ref.ask("snapshot")


def test_bad_arguments_raise_invalid_arguments() -> None:
    ref = arbor.spawn(Counter, "rt/args")
    with pytest.raises(arbor.InvalidArguments, match=r"add\(n: int\)"):
        ref.ask("add", 1, 2)
    with pytest.raises(arbor.InvalidArguments, match="missing a required argument: .n."):
        ref.ask("add", m=1)


def test_spawn_of_driver_only_module_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = "import arbor\n\n\nclass Hidden(arbor.Agent):\n    pass\n"
    (tmp_path / "driver_only_agents.py").write_text(source, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("driver_only_agents")

    with pytest.raises(arbor.AgentTypeNotImportable, match="No module named 'driver_only_agents'"):
        arbor.spawn(module.Hidden, "rt/hidden")
    with pytest.raises(arbor.AgentNotFound):
        arbor.get("rt/hidden")


def test_spawn_of_class_added_after_import_is_named() -> None:
    """A class added to a module after the registry imported it is reported by name."""
    # Ray's workers find modules in the directory the driver started in.
    path = Path.cwd() / "rt_grown_agents.py"
    source = "import arbor\n\n\nclass First(arbor.Agent):\n    pass\n"
    path.write_text(source, encoding="utf-8")
    try:
        module = importlib.import_module("rt_grown_agents")
        arbor.spawn(module.First, "rt/grown-first")
        path.write_text(source + "\n\nclass Second(arbor.Agent):\n    pass\n", encoding="utf-8")
        module = importlib.reload(module)
        with pytest.raises(arbor.AgentTypeNotImportable, match="'Second'.*a new cluster"):
            arbor.spawn(module.Second, "rt/grown-second")
    finally:
        path.unlink()
        for cached in (Path.cwd() / "__pycache__").glob("rt_grown_agents.*"):
            cached.unlink()
    with pytest.raises(arbor.AgentNotFound):
        arbor.get("rt/grown-second")


def test_spawn_with_broken_init_raises_and_frees_name() -> None:
    with pytest.raises(arbor.HandlerError, match="license key"):
        arbor.spawn(BrokenInit, "rt/broken")
    with pytest.raises(arbor.AgentNotFound):
        arbor.get("rt/broken")


def test_unserialisable_state_is_rejected_and_rolled_back() -> None:
    ref = arbor.spawn(Counter, "rt/nan")
    ref.ask("append", "kept")
    with pytest.raises(arbor.StateNotSerializable) as caught:
        ref.ask("store_value", float("nan"))
    assert caught.value.agent == "rt/nan"
    assert caught.value.path == "state['log'][1]"
    assert ref.ask("items") == ["kept"]


def test_kept_reply_is_detached_from_later_state_changes() -> None:
    ref = arbor.spawn(Counter, "rt/alias")
    ref.ask("append", "kept")
    # The reply of items() is the agent's own list, kept for deduplication.
    assert ref.ask("items") == ["kept"]
    with pytest.raises(arbor.StateNotSerializable):
        ref.ask("store_value", b"not json")

    assert ref.ask("append", "after") == 2
    assert ref.ask("items") == ["kept", "after"]


def test_rejected_new_attribute_is_removed() -> None:
    ref = arbor.spawn(Counter, "rt/nan-new", start=2)
    with pytest.raises(arbor.StateNotSerializable, match=r"state\['extra'\]"):
        ref.ask("set_extra", float("nan"))
    assert ref.ask("add", 1) == 3


def test_spawn_with_bad_init_arguments_raises_invalid_arguments() -> None:
    with pytest.raises(arbor.InvalidArguments, match="unexpected keyword argument 'begin'"):
        arbor.spawn(Counter, "rt/bad-init", begin=1)
    with pytest.raises(arbor.AgentNotFound):
        arbor.get("rt/bad-init")


def test_spawn_on_unknown_node_frees_name() -> None:
    with pytest.raises(arbor.ArborError, match="cannot be placed"):
        arbor.spawn(Counter, "rt/nowhere", node_id="ab" * 28, node_affinity="hard")
    with pytest.raises(arbor.AgentNotFound):
        arbor.get("rt/nowhere")


def test_ask_rejects_invalid_timeouts() -> None:
    ref = arbor.spawn(Counter, "rt/timeout")
    for timeout in (-1, 0, float("nan"), float("inf"), "1", True):
        expected = re.escape(f"timeout={timeout!r} is invalid")
        with pytest.raises(arbor.InvalidArguments, match=expected):
            ref.ask("get", timeout=timeout)
        with pytest.raises(arbor.InvalidArguments, match=expected):
            asyncio.run(ref.ask_async("get", timeout=timeout))
    assert ref.ask("get", timeout=30.0) == 0


def test_ask_rejects_invalid_message_ids() -> None:
    ref = arbor.spawn(Counter, "rt/message-id")
    for message_id in ("", 7):
        expected = re.escape(f"message_id={message_id!r} is invalid")
        with pytest.raises(arbor.InvalidArguments, match=expected):
            ref.ask("add", 1, message_id=message_id)
        with pytest.raises(arbor.InvalidArguments, match=expected):
            ref.send("add", 1, message_id=message_id)
    assert ref.ask("get") == 0


def test_ask_is_acknowledged_after_commit() -> None:
    ref = arbor.spawn(Counter, "rt/durable")
    ref.ask("add", 41)
    store = open_store(os.environ["ARBOR_DATABASE_URL"])
    try:
        checkpoint = store.load_checkpoint("rt/durable")
    finally:
        store.close()
    assert checkpoint is not None
    assert checkpoint.state["count"] == 41


def test_repeated_message_id_is_applied_once() -> None:
    ref = arbor.spawn(Counter, "rt/idempotent")
    assert ref.ask("add", 5, message_id="payment-1") == 5
    assert ref.ask("add", 5, message_id="payment-1") == 5
    assert ref.ask("get") == 5


def test_list_agents_reports_records() -> None:
    arbor.spawn(Counter, "rt/listed")
    infos = {info.name: info for info in arbor.list_agents()}
    info = infos["rt/listed"]
    assert info.type == "tests.agents:Counter"
    assert info.status == "running"
    assert info.placement == ("hosted" if hosted() else "dedicated")
    assert info.incarnation == 1
    assert info.checkpoint_version == 1
    assert info.node_id == ray.get_runtime_context().get_node_id()


def test_stop_keeps_state_and_name() -> None:
    ref = arbor.spawn(Counter, "rt/stopped", start=3)
    arbor.stop("rt/stopped")
    with pytest.raises(arbor.AgentNotFound, match="stopped"):
        ref.ask("get")
    with pytest.raises(arbor.NameTaken, match="purge=True"):
        arbor.spawn(Counter, "rt/stopped")
    assert arbor.list_checkpoints("rt/stopped")[0].version >= 1


def test_stop_with_purge_frees_name() -> None:
    arbor.spawn(Counter, "rt/purged", start=3)
    arbor.stop("rt/purged", purge=True)
    assert arbor.spawn(Counter, "rt/purged", start=9).ask("get") == 9


def test_restore_rolls_back_to_earlier_version() -> None:
    ref = arbor.spawn(Counter, "rt/restore")
    ref.ask("add", 1)
    ref.ask("add", 10)
    versions = [info.version for info in arbor.list_checkpoints("rt/restore")]
    assert versions == [3, 2, 1]
    info = arbor.restore("rt/restore", version=2)
    assert ref.ask("get") == 1
    # Epoch 2 fenced the first incarnation; the restarted one took epoch 3.
    assert info.incarnation == 3
    assert info.checkpoint_version == 4


def test_restore_unknown_version_names_kept_versions() -> None:
    arbor.spawn(Counter, "rt/restore-missing")
    with pytest.raises(arbor.CheckpointNotFound, match=r"kept versions: \[1\]"):
        arbor.restore("rt/restore-missing", version=7)


def test_snapshot_and_restore_overrides_are_used() -> None:
    ref = arbor.spawn(Explicit, "rt/explicit")
    ref.ask("add", 4)
    arbor.restore("rt/explicit", version=2)
    assert ref.ask("state") == {"total": 4, "restored": True}


def test_context_exposes_name_and_incarnation() -> None:
    ref = arbor.spawn(Counter, "rt/context")
    assert ref.ask("whoami") == {"name": "rt/context", "namespace": "default", "incarnation": 1}


def test_agent_spawns_and_asks_another_agent() -> None:
    parent = arbor.spawn(
        Parent,
        "rt/parent",
        capabilities=["arbor://agent/spawn/rt/child", "arbor://agent/ask/rt/child"],
    )
    assert parent.ask("make_child", "rt/child", 10) == "rt/child"
    assert parent.ask("add_to_child", "rt/child", 5) == 15
    assert arbor.get("rt/child").ask("get") == 15


def test_runtime_env_reaches_agent_process() -> None:
    ref = arbor.spawn(Counter, "rt/env", runtime_env={"env_vars": {"ARBOR_TEST_FLAG": "on"}})
    assert ref.ask("environment", "ARBOR_TEST_FLAG") == "on"


def test_malformed_runtime_env_is_rejected_and_frees_name() -> None:
    with pytest.raises(arbor.ArborError, match="could not be created"):
        arbor.spawn(Counter, "rt/bad-env", runtime_env={"env_vars": {"FLAG": 1}})
    with pytest.raises(arbor.AgentNotFound):
        arbor.get("rt/bad-env")


def test_hard_node_affinity_places_agent_on_node() -> None:
    node_id = ray.get_runtime_context().get_node_id()
    ref = arbor.spawn(Counter, "rt/pinned", node_id=node_id, node_affinity="hard", num_cpus=0)
    assert ref.info()["node_id"] == node_id


def test_spread_placement_spawns() -> None:
    ref = arbor.spawn(Counter, "rt/spread", spread=True, start=1)
    assert ref.ask("get") == 1


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("num_cpus", -1, "num_cpus=-1"),
        ("memory", "lots", "memory='lots'"),
        ("resources", {"gpu": "x"}, "resources="),
        ("resources", {"GPU": 1}, "GPU cannot be a custom resource"),
        ("node_affinity", "hard", "needs node_id"),
        ("node_id", "abc", "56 hex digits"),
        ("durability", "maybe", "durability='maybe'"),
    ],
)
def test_invalid_placement_option_is_rejected(option: str, value: object, message: str) -> None:
    with pytest.raises(arbor.InvalidArguments, match=message):
        arbor.spawn(Counter, "rt/bad-option", **{option: value})


def test_dashboard_lists_agent_class_and_name() -> None:
    from ray.util.state import list_actors

    if hosted():
        pytest.skip("a hosted agent has no Ray actor of its own")

    arbor.spawn(Counter, "rt/ray-view")
    dashboard = "http://" + ray._private.worker.get_dashboard_url()
    actors = list_actors(address=dashboard, filters=[("name", "=", "rt/ray-view")], detail=True)
    assert len(actors) == 1
    assert actors[0].class_name == "Counter"
    assert actors[0].ray_namespace == "arbor"
    assert actors[0].is_detached is True
    assert actors[0].state == "ALIVE"


def test_placement_options_reach_ray() -> None:
    from ray.util.state import list_actors

    arbor.spawn(Counter, "rt/resources", num_cpus=0.5, memory=64 * 1024**2)
    dashboard = "http://" + ray._private.worker.get_dashboard_url()
    actors = list_actors(address=dashboard, filters=[("name", "=", "rt/resources")], detail=True)
    assert actors[0].required_resources == {"CPU": 0.5, "memory": 64 * 1024**2}
