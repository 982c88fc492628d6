"""HTTP ask through the gateway against a direct `AgentRef.ask`, and gateway requests/s.

Round trip: one driver thread alternates a direct ``AgentRef.ask("get")`` with the same
ask sent as ``POST /v1/agents/<name>/messages``, one call in flight at a time, in rounds
that cycle through the configurations. The handler is read-only, so no checkpoint is
written and the difference is the gateway's own cost: HTTP parsing, Serve's proxy and
router, key authentication, the capability check, and JSON. ``GET /healthz``, which
does no Arbor work, shows what Serve's proxy and replica alone cost. HTTP calls go over one
keep-alive connection (``http.client``), and, as a second configuration, through
`arbor.connect`, which opens a new connection per request (urllib).

Throughput: a bounded load generator of ``--concurrency`` threads, each with its own
keep-alive connection, sends asks for ``--duration`` seconds; requests per second is the
number of replies over the wall time. Load generator, Serve proxy, gateway replica and
agent all share the machine's CPUs.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_gateway --calls 500
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import threading
import time
import urllib.request

import arbor
from benchmarks import common
from benchmarks.bench_agents import BenchCounter

AGENT = "bench/gateway"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--calls", type=int, default=500, help="measured calls per configuration (default: 500)"
    )
    parser.add_argument(
        "--warmup", type=int, default=50, help="unmeasured calls per configuration (default: 50)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, help="load generator threads (default: 8)"
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds of load per run (default: 10)"
    )
    parser.add_argument(
        "--store",
        choices=["sqlite", "postgresql"],
        default="postgresql",
        help="store of the cluster (default: postgresql)",
    )
    common.add_cluster_arguments(parser)
    args = parser.parse_args()

    common.print_header("Gateway ask round trip and throughput")
    with common.temporary_database(args.store, args.pg_admin_url) as database_url:
        common.start_arbor(database_url, args)
        try:
            run(args, database_url)
        finally:
            from ray import serve

            serve.shutdown()
            arbor.shutdown()
    common.print_footer()


def run(args: argparse.Namespace, database_url: str) -> None:
    from arbor.gateway import create_api_key, deploy, register_type
    from arbor.persistence import open_store

    register_type("bench", BenchCounter)
    port = _free_port()
    url = deploy(port=port)
    _wait_ready(url)
    store = open_store(database_url)
    created = create_api_key(store, "bench")
    store.close()
    arbor.grant(created.record.principal, "arbor://agent/ask/bench/**")

    direct = arbor.spawn(BenchCounter, AGENT)
    client = arbor.connect(url, api_key=created.key)
    remote = client.get(AGENT)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"handler": "get"}).encode()
    headers = {"Authorization": f"Bearer {created.key}", "Content-Type": "application/json"}

    def http_ask() -> object:
        connection.request("POST", f"/v1/agents/{AGENT}/messages", body, headers)
        response = connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
        return json.loads(payload)["reply"]

    def http_healthz() -> object:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        return response.read()

    configurations = {
        "direct AgentRef.ask": lambda: direct.ask("get"),
        "HTTP GET /healthz, keep-alive": http_healthz,
        "HTTP ask, keep-alive": http_ask,
        "HTTP ask, arbor.connect": lambda: remote.ask("get"),
    }
    samples: dict[str, list[float]] = {label: [] for label in configurations}
    for call in configurations.values():
        for _ in range(args.warmup):
            call()
    for _ in range(args.calls):
        for label, call in configurations.items():
            started = time.perf_counter()
            call()
            samples[label].append(time.perf_counter() - started)
    connection.close()

    baseline = common.summarize(samples["direct AgentRef.ask"])
    rows = []
    for label, values in samples.items():
        stats = common.summarize(values)
        rows.append(
            [label, stats["p50"], stats["p99"], stats["mean"], stats["p50"] / baseline["p50"]]
        )
    print()
    print(f"Round trip, {args.calls} calls each, {args.store} store (ms):")
    print(common.format_table(["configuration", "p50", "p99", "mean", "p50 ratio"], rows))

    rate, latency, errors = _load(port, headers, body, args.concurrency, args.duration)
    print()
    print(f"Throughput: {args.concurrency} threads for {args.duration:.0f} s, keep-alive HTTP asks")
    print(
        common.format_table(
            ["requests/s", "p50 ms", "p99 ms", "errors"],
            [[rate, latency["p50"], latency["p99"], errors]],
        )
    )


def _load(
    port: int, headers: dict[str, str], body: bytes, threads: int, duration: float
) -> tuple[float, dict[str, float], int]:
    """Send asks from ``threads`` threads for ``duration`` s; returns rate, latency, errors."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def worker() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        local: list[float] = []
        failed = 0
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            connection.request("POST", f"/v1/agents/{AGENT}/messages", body, headers)
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                local.append(time.perf_counter() - started)
            else:
                failed += 1
        connection.close()
        with lock:
            latencies.extend(local)
            errors[0] += failed

    began = time.monotonic()
    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    elapsed = time.monotonic() - began
    return len(latencies) / elapsed, common.summarize(latencies), errors[0]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_ready(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"gateway at {url} not ready within {timeout} s")
        time.sleep(0.3)


if __name__ == "__main__":
    main()
