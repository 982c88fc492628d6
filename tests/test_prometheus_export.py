"""Arbor's metrics reach a real Prometheus through Ray's metrics export.

One local Ray cluster on 127.0.0.1 exports metrics on a free port. Two actors record known
numbers through arbor.observability.metrics, a Prometheus server started by the test
scrapes the export port, and the test queries Prometheus's HTTP API until each metric
family shows exactly what was recorded.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from arbor.observability import metrics
from tests.promql_names import DASHBOARDS, dashboard_queries, metric_names

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus not found; install Debian's prometheus package (apt-get install prometheus)",
)

# Seconds to wait for recorded values to pass through Ray's metrics agent and a scrape.
EXPORT_TIMEOUT_S = 90.0
SCRAPE_INTERVAL = "1s"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@ray.remote(num_cpus=0)
class Recorder:
    """Records a fixed workload through Arbor's metric functions, `rounds` times."""

    def record(self, rounds: int) -> str:
        node = ray.get_runtime_context().get_node_id()
        for _ in range(rounds):
            metrics.record_spawn("Counter", node)
            metrics.record_spawn_failure("Counter", "timeout")
            metrics.record_stop("Counter", node, "requested")
            metrics.record_restart("Counter", node, "crash")
            for _ in range(3):
                metrics.record_message("Counter", "add", "ok", 0.002)
            metrics.record_message("Counter", "add", "error", 0.2)
            metrics.record_checkpoint("Counter", 100, 0.004)
            metrics.record_checkpoint("Counter", 100, 0.05, status="conflict")
            metrics.record_recovery("Counter", "process", 0.3)
            metrics.record_reconciler_action("recreate")
            metrics.record_node_lost()
            metrics.record_capability_grant("agent", "send")
            metrics.record_capability_revocation("cascade", count=2)
            metrics.record_capability_denied("agent", "ask", "missing")
            metrics.record_audit_row("capability.grant", "allow")
            metrics.record_gateway_request("/agents/{name}", "GET", 200, 0.01)
            metrics.record_gateway_request("/agents", "POST", 403, 0.001)
            metrics.record_topic_published()
            metrics.record_topic_delivery("Counter", "ok")
            metrics.record_topic_skipped("Counter", 2)
            metrics.record_reminder_fired("Counter", "ok", 0.003)
        metrics.set_active_agents("Counter", node, 3)
        metrics.set_mailbox_depth("Counter", node, 4)
        metrics.set_nodes(alive=1, dead=0)
        return node


