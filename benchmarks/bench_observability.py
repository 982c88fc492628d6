"""Observability cost: the same ask workload with metrics, traces and logs off and on.

The driver asks a `Pinger` agent ``--asks`` times, one at a time, and each time the
pinger asks a `BenchCounter` agent from inside its handler: two messages per request,
the first starting a trace and the second continuing it through the envelope. Each
setting runs on a new local cluster, ``--rounds`` times, in alternating order:

- off: ``ARBOR_METRICS=false``, no OTLP endpoint, text logs at WARNING;
- metrics: metrics on, no traces, text logs at WARNING;
- full 1.0: metrics, traces sampled at 1.0 and exported over OTLP/HTTP to a collector
  this script runs on 127.0.0.1 (it accepts and drops them), JSON logs at INFO;
- full 0.1: the same with traces sampled at 0.1.

Throughput is asks per second over a round; the table compares each setting with off.
It varies with whatever else runs on the machine, so the table also gives the CPU time the
two agent processes and the driver (which runs the collector) spent per ask, from their
Linux CPU-time clocks: on a shared machine that moves far less than throughput does.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_observability --asks 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import arbor
from arbor.config import reset_settings
from benchmarks import common
from benchmarks.bench_agents import BenchCounter, Pinger

SETTINGS: dict[str, dict[str, str | None]] = {
    "off": {"ARBOR_METRICS": "false", "ARBOR_LOG_FORMAT": "text", "ARBOR_LOG_LEVEL": "WARNING"},
    "metrics": {"ARBOR_METRICS": "true", "ARBOR_LOG_FORMAT": "text", "ARBOR_LOG_LEVEL": "WARNING"},
    "full 1.0": {
        "ARBOR_METRICS": "true",
        "ARBOR_LOG_FORMAT": "json",
        "ARBOR_LOG_LEVEL": "INFO",
        "ARBOR_TRACE_SAMPLE_RATIO": "1.0",
    },
    "full 0.1": {
        "ARBOR_METRICS": "true",
        "ARBOR_LOG_FORMAT": "json",
        "ARBOR_LOG_LEVEL": "INFO",
        "ARBOR_TRACE_SAMPLE_RATIO": "0.1",
    },
}
VARIABLES = (
    "ARBOR_METRICS",
    "ARBOR_LOG_FORMAT",
    "ARBOR_LOG_LEVEL",
    "ARBOR_TRACE_SAMPLE_RATIO",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


class _DropCollector(BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP span exports and drops them."""

    def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--asks", type=int, default=1000, help="asks per round (default: 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per setting (default: 3)")
    parser.add_argument(
        "--store",
        choices=("sqlite", "postgresql"),
        default="postgresql",
        help="checkpoint store, created empty and deleted afterwards (default: postgresql)",
    )
    common.add_cluster_arguments(parser)
    args = parser.parse_args()

    server = HTTPServer(("127.0.0.1", 0), _DropCollector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    common.print_header(
        f"Observability cost, {args.asks} asks x {args.rounds} rounds per setting, "
        f"{args.store} store"
    )
    samples: dict[str, list[float]] = {name: [] for name in SETTINGS}
    rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
    agent_cpu: dict[str, list[float]] = {name: [] for name in SETTINGS}
    driver_cpu: dict[str, list[float]] = {name: [] for name in SETTINGS}
    names = list(SETTINGS)
    try:
        for round_index in range(args.rounds):
            order = names if round_index % 2 == 0 else list(reversed(names))
            for name in order:
                result = run_round(args, name, endpoint)
                samples[name].extend(result.seconds)
                rates[name].append(result.rate)
                agent_cpu[name].append(result.agent_cpu_us)
                driver_cpu[name].append(result.driver_cpu_us)
    finally:
        server.shutdown()
        for variable in VARIABLES:
            os.environ.pop(variable, None)
        reset_settings()

    off_p99 = common.summarize(samples["off"])["p99"]
    # The median round, because single rounds on a fresh cluster vary by about 10 %.
    off_rate = statistics.median(rates["off"])
    off_agent_cpu = statistics.median(agent_cpu["off"])
    rows = []
    for name in names:
        stats = common.summarize(samples[name])
        rate = statistics.median(rates[name])
        cpu = statistics.median(agent_cpu[name])
        rows.append(
            [
                name,
                int(stats["n"]),
                stats["p50"],
                stats["p99"],
                f"{rate:.0f}",
                f"{(1 - rate / off_rate) * 100:+.1f} %",
                f"{stats['p99'] / off_p99:.3f}x",
                f"{cpu:.0f}",
                f"{cpu - off_agent_cpu:+.0f}",
                f"{statistics.median(driver_cpu[name]):.0f}",
            ]
        )
    print(
        common.format_table(
            [
                "setting",
                "n",
                "p50 ms",
                "p99 ms",
                "requests/s (median round)",
                "throughput lost vs off",
                "p99 / off",
                "agent CPU µs/request",
                "vs off",
                "driver CPU µs/request",
            ],
            rows,
        )
    )
    common.print_footer()


@dataclass
class RoundResult:
    """One round of one setting: the asks' latencies and what the round cost."""

    seconds: list[float]
    rate: float
    # CPU time per ask, in microseconds, of the two agent processes together and of the
    # driver process (the asks and the collector thread).
    agent_cpu_us: float
    driver_cpu_us: float


def run_round(args: argparse.Namespace, name: str, endpoint: str) -> RoundResult:
    """Run one round of the workload on a new cluster with setting ``name``."""
    for variable in VARIABLES:
        os.environ.pop(variable, None)
    for variable, value in SETTINGS[name].items():
        if value is not None:
            os.environ[variable] = value
    if name.startswith("full"):
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    reset_settings()
    with common.temporary_database(args.store, args.pg_admin_url) as database_url:
        common.start_arbor(database_url, args)
        try:
            arbor.spawn(BenchCounter, "bench/target")
            pinger = arbor.spawn(
                Pinger, "bench/pinger", capabilities=["arbor://agent/ask/bench/target"]
            )
            for _ in range(100):  # warm-up
                pinger.ask("ping", "bench/target", 1)
            agents = [pinger.info()["pid"], arbor.get("bench/target").info()["pid"]]
            measured: list[float] = []
            agent_cpu_start = _cpu_seconds(agents)
            driver_cpu_start = time.process_time()
            start = time.perf_counter()
            for _ in range(args.asks):
                sent = time.perf_counter()
                pinger.ask("ping", "bench/target", 1)
                measured.append(time.perf_counter() - sent)
            elapsed = time.perf_counter() - start
            driver_cpu = time.process_time() - driver_cpu_start
            agent_cpu = _cpu_seconds(agents) - agent_cpu_start
        finally:
            arbor.shutdown()
    return RoundResult(
        measured,
        args.asks / elapsed,
        agent_cpu / args.asks * 1e6,
        driver_cpu / args.asks * 1e6,
    )


def _cpu_seconds(pids: list[int]) -> float:
    """Return the CPU seconds that processes ``pids`` have used, over all their threads.

    It reads each process's CPU-time clock, which Linux keeps in nanoseconds, where
    ``psutil``'s ``cpu_times`` counts clock ticks of 10 ms, too coarse for a few hundred
    asks. The clock id of a process is what glibc's ``clock_getcpuclockid`` returns, which
    Python does not wrap: ``(~pid << 3) | 2``, the kernel's ``CPUCLOCK_SCHED`` of that pid.
    """
    return sum(time.clock_gettime((~pid << 3) | 2) for pid in pids)


if __name__ == "__main__":
    main()
