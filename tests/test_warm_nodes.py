"""The warm pool across nodes: a share on each node, growth with the spawn rate, node loss."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster

import arbor
from arbor.config import reset_settings
from arbor.runtime.actor import WARM_PREFIX
from arbor.runtime.ref import registry_handle
from tests.agents import Counter
from tests.test_multinode import FAST_HEALTH_CHECKS, NODE_ARGS, kill_node

COUNTER = "tests.agents:Counter"
POOL_SIZE = 1
POOL_MAX = 3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(module_pg_url: str) -> Iterator[Cluster]:
    os.environ["ARBOR_WARM_POOL_SIZE"] = str(POOL_SIZE)
    os.environ["ARBOR_WARM_POOL_MAX"] = str(POOL_MAX)
    reset_settings()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **NODE_ARGS,
            "include_dashboard": False,
            "_system_config": FAST_HEALTH_CHECKS,
        },
    )
    worker = cluster.add_node(**NODE_ARGS)
    cluster.wait_for_nodes()
    arbor.init(address=cluster.address, database_url=module_pg_url)
    yield cluster
    arbor.shutdown()
    if worker in cluster.worker_nodes:
        cluster.remove_node(worker)
    cluster.shutdown()
    del os.environ["ARBOR_WARM_POOL_SIZE"]
    del os.environ["ARBOR_WARM_POOL_MAX"]
    reset_settings()


def warm_actors() -> list[dict[str, Any]]:
    actors: list[dict[str, Any]] = ray.get(registry_handle().warm_actors.remote())
    return [actor for actor in actors if actor["type_path"] == COUNTER]


def wait_until(check: Callable[[], bool], timeout: float, description: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{description} did not happen within {timeout} s: {warm_actors()}")
        time.sleep(0.2)


def alive_nodes() -> set[str]:
    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


def test_pool_keeps_share_per_node(cluster: Cluster) -> None:
    arbor.spawn(Counter, "wn/first")

    wait_until(lambda: len(warm_actors()) >= 2, 90, "a warm actor on each node")

    nodes = [actor["node_id"] for actor in warm_actors()]
    assert set(nodes) == alive_nodes()
    assert len(nodes) == 2 * POOL_SIZE


def test_pool_grows_with_spawns_and_shrinks(cluster: Cluster) -> None:
    wait_until(lambda: len(warm_actors()) >= 2, 90, "a full pool")
    for index in range(6):
        arbor.spawn(Counter, f"wn/burst-{index}", start=index)

    # Seven spawns in the window, over two nodes: ceil(7 / 2) = 4 each, capped at 3.
    wait_until(lambda: len(warm_actors()) == 2 * POOL_MAX, 120, "the pool growing to its max")
    nodes = [actor["node_id"] for actor in warm_actors()]
    assert {node: nodes.count(node) for node in set(nodes)} == dict.fromkeys(alive_nodes(), 3)
    # Once the spawns are older than the window, the pool goes back to its size.
    wait_until(lambda: len(warm_actors()) == 2 * POOL_SIZE, 60, "the pool shrinking")
    assert [arbor.get(f"wn/burst-{index}").ask("get") for index in range(6)] == list(range(6))


def test_node_loss_drops_its_warm_actors(cluster: Cluster) -> None:
    wait_until(lambda: len(warm_actors()) == 2 * POOL_SIZE, 90, "a pool on both nodes")
    (worker,) = cluster.worker_nodes
    lost = worker.node_id
    head = cluster.head_node.node_id

    kill_node(cluster, worker)

    # The registry may have run on the lost node too. Its next incarnation starts with an
    # empty pool, which the next spawn refills.
    wait_until(
        lambda: lost not in {actor["node_id"] for actor in warm_actors()},
        90,
        "the pool dropping the lost node's actors",
    )
    ref = arbor.spawn(Counter, "wn/after-loss", start=5)
    assert ref.ask("add", 1) == 6
    wait_until(
        lambda: {actor["node_id"] for actor in warm_actors()} == {head},
        90,
        "the pool refilling on the head node",
    )
    ref = arbor.spawn(Counter, "wn/warm-after-loss", start=7)
    (info,) = [agent for agent in arbor.list_agents() if agent.name == "wn/warm-after-loss"]
    assert info.actor.startswith(WARM_PREFIX)
    assert ref.ask("add", 1) == 8
