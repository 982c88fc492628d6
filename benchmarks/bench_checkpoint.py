"""Checkpoint throughput: store writes per second, and durable asks per second end to end.

Part 1 calls the checkpoint store directly in this process, one write at a time, the way
an agent's commit does: ``write_checkpoint`` with a small state, a ~10 KB state, and a
small state plus a full deduplication window (the processed message ids and replies that
every checkpoint of a busy agent carries).

Part 2 sends state-changing asks to one durable agent, which commits a checkpoint before
each reply, first one at a time and then with several asks in flight. The raw-Ray
comparison sends the same calls to a bare async actor that keeps its counter in memory.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_checkpoint --writes 1000 --asks 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import ray

import arbor
from arbor.config import get_settings
from arbor.persistence import STARTING, AgentRecord, open_store
from benchmarks import common
from benchmarks.bench_agents import BenchCounter, RawCounter

RAW_NAMESPACE = "bench-raw"
STORE_LABELS = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
LARGE_STATE_BYTES = 10_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--writes", type=int, default=1000, help="direct store writes per state (default: 1000)"
    )
    parser.add_argument(
        "--asks", type=int, default=1000, help="asks per end-to-end configuration (default: 1000)"
    )
    parser.add_argument(
        "--in-flight",
        type=int,
        default=16,
        help="asks in flight at once in the concurrent end-to-end runs (default: 16)",
    )
    parser.add_argument(
        "--stores",
        default="sqlite,postgresql",
        help="comma-separated stores to run (default: sqlite,postgresql)",
    )
    common.add_cluster_arguments(parser)
    args = parser.parse_args()
    stores = [store.strip() for store in args.stores.split(",") if store.strip()]

    common.print_header("Checkpoint throughput")
    store_rows: list[list[object]] = []
    ask_rows: list[list[object]] = []
    notes: list[str] = []
    for store in stores:
        with common.temporary_database(store, args.pg_admin_url) as database_url:
            store_rows.extend(measure_store(store, database_url, args.writes))
            notes.append(describe_durability(store, database_url, args.writes))
        with common.temporary_database(store, args.pg_admin_url) as database_url:
            common.start_arbor(database_url, args)
            try:
                ask_rows.extend(measure_asks(store, args))
            finally:
                arbor.shutdown()

    print("\n## Direct store writes (one writer, one write at a time)\n")
    headers = ["store", "state", "bytes", "n", "writes/s", "p50 ms", "p99 ms"]
    print(common.format_table(headers, store_rows))
    print("\n".join(notes))
    print("\n## End to end: state-changing asks to one agent\n")
    headers = ["target", "asks in flight", "n", "asks/s", "p50 ms", "p99 ms", "Arbor / raw"]
    print(common.format_table(headers, ask_rows))
    print(
        "p50 and p99 are per-ask latencies; with several asks in flight they include the time "
        "an ask waits behind the others. Arbor / raw divides asks/s."
    )
    common.print_footer()


def measure_store(store: str, database_url: str, writes: int) -> list[list[object]]:
    """Time ``writes`` checkpoint writes for each state shape, straight through the store."""
    settings = get_settings()
    checkpoint_store = open_store(database_url, settings)
    name = "bench/checkpoint-store"
    try:
        checkpoint_store.create_agent(
            AgentRecord(
                name=name,
                type_path="benchmarks.bench_agents:BenchCounter",
                status=STARTING,
                spawn_id=uuid.uuid4().hex,
            )
        )
        epoch = checkpoint_store.begin_incarnation(name, None)
        # A full deduplication window as an agent keeps it: message id and kept reply.
        window = [[uuid.uuid4().hex, {"v": i}] for i in range(settings.dedup_window)]
        shapes: list[tuple[str, int, list[list[Any]]]] = [
            ("small", 0, []),
            (f"~{LARGE_STATE_BYTES // 1000} KB", LARGE_STATE_BYTES, []),
            (f"small + {len(window)} processed ids", 0, window),
        ]
        rows: list[list[object]] = []
        for label, padding, processed in shapes:
            samples = []
            size = 0
            for i in range(writes):
                state_json = json.dumps({"count": i, "padding": "x" * padding})
                size = len(state_json) + len(json.dumps(processed))
                start = time.perf_counter()
                checkpoint_store.write_checkpoint(
                    name, epoch, state_json, processed, settings.checkpoint_keep
                )
                samples.append(time.perf_counter() - start)
            stats = common.summarize(samples)
            rows.append(
                [
                    STORE_LABELS[store],
                    label,
                    size,
                    writes,
                    writes / sum(samples),
                    stats["p50"],
                    stats["p99"],
                ]
            )
        return rows
    finally:
        checkpoint_store.close()


def describe_durability(store: str, database_url: str, count: int) -> str:
    """Return what a commit waits for: the file system's fsync time, or the server settings."""
    if store == "sqlite":
        directory = os.path.dirname(database_url[len("sqlite:///") :])
        samples = []
        path = os.path.join(directory, "fsync-probe")
        with open(path, "wb") as probe:
            for _ in range(count):
                probe.write(b"x" * 4096)
                start = time.perf_counter()
                probe.flush()
                os.fsync(probe.fileno())
                samples.append(time.perf_counter() - start)
        os.remove(path)
        stats = common.summarize(samples)
        return (
            f"SQLite (journal_mode=WAL, synchronous=FULL) file in {directory}: a 4 KB write "
            f"plus fsync there takes p50 {stats['p50']:.2f} ms, p99 {stats['p99']:.2f} ms."
        )

    import psycopg

    with psycopg.connect(database_url) as connection:
        settings = {
            name: connection.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
            for name in ("server_version", "fsync", "synchronous_commit", "wal_sync_method")
        }
    return "PostgreSQL server: " + ", ".join(f"{key}={value}" for key, value in settings.items())


