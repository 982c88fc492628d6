"""Ask round trip: `AgentRef.ask` against a bare Ray actor method call.

Each configuration is timed call by call from one driver thread, one call in flight at a
time. The calls run in rounds that cycle through the configurations, so a slow period on
a shared machine spreads over all of them instead of landing on one.

Arbor configurations:

- a read-only handler, whose state does not change, so no checkpoint is written;
- a state-changing handler with durability "durable", where a checkpoint commits before
  the reply, on SQLite and on PostgreSQL;
- a state-changing handler with durability "periodic", where a background thread
  checkpoints every ARBOR_CHECKPOINT_INTERVAL_S.

Baselines: ``ray.get(actor.add.remote(1))`` on a bare async actor, and on a bare
synchronous actor, the kind of actor Arbor runs each agent in.
Arbor's store is chosen per cluster, so each store gets its own cluster and baselines.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_ask --calls 2000
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

import arbor
from benchmarks import common
from benchmarks.bench_agents import BenchCounter, RawCounter, RawSyncCounter

RAW_NAMESPACE = "bench-raw"
STORE_LABELS = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


@dataclass
class Configuration:
    """One timed call and the samples it collected, in seconds."""

    label: str
    call: Callable[[], object]
    baseline: bool = False
    samples: list[float] = field(default_factory=list)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--calls", type=int, default=2000, help="measured calls per configuration (default: 2000)"
    )
    parser.add_argument(
        "--warmup", type=int, default=200, help="unmeasured calls per configuration (default: 200)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="rounds that cycle through the configurations (default: 4)",
    )
    parser.add_argument(
        "--stores",
        default="sqlite,postgresql",
        help="comma-separated stores to run, each in its own cluster (default: sqlite,postgresql)",
    )
    common.add_cluster_arguments(parser)
    args = parser.parse_args()
    stores = [store.strip() for store in args.stores.split(",") if store.strip()]

    common.print_header(f"Ask round trip, {args.calls} calls per configuration")
    rows: list[list[object]] = []
    for store in stores:
        with common.temporary_database(store, args.pg_admin_url) as database_url:
            common.start_arbor(database_url, args)
            try:
                rows.extend(run_store(store, args))
            finally:
                arbor.shutdown()
    headers = ["call", "n", "p50 ms", "p99 ms", "mean ms", "p50 / async", "mean / async"]
    headers.append("p50 / sync")
    print(common.format_table(headers, rows))
    print(
        "Ratios divide by the bare Ray async actor (async) and synchronous actor (sync) "
        "measured in the same cluster."
    )
    common.print_footer()


def run_store(store: str, args: argparse.Namespace) -> list[list[object]]:
    """Measure every configuration in the running cluster whose store is ``store``."""
    label = STORE_LABELS[store]
    raw_async = (
        ray.remote(RawCounter).options(name="raw-ask-async", namespace=RAW_NAMESPACE).remote()
    )
    raw_sync = (
        ray.remote(RawSyncCounter).options(name="raw-ask-sync", namespace=RAW_NAMESPACE).remote()
    )
    durable = arbor.spawn(BenchCounter, "bench/ask-durable", durability="durable")
    configurations = [
        Configuration(
            f"raw Ray async actor ({label} run)",
            lambda: ray.get(raw_async.add.remote(1)),
            baseline=True,
        ),
        Configuration(
            f"raw Ray sync actor ({label} run)",
            lambda: ray.get(raw_sync.add.remote(1)),
            baseline=True,
        ),
        Configuration(f"Arbor ask, read-only ({label})", lambda: durable.ask("get")),
        Configuration(f"Arbor ask, state change, durable, {label}", lambda: durable.ask("add", 1)),
    ]
    periodic = None
    if store == "sqlite":
        periodic = arbor.spawn(BenchCounter, "bench/ask-periodic", durability="periodic")
        configurations.append(
            Configuration(
                f"Arbor ask, state change, periodic, {label}", lambda: periodic.ask("add", 1)
            )
        )

    for configuration in configurations:
        for _ in range(args.warmup):
            configuration.call()
    per_round = max(args.calls // args.rounds, 1)
    for _ in range(args.rounds):
        for configuration in configurations:
            configuration.samples.extend(_time_calls(configuration.call, per_round))

    # Every state-changing ask of the durable agent was acknowledged, so all must be counted.
    adds = args.warmup + per_round * args.rounds
    count = durable.ask("get")
    assert count == adds, f"durable agent counted {count}, expected {adds}"
    if periodic is not None:
        count = periodic.ask("get")
        assert count == adds, f"periodic agent counted {count}, expected {adds}"

    arbor.stop(durable.name, purge=True)
    if periodic is not None:
        arbor.stop(periodic.name, purge=True)
    ray.kill(raw_async)
    ray.kill(raw_sync)
    return _rows(configurations)


def _time_calls(call: Callable[[], object], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def _rows(configurations: list[Configuration]) -> list[list[object]]:
    async_stats = common.summarize(configurations[0].samples)
    sync_stats = common.summarize(configurations[1].samples)
    rows: list[list[object]] = []
    for configuration in configurations:
        stats = common.summarize(configuration.samples)
        rows.append(
            [
                configuration.label,
                int(stats["n"]),
                stats["p50"],
                stats["p99"],
                stats["mean"],
                f"{stats['p50'] / async_stats['p50']:.2f}x",
                f"{stats['mean'] / async_stats['mean']:.2f}x",
                f"{stats['p50'] / sync_stats['p50']:.2f}x",
            ]
        )
    return rows


if __name__ == "__main__":
    main()
