"""A real Prometheus scrapes an Arbor cluster's metrics, which count the workload that ran.

The module runs once per placement, each time on a new cluster and database.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import ray

import arbor
from tests.agents import Counter, Delegator, Sleeper
from tests.conftest import PLACEMENTS, create_pg_database, drop_pg_database
from tests.test_cli import run_arbor
from tests.test_prometheus_export import (
    PROMETHEUS,
    free_port,
    prometheus_url,  # noqa: F401 - a fixture this module uses
    scalar,
)

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus not found; install Debian's prometheus package (apt-get install prometheus)",
)

EXPORT_TIMEOUT_S = 90.0
COUNTERS = 3
ASKS_EACH = 10


@pytest.fixture(scope="module", params=PLACEMENTS)
def cluster(request: pytest.FixtureRequest) -> Iterator[dict[str, object]]:
    """A local cluster with Arbor whose metrics agent serves Prometheus text on the port.

    Spawns get the placement of the run by default.
    """
    port = free_port()
    database_url = create_pg_database()
    ray.init(
        # A new cluster even when another one runs on this machine.
        address="local",
        num_cpus=2,
        object_store_memory=100 * 1024**2,
        # The registry reads mailbox depths from Ray's state API, which the dashboard serves.
        include_dashboard=True,
        namespace="arbor",
        _metrics_export_port=port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    settings = {"ARBOR_MAILBOX_SAMPLE_INTERVAL_S": "1", "ARBOR_DEFAULT_PLACEMENT": request.param}
    previous = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        arbor.init(database_url=database_url)
        yield {"port": port, "database_url": database_url, "placement": request.param}
    finally:
        arbor.shutdown()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        drop_pg_database(database_url)


@pytest.fixture(scope="module")
def export_port(cluster: dict[str, object]) -> int:
    return int(cluster["port"])  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def workload(export_port: int) -> dict[str, int]:
    for index in range(COUNTERS):
        ref = arbor.spawn(Counter, f"metrics/c{index}")
        for _ in range(ASKS_EACH):
            ref.ask("add", 1)
    asker = arbor.spawn(Delegator, "metrics/asker")
    with pytest.raises(arbor.HandlerError, match="CapabilityDenied"):
        asker.ask("ask_other", "metrics/c0", "get")
    arbor.stop("metrics/c2")
    return {"spawned": COUNTERS + 1, "asks": COUNTERS * ASKS_EACH, "denied": 1, "stopped": 1}


def wait_for(prometheus_url: str, expr: str, predicate: object) -> float | None:  # noqa: F811
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    value = None
    while time.monotonic() < deadline:
        value = scalar(prometheus_url, expr)
        if value is not None and predicate(value):  # type: ignore[operator]
            return value
        time.sleep(0.5)
    return value


def test_spawns_messages_checkpoints_and_denials_reach_prometheus(
    workload: dict[str, int],
    prometheus_url: str,  # noqa: F811
) -> None:
    spawned = wait_for(
        prometheus_url,
        "sum(ray_arbor_agents_spawned_total)",
        lambda value: value >= workload["spawned"],
    )
    assert spawned == workload["spawned"]

    handled = wait_for(
        prometheus_url,
        'sum(ray_arbor_agent_message_duration_seconds_count{status="ok",agent_type="Counter"})',
        lambda value: value >= workload["asks"],
    )
    assert handled == workload["asks"]

    # Every add changes the state, so each ask commits a checkpoint, plus one per spawn.
    writes = wait_for(
        prometheus_url,
        'sum(ray_arbor_checkpoint_writes_total{status="ok",agent_type="Counter"})',
        lambda value: value >= workload["asks"] + COUNTERS,
    )
    assert writes == workload["asks"] + COUNTERS

    denied = wait_for(
        prometheus_url,
        'sum(ray_arbor_capability_denied_total{reason="missing"})',
        lambda value: value >= workload["denied"],
    )
    assert denied == workload["denied"]

    stopped = wait_for(
        prometheus_url,
        "sum(ray_arbor_agents_stopped_total)",
        lambda value: value >= workload["stopped"],
    )
    assert stopped == workload["stopped"]

    active = wait_for(
        prometheus_url,
        'sum(ray_arbor_agents_active{agent_type="Counter"})',
        lambda value: value == COUNTERS - workload["stopped"],
    )
    assert active == COUNTERS - workload["stopped"]


def test_arbor_metrics_prints_the_workload(
    workload: dict[str, int],
    prometheus_url: str,  # noqa: F811 - waits until the exports hold the workload
    cluster: dict[str, object],
) -> None:
    wait_for(
        prometheus_url,
        'sum(ray_arbor_agent_message_duration_seconds_count{agent_type="Counter"})',
        lambda value: value >= workload["asks"],
    )
    env = {
        "ARBOR_RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "ARBOR_DATABASE_URL": str(cluster["database_url"]),
    }
    result = run_arbor("metrics", "--interval", "0.5", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = {
        line.split("│")[1].strip(): line.split("│")[2].strip() for line in _rows(result.stdout)
    }
    assert lines["agents"] == "3 running, 1 stopped"
    assert float(lines["messages handled"]) >= workload["asks"]
    assert float(lines["capability denials"]) == workload["denied"]
    p50 = lines["handling time p50 (all time / last 0.5 s)"].split(" / ")[0]
    assert p50.endswith(" ms")
    assert float(p50[:-3]) > 0


def _rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.count("│") >= 3]


def test_queued_messages_show_as_mailbox_depth(
    cluster: dict[str, object],
    prometheus_url: str,  # noqa: F811
) -> None:
    sleeper = arbor.spawn(Sleeper, "metrics/sleeper")
    placement = next(info.placement for info in arbor.list_agents() if info.name == sleeper.name)
    assert placement == cluster["placement"]
    node = sleeper.info()["node_id"]
    for _ in range(20):
        sleeper.send("nap", 0.5)
    query = f'sum(ray_arbor_mailbox_depth{{agent_type="Sleeper",node="{node}"}})'

    queued = wait_for(prometheus_url, query, lambda value: value >= 5)
    assert queued is not None
    assert queued >= 5
    # Ray's task events lag, so the message being handled may still count as queued.
    assert queued <= 20

    # The ask queues behind the sends, so its reply means the mailbox is empty.
    assert sleeper.ask("nap", 0, timeout=60) == 0
    drained = wait_for(prometheus_url, query, lambda value: value == 0)
    assert drained == 0
