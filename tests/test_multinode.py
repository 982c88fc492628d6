"""Node loss in a multi-node Ray cluster on one machine."""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator

import psutil
import pytest
import ray
from ray.cluster_utils import Cluster

import arbor
from arbor.config import NAMESPACE, REGISTRY_NAME
from tests.agents import Counter

# Faster node-death detection than Ray's default (3 s x 5 missed checks), so the test
# spends its time on Arbor's recovery rather than on waiting.
FAST_HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
NODE_ARGS = {"num_cpus": 1, "object_store_memory": 80 * 1024**2, "node_ip_address": "127.0.0.1"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(module_pg_url: str) -> Iterator[Cluster]:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": 80 * 1024**2,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            "_system_config": FAST_HEALTH_CHECKS,
        },
    )
    workers = [cluster.add_node(**NODE_ARGS) for _ in range(3)]
    cluster.wait_for_nodes()
    arbor.init(address=cluster.address, database_url=module_pg_url)
    yield cluster
    arbor.shutdown()
    for node in workers:
        if node in cluster.worker_nodes:
            cluster.remove_node(node)
    cluster.shutdown()


def kill_node(cluster: Cluster, node: object) -> None:
    """Kill a node the way a machine dies: its raylet first, then every process under it.

    `Cluster.remove_node` alone leaves the node's actor processes running, and they would
    keep replying as if the node were alive.
    """
    from ray._private import ray_constants

    raylet_pid = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid  # type: ignore[attr-defined]
    raylet = psutil.Process(raylet_pid)
    doomed = [raylet, *raylet.children(recursive=True)]
    for process in doomed:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    cluster.remove_node(node, allow_graceful=False)


def wait_for_answers(names: list[str], expected: dict[str, int], timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    values: dict[str, int] = {}
    for name in names:
        values[name] = arbor.get(name).ask("get", timeout=max(deadline - time.monotonic(), 1.0))
    return values


def test_node_loss_brings_agents_back_with_state(cluster: Cluster) -> None:
    names = [f"mn/agent-{index}" for index in range(6)]
    expected = {}
    for index, name in enumerate(names):
        ref = arbor.spawn(Counter, name, spread=True)
        expected[name] = ref.ask("add", 10 + index)
    placement = {name: arbor.get(name).info()["node_id"] for name in names}
    by_node = collections.Counter(placement.values())
    doomed_id, _ = by_node.most_common(1)[0]
    doomed = next(node for node in cluster.worker_nodes if node.node_id == doomed_id)
    moved = [name for name in names if placement[name] == doomed_id]

    kill_node(cluster, doomed)
    values = wait_for_answers(names, expected, timeout=120)

    assert values == expected
    for name in moved:
        assert arbor.get(name).info()["node_id"] != doomed_id
    cluster.add_node(**NODE_ARGS)


def test_hard_pinned_agent_moves_when_its_node_dies(cluster: Cluster) -> None:
    # A node without the registry, so that only the pinned agent has to move.
    registry = ray.get(ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE).ping.remote())
    target = next(
        node for node in list(cluster.worker_nodes) if node.node_id != registry["node_id"]
    )
    ref = arbor.spawn(Counter, "mn/pinned", node_id=target.node_id, node_affinity="hard")
    ref.ask("add", 42)
    assert ref.info()["node_id"] == target.node_id

    kill_node(cluster, target)

    assert ref.ask("get", timeout=120) == 42
    info = ref.info()
    assert info["node_id"] != target.node_id
    assert info["node_id"] in {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    # The move drops the pin, so later reconciler passes leave the new actor alone.
    (moved,) = [agent for agent in arbor.list_agents() if agent.name == "mn/pinned"]
    assert moved.actor.startswith("arbor-moved-")
    assert arbor.reconcile() == []
    assert ref.info()["pid"] == info["pid"]


def hosted_nodes(names: list[str]) -> dict[str, str]:
    return {name: arbor.get(name).info(timeout=120)["node_id"] for name in names}


def test_hosted_agents_come_back_when_their_node_dies(cluster: Cluster) -> None:
    names = [f"mn/hosted-{index}" for index in range(9)]
    expected = {}
    for index, name in enumerate(names):
        ref = arbor.spawn(Counter, name, placement="hosted")
        expected[name] = ref.ask("add", 20 + index)
    placement = hosted_nodes(names)
    # Hosts spread over the worker nodes, and spawns fill the emptiest host.
    assert len(set(placement.values())) == len(cluster.worker_nodes)
    registry = ray.get(ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE).ping.remote())
    doomed = next(node for node in cluster.worker_nodes if node.node_id != registry["node_id"])
    moved = [name for name in names if placement[name] == doomed.node_id]

    kill_node(cluster, doomed)
    values = wait_for_answers(names, expected, timeout=120)

    assert values == expected
    for name in moved:
        assert arbor.get(name).info()["node_id"] != doomed.node_id

    # A node that joins gets a host, and agents move onto it until the hosts are even.
    joined = cluster.add_node(**NODE_ARGS)
    cluster.wait_for_nodes()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if joined.node_id in hosted_nodes(names).values():
            break
        time.sleep(0.5)
    assert joined.node_id in hosted_nodes(names).values()
    assert wait_for_answers(names, expected, timeout=60) == expected
