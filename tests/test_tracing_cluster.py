"""One trace follows an ask chain of three agents on two nodes, and their logs carry it.

The agents export spans over OTLP/HTTP to a small collector this test runs on 127.0.0.1;
it decodes the protobuf requests with the OpenTelemetry proto package. The module runs
once per placement, each time on a new cluster and database.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import ray
import ray.cluster_utils
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

import arbor
from arbor.persistence import open_store
from tests.agents import Chain
from tests.conftest import PLACEMENTS, create_pg_database, drop_pg_database, hosted

# Seconds to wait for the batch span processors of the agent processes to export.
EXPORT_TIMEOUT_S = 60.0


class Collector(BaseHTTPRequestHandler):
    """Keeps every span posted to /v1/traces as (trace id, span id, parent id, name)."""

    spans: list[tuple[str, str, str, str, dict[str, Any]]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        with self.lock:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        attributes = {item.key: item.value.string_value for item in span.attributes}
                        self.spans.append(
                            (
                                span.trace_id.hex(),
                                span.span_id.hex(),
                                span.parent_span_id.hex(),
                                span.name,
                                attributes,
                            )
                        )
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture(scope="module")
def collector() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), Collector)
    Collector.spans = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module", params=PLACEMENTS)
def placement(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def database_url(placement: str) -> Iterator[str]:
    url = create_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture(scope="module")
def nodes(collector: str, database_url: str, placement: str) -> Iterator[list[str]]:
    """A head without CPUs and two worker nodes whose processes export spans to the collector.

    Spawns get the placement of the run by default. Hosted agents run in one host per
    worker node, because the head offers no CPU for a host.
    """
    variables = (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_BSP_SCHEDULE_DELAY",
        "ARBOR_LOG_LEVEL",
        "ARBOR_DEFAULT_PLACEMENT",
    )
    saved = {key: os.environ.get(key) for key in variables}
    # Agent processes inherit these; the handler's INFO line must reach the log files.
    os.environ["ARBOR_LOG_LEVEL"] = "INFO"
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"
    os.environ["ARBOR_DEFAULT_PLACEMENT"] = placement
    with Collector.lock:
        Collector.spans.clear()
    cluster = ray.cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "node_ip_address": "127.0.0.1",
            "object_store_memory": 80 * 1024**2,
            "include_dashboard": False,
        },
    )
    workers = [
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", object_store_memory=80 * 1024**2)
        for _ in range(2)
    ]
    cluster.wait_for_nodes()
    try:
        arbor.init(address=cluster.address, database_url=database_url)
        yield [worker.node_id for worker in workers]
    finally:
        arbor.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def spawn_chain(node_ids: list[str]) -> list[str]:
    """Spawn three agents that ask each other in turn, the middle one on the other node.

    A dedicated agent is pinned to its node. A hosted agent goes to the host with the
    fewest agents, so with one host per node the three alternate between the two nodes.
    """
    names = ["trace/a", "trace/b", "trace/c"]
    placements = [node_ids[0], node_ids[1], node_ids[0]]
    for index, (name, node_id) in enumerate(zip(names, placements, strict=True)):
        following = names[index + 1 : index + 2]
        capabilities = [f"arbor://agent/ask/{target}" for target in following]
        if hosted():
            arbor.spawn(Chain, name, capabilities=capabilities)
        else:
            pinned = {"node_id": node_id, "node_affinity": "hard"}
            arbor.spawn(Chain, name, capabilities=capabilities, **pinned)
    return names


def test_one_trace_spans_an_ask_chain_across_nodes(nodes: list[str]) -> None:
    names = spawn_chain(nodes)
    hops = arbor.get(names[0]).ask("relay", names[1:])
    assert [hop["agent"] for hop in hops] == names
    trace_ids = {hop["trace_id"] for hop in hops}
    assert len(trace_ids) == 1
    assert None not in trace_ids
    (trace_id,) = trace_ids
    nodes_of = [arbor.get(name).info()["node_id"] for name in names]
    assert set(nodes_of) == set(nodes)
    assert nodes_of[0] != nodes_of[1]
    assert nodes_of[1] != nodes_of[2]

    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    spans: dict[str, tuple[str, str, str, str, dict[str, Any]]] = {}
    while time.monotonic() < deadline:
        with Collector.lock:
            spans = {
                span[1]: span
                for span in Collector.spans
                if span[0] == trace_id and span[3] == "arbor.message"
            }
        if len(spans) >= 3:
            break
        time.sleep(0.2)
    assert len(spans) == 3, spans
    by_agent = {span[4]["arbor.agent"]: span for span in spans.values()}
    assert by_agent["trace/a"][2] == ""
    assert by_agent["trace/b"][2] == by_agent["trace/a"][1]
    assert by_agent["trace/c"][2] == by_agent["trace/b"][1]
    for hop in hops:
        assert by_agent[hop["agent"]][1] == hop["span_id"]

    # Each relay changes state, so its durable checkpoint is a child of its message span.
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    while time.monotonic() < deadline:
        with Collector.lock:
            checkpoints = [
                span
                for span in Collector.spans
                if span[0] == trace_id and span[3] == "arbor.checkpoint"
            ]
            spawns = [span for span in Collector.spans if span[3] == "arbor.spawn"]
        if len(checkpoints) >= 3 and len(spawns) >= 3:
            break
        time.sleep(0.2)
    assert {span[2] for span in checkpoints} == set(spans)
    assert {span[4]["arbor.agent"] for span in spawns} >= set(names)

    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
    lines = []
    for hop in hops:
        for path in logs_dir.glob(f"worker-*-{hop['pid']}.err"):
            for line in path.read_text(errors="replace").splitlines():
                if "relay step" in line and line.lstrip().startswith("{"):
                    lines.append(json.loads(line[line.index("{") :]))
    assert {line["agent_id"] for line in lines} == set(names)
    assert all(line["trace_id"] == trace_id for line in lines)
    assert all(line["agent_type"] == "Chain" for line in lines)


def test_denial_audit_row_carries_the_trace_id(nodes: list[str], database_url: str) -> None:
    names = ["trace/a", "trace/b", "trace/c"]
    if not arbor.list_agents():
        spawn_chain(nodes)
    # trace/c holds no capability to ask trace/a, so the third hop is denied.
    with pytest.raises(arbor.HandlerError, match="CapabilityDenied"):
        arbor.get(names[0]).ask("relay", [names[1], names[2], names[0]])
    store = open_store(database_url)
    try:
        (row,) = store.list_audit(principal="trace/c", decision="denied", limit=10)
    finally:
        store.close()
    assert row.trace_id is not None
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    while time.monotonic() < deadline:
        with Collector.lock:
            agents = {
                span[4].get("arbor.agent") for span in Collector.spans if span[0] == row.trace_id
            }
        if {"trace/a", "trace/b", "trace/c"} <= agents:
            break
        time.sleep(0.2)
    assert {"trace/a", "trace/b", "trace/c"} <= agents
    with Collector.lock:
        denied = [
            span
            for span in Collector.spans
            if span[0] == row.trace_id and span[3] == "arbor.capability.denied"
        ]
    assert [span[4]["arbor.principal"] for span in denied] == ["trace/c"]
