"""A brand-new Ray cluster pointed at the same database brings every agent back."""

from __future__ import annotations

import pytest
import ray

import arbor
from tests.agents import Counter


def test_new_ray_cluster_recreates_all_agents(pg_url: str) -> None:
    arbor.init(database_url=pg_url, num_cpus=2, object_store_memory=100 * 1024**2)
    try:
        for index in range(4):
            ref = arbor.spawn(Counter, f"fleet/{index}", start=index)
            ref.ask("add", 100)
        arbor.spawn(Counter, "fleet/stopped")
        arbor.stop("fleet/stopped")
    finally:
        arbor.shutdown()

    # A reference kept after the shutdown raises instead of starting a new Ray cluster.
    with pytest.raises(arbor.ClusterUnavailable, match="call arbor.init"):
        ref.ask("get")
    with pytest.raises(arbor.ClusterUnavailable, match="call arbor.init"):
        ref.send("add", 1)
    assert not ray.is_initialized()

    arbor.init(database_url=pg_url, num_cpus=2, object_store_memory=100 * 1024**2)
    try:
        values = [arbor.get(f"fleet/{index}").ask("get", timeout=90) for index in range(4)]
        statuses = {info.name: info.status for info in arbor.list_agents()}
    finally:
        arbor.shutdown()

    assert values == [100, 101, 102, 103]
    assert statuses["fleet/stopped"] == "stopped"
    assert statuses["fleet/0"] == "running"