@pytest.fixture(scope="module")
def export_port() -> Iterator[int]:
    """A one-node Ray cluster whose metrics agent serves Prometheus text on the port."""
    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    ray.init(
        # A new cluster even when another one runs on this machine.
        address="local",
        num_cpus=1,
        object_store_memory=80 * 1024 * 1024,
        include_dashboard=False,
        _metrics_export_port=port,
        # Workers send their metrics to the agent every second instead of every 10 s.
        _system_config={"metrics_report_interval_ms": 1000},
    )
    try:
        yield port
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def prometheus_url(export_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus server on 127.0.0.1 that scrapes the Ray metrics export port."""
    assert PROMETHEUS is not None
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n"
        f"  scrape_interval: {SCRAPE_INTERVAL}\n"
        f"  evaluation_interval: {SCRAPE_INTERVAL}\n"
        "scrape_configs:\n"
        "  - job_name: ray\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{export_port}']\n"
    )
    port = free_port()
    log = (workdir / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, workdir / "prometheus.log")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)
        log.close()


def wait_until_ready(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"prometheus exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    pytest.fail(f"prometheus at {url} not ready after 60 s:\n{log_path.read_text()}")


def query(prometheus_url: str, expr: str) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{prometheus_url}/api/v1/query?{params}", timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def scalar(prometheus_url: str, expr: str) -> float | None:
    result = query(prometheus_url, expr)
    if not result:
        return None
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


@pytest.fixture(scope="module")
def recorded(export_port: int, prometheus_url: str) -> dict[str, Any]:
    """Run the workload in two actors: 2 rounds in one and 3 in the other."""
    first = Recorder.remote()
    second = Recorder.remote()
    nodes = ray.get([first.record.remote(2), second.record.remote(3)], timeout=120)
    # The workload's totals, which the queries below expect.
    expected = {
        "sum(ray_arbor_agents_spawned_total)": 5,
        'sum(ray_arbor_agent_spawn_failures_total{reason="timeout"})': 5,
        'sum(ray_arbor_agents_stopped_total{reason="requested"})': 5,
        'sum(ray_arbor_agents_restarted_total{reason="crash"})': 5,
        "sum(ray_arbor_agents_active)": 6,
        "sum(ray_arbor_mailbox_depth)": 8,
        "sum(ray_arbor_agent_message_duration_seconds_count)": 20,
        'sum(ray_arbor_agent_message_duration_seconds_count{status="ok",handler="add"})': 15,
        'sum(ray_arbor_agent_message_duration_seconds_count{status="error"})': 5,
        'sum(ray_arbor_agent_message_duration_seconds_bucket{le="0.0025"})': 15,
        'sum(ray_arbor_agent_message_duration_seconds_bucket{le="+Inf"})': 20,
        'sum(ray_arbor_checkpoint_writes_total{status="ok"})': 5,
        'sum(ray_arbor_checkpoint_writes_total{status="conflict"})': 5,
        "sum(ray_arbor_checkpoint_bytes_total)": 500,
        "sum(ray_arbor_checkpoint_duration_seconds_count)": 10,
        'sum(ray_arbor_recovery_duration_seconds_count{path="process"})': 5,
        'sum(ray_arbor_recovery_duration_seconds_bucket{path="process",le="0.25"})': 0,
        'sum(ray_arbor_recovery_duration_seconds_bucket{path="process",le="0.5"})': 5,
        'sum(ray_arbor_reconciler_actions_total{action="recreate"})': 5,
        'sum(ray_arbor_nodes{state="alive"})': 2,
        "sum(ray_arbor_nodes_lost_total)": 5,
        'sum(ray_arbor_capability_grants_total{delegated="false"})': 5,
        'sum(ray_arbor_capability_revocations_total{reason="cascade"})': 10,
        'sum(ray_arbor_capability_denied_total{kind="agent",operation="ask"})': 5,
        'sum(ray_arbor_audit_rows_total{decision="allow"})': 5,
        'sum(ray_arbor_gateway_requests_total{status="200"})': 5,
        'sum(ray_arbor_gateway_requests_total{status="403",route="/agents"})': 5,
        "sum(ray_arbor_gateway_request_duration_seconds_count)": 10,
        "sum(ray_arbor_topic_events_published_total)": 5,
        'sum(ray_arbor_topic_deliveries_total{status="ok"})': 5,
        "sum(ray_arbor_topic_events_skipped_total)": 10,
        'sum(ray_arbor_reminders_fired_total{status="ok"})': 5,
        'sum(ray_arbor_reminder_lateness_seconds_bucket{le="0.005"})': 5,
        "sum(ray_arbor_reminder_lateness_seconds_count)": 5,
    }
    try:
        yield {"nodes": nodes, "expected": expected}
    finally:
        ray.kill(first)
        ray.kill(second)


def wait_for_values(prometheus_url: str, expected: dict[str, float]) -> dict[str, float | None]:
    """Query until every expression returns its expected value or the timeout passes."""
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    while True:
        actual = {expr: scalar(prometheus_url, expr) for expr in expected}
        if actual == {expr: float(value) for expr, value in expected.items()}:
            return actual
        if time.monotonic() > deadline:
            return actual
        time.sleep(1)


def test_counters_match_recorded_workload(prometheus_url: str, recorded: dict[str, Any]) -> None:
    expected = recorded["expected"]

    actual = wait_for_values(prometheus_url, expected)

    for expr, value in expected.items():
        assert actual[expr] == value, f"{expr}: expected {value}, Prometheus has {actual[expr]}"


def test_every_family_exported_with_ray_names(
    prometheus_url: str, recorded: dict[str, Any]
) -> None:
    wait_for_values(prometheus_url, recorded["expected"])
    with urllib.request.urlopen(f"{prometheus_url}/api/v1/label/__name__/values", timeout=10) as r:
        names = set(json.load(r)["data"])

    arbor_names = {name for name in names if "arbor_" in name}
    assert arbor_names == set(metrics.exported_series_names())


def test_series_carry_node_and_worker_labels(prometheus_url: str, recorded: dict[str, Any]) -> None:
    wait_for_values(prometheus_url, recorded["expected"])

    series = query(prometheus_url, "ray_arbor_agents_spawned_total")

    assert {item["metric"]["node"] for item in series} == set(recorded["nodes"])
    assert len({item["metric"]["WorkerId"] for item in series}) == 2
    assert {item["metric"]["agent_type"] for item in series} == {"Counter"}


def test_dashboard_metrics_exist_in_export(prometheus_url: str, recorded: dict[str, Any]) -> None:
    wait_for_values(prometheus_url, recorded["expected"])
    with urllib.request.urlopen(f"{prometheus_url}/api/v1/label/__name__/values", timeout=10) as r:
        exported = set(json.load(r)["data"])

    for path in DASHBOARDS:
        for where, expr in dashboard_queries(path):
            missing = metric_names(expr) - exported
            assert not missing, f"{where}: {sorted(missing)} not exported by the cluster"


def test_metrics_off_records_nothing_in_actor(
    prometheus_url: str, recorded: dict[str, Any]
) -> None:
    wait_for_values(prometheus_url, recorded["expected"])
    silent = Recorder.options(runtime_env={"env_vars": {"ARBOR_METRICS": "false"}}).remote()
    try:
        ray.get(silent.record.remote(4), timeout=120)
        # Three report intervals and three scrapes: long enough for a value to arrive.
        time.sleep(5)

        series = query(prometheus_url, "ray_arbor_agents_spawned_total")
        assert len(series) == 2
        assert scalar(prometheus_url, "sum(ray_arbor_agents_spawned_total)") == 5
    finally:
        ray.kill(silent)


def test_cluster_and_export_on_loopback(export_port: int) -> None:
    (node,) = ray.nodes()

    assert node["NodeManagerAddress"] == "127.0.0.1"
    assert node["MetricsExportPort"] == export_port
    with socket.create_connection(("127.0.0.1", export_port), timeout=5):
        pass