def measure_asks(store: str, args: argparse.Namespace) -> list[list[object]]:
    """Time state-changing asks to durable agents and to a bare actor in the running cluster."""
    label = STORE_LABELS[store]
    raw = ray.remote(RawCounter).options(name="raw-checkpoint", namespace=RAW_NAMESPACE).remote()
    small = arbor.spawn(BenchCounter, "bench/checkpoint-small")
    large = arbor.spawn(BenchCounter, "bench/checkpoint-large", padding_bytes=LARGE_STATE_BYTES)
    targets: list[tuple[str, Callable[[], Awaitable[object]], Callable[[], object]]] = [
        (
            f"raw Ray async actor, in memory ({label} run)",
            lambda: raw.add.remote(1),
            lambda: ray.get(raw.get.remote()),
        ),
        (
            f"Arbor durable agent, small state, {label}",
            lambda: small.ask_async("add", 1),
            lambda: small.ask("get"),
        ),
        (
            f"Arbor durable agent, ~10 KB state, {label}",
            lambda: large.ask_async("add", 1),
            lambda: large.ask("get"),
        ),
    ]

    rows: list[list[object]] = []
    raw_rates: dict[int, float] = {}
    for target_label, call, read_count in targets:
        asyncio.run(_run_asks(call, min(args.asks, 100), 1))  # warm-up
        expected = min(args.asks, 100)
        for in_flight in (1, args.in_flight):
            samples, elapsed = asyncio.run(_run_asks(call, args.asks, in_flight))
            expected += args.asks
            rate = args.asks / elapsed
            if target_label.startswith("raw"):
                raw_rates[in_flight] = rate
            stats = common.summarize(samples)
            rows.append(
                [
                    target_label,
                    in_flight,
                    args.asks,
                    rate,
                    stats["p50"],
                    stats["p99"],
                    f"{rate / raw_rates[in_flight]:.3f}x",
                ]
            )
        # Each acknowledged ask must be in the state, or the agent lost an update.
        count = read_count()
        assert count == expected, f"{target_label}: counter is {count}, expected {expected}"

    arbor.stop(small.name, purge=True)
    arbor.stop(large.name, purge=True)
    ray.kill(raw)
    return rows


async def _run_asks(
    call: Callable[[], Awaitable[object]], total: int, in_flight: int
) -> tuple[list[float], float]:
    """Send ``total`` calls with at most ``in_flight`` pending.

    Returns:
        The latency of each call and the wall time of all of them, in seconds.
    """
    limit = asyncio.Semaphore(in_flight)
    samples: list[float] = []

    async def one() -> None:
        async with limit:
            start = time.perf_counter()
            await call()
            samples.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(total)))
    return samples, time.perf_counter() - start


if __name__ == "__main__":
    main()
