"""Checkpoint commits per second on PostgreSQL: durable against batched (group commit).

Part 1 calls the store from this process with several writer threads, each the checkpoint
writer of one agent, the way the agents of one host commit: ``durable`` writes each
checkpoint in its own transaction (``write_checkpoint``), ``batched`` hands it to a
`GroupCommitter`. The floor is raw psycopg, one single-row INSERT per transaction on the
same connection pool.

Part 2 runs hosted agents on a local Ray cluster and keeps asks that change state in
flight to all of them, once with ``durability="durable"`` and once with ``"batched"``.
Every ask commits one checkpoint before its reply, so asks per second are commits per
second end to end.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_group_commit --seconds 5
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import arbor
from arbor.config import Settings
from arbor.persistence import AgentRecord, CheckpointStore, open_store
from arbor.persistence.group import GroupCommitter
from benchmarks import common
from benchmarks.bench_agents import BenchCounter

STATE = json.dumps({"count": 1, "notes": ["checkpoint"] * 10})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="length of each run (default: 5)"
    )
    parser.add_argument(
        "--writers",
        default="16,64",
        help="comma-separated writer thread counts for part 1 (default: 16,64)",
    )
    parser.add_argument(
        "--agents", type=int, default=64, help="hosted agents in part 2 (default: 64)"
    )
    parser.add_argument(
        "--in-flight", type=int, default=64, help="asks in flight in part 2 (default: 64)"
    )
    parser.add_argument("--pool", type=int, default=8, help="PostgreSQL connections (default: 8)")
    parser.add_argument("--skip-cluster", action="store_true", help="run part 1 only")
    common.add_cluster_arguments(parser)
    args = parser.parse_args()

    common.print_header("Checkpoint commits per second: durable and batched (PostgreSQL)")
    rows = []
    with common.temporary_database("postgresql", args.pg_admin_url) as url:
        store = open_store(url, Settings(database_url=url, db_pool_max=args.pool))
        try:
            for writers in (int(count) for count in args.writers.split(",")):
                rows.extend(_store_rows(store, url, writers, args.seconds))
        finally:
            store.close()
    print("\n## Part 1: the store, one writer thread per agent\n")
    print(common.format_table(["writers", "mode", "commits/s", "transactions/s"], rows))

    if not args.skip_cluster:
        print("\n## Part 2: hosted agents, asks that change state\n")
        end_to_end = []
        with common.temporary_database("postgresql", args.pg_admin_url) as url:
            common.start_arbor(url, args)
            try:
                for mode in ("durable", "batched"):
                    end_to_end.append(_cluster_row(mode, args))
            finally:
                arbor.shutdown()
        print(common.format_table(["mode", "agents", "in flight", "commits/s"], end_to_end))
    common.print_footer()


def _store_rows(store: CheckpointStore, url: str, writers: int, seconds: float) -> list[list[Any]]:
    names = [f"bench/{writers}/{index}" for index in range(writers)]
    epochs = {}
    for name in names:
        store.create_agent(
            AgentRecord(name=name, type_path="benchmarks:X", status="running", spawn_id=name)
        )
        epochs[name] = store.begin_incarnation(name, None)

    def durable(name: str) -> None:
        store.write_checkpoint(name, epochs[name], STATE, [], 10)

    rows: list[list[Any]] = []
    rate = _run_writers(names, durable, seconds)
    rows.append([writers, "durable", round(rate), round(rate)])

    committer = GroupCommitter(store, window_s=Settings().batch_window_s)

    def batched(name: str) -> None:
        committer.write_checkpoint(name, epochs[name], STATE, [], 10)

    rate = _run_writers(names, batched, seconds)
    committer.close()
    transactions = committer.batches / seconds
    rows.append([writers, "batched", round(rate), round(transactions)])

    rate = _raw_inserts(url, writers, seconds)
    rows.append([writers, "raw psycopg INSERT", round(rate), round(rate)])
    return rows


def _run_writers(names: list[str], write: Callable[[str], None], seconds: float) -> float:
    counts = [0] * len(names)
    stop = time.monotonic() + seconds

    def loop(index: int) -> None:
        while time.monotonic() < stop:
            write(names[index])
            counts[index] += 1

    threads = [threading.Thread(target=loop, args=(index,)) for index in range(len(names))]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.monotonic() - started)


def _raw_inserts(url: str, writers: int, seconds: float) -> float:
    from psycopg_pool import ConnectionPool

    with ConnectionPool(url, min_size=1, max_size=8, open=True) as pool:
        with pool.connection() as connection:
            connection.execute("CREATE TABLE IF NOT EXISTS bench_raw (id bigserial, doc jsonb)")

        def insert(_: str) -> None:
            with pool.connection() as connection:
                connection.execute("INSERT INTO bench_raw (doc) VALUES (%s::jsonb)", (STATE,))

        return _run_writers([str(index) for index in range(writers)], insert, seconds)


def _cluster_row(mode: str, args: argparse.Namespace) -> list[Any]:
    refs = [
        arbor.spawn(BenchCounter, f"bench/{mode}/{index}", placement="hosted", durability=mode)
        for index in range(args.agents)
    ]
    for ref in refs:
        ref.ask("add", 1)
    done = [0]
    stop = time.monotonic() + args.seconds
    lock = threading.Lock()

    def loop(offset: int) -> None:
        index = offset
        while time.monotonic() < stop:
            refs[index % len(refs)].ask("add", 1, timeout=120)
            index += args.in_flight
            with lock:
                done[0] += 1

    threads = [threading.Thread(target=loop, args=(offset,)) for offset in range(args.in_flight)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rate = done[0] / (time.monotonic() - started)
    for ref in refs:
        arbor.stop(ref.name, purge=True)
    return [mode, args.agents, args.in_flight, round(rate)]


if __name__ == "__main__":
    main()
