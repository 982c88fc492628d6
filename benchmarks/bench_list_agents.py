"""Listing one namespace's agents among many: `arbor.list_agents` with 10,000 records.

The store gets ``--records`` agent records spread evenly over ``--namespaces``
namespaces, ``default`` among them. They are written straight into ``arbor_agents``
with the status ``stopped``, so the reconciler starts no actors for them. Each row of
the table times ``--repeats`` sequential calls from the driver:

- ``arbor.list_agents(namespace=...)`` for one namespace, and for ``default``, whose
  names have no prefix. The registry queries the store for that namespace's rows only.
- the whole table fetched from the registry and filtered in the client, which is what a
  namespace listing cost when the client did the filtering. The registry returns every
  record when it is given no namespace.
- every namespace, ``arbor.list_agents(namespace="*")``.
- raw Ray: a bare actor that returns the same records from memory, which is the cost
  of one Ray call that carries them.

``agents`` counts the records the caller keeps, ``sent`` those the registry returned,
and ``sent KiB`` is their pickled size, close to what the call carries to the driver.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_list_agents --records 10000 --store postgresql
"""

from __future__ import annotations

import argparse
import pickle
import time
import uuid
from collections.abc import Callable
from typing import Any

import ray

import arbor
from arbor.config import NAMESPACE, REGISTRY_NAME
from arbor.names import join, namespace_of
from benchmarks import common

RAW_NAMESPACE = "bench-raw"

# A timed listing returns the records the caller keeps and the records it received.
Listing = Callable[[], tuple[list[Any], list[Any]]]


class RecordHolder:
    """A bare actor that keeps a list in memory and returns it on every call."""

    def __init__(self, records: list[Any]) -> None:
        self.records = records

    def get(self) -> list[Any]:
        return self.records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--records", type=int, default=10_000, help="agent records stored (default: 10000)"
    )
    parser.add_argument(
        "--namespaces",
        type=int,
        default=100,
        help="namespaces the records are spread over, default included (default: 100)",
    )
    parser.add_argument("--repeats", type=int, default=30, help="calls timed per row (default: 30)")
    parser.add_argument(
        "--store",
        choices=("sqlite", "postgresql"),
        default="postgresql",
        help="checkpoint store of the run, created empty and deleted afterwards "
        "(default: postgresql)",
    )
    common.add_cluster_arguments(parser)
    args = parser.parse_args()

    common.print_header(
        f"list_agents of one namespace among {args.records} records in {args.namespaces} "
        f"namespaces, {args.store} store"
    )
    with common.temporary_database(args.store, args.pg_admin_url) as database_url:
        common.start_arbor(database_url, args)
        try:
            insert_records(database_url, record_names(args.records, args.namespaces))
            rows = run(args)
        finally:
            arbor.shutdown()
    headers = ["listing", "agents", "sent", "sent KiB", "p50 ms", "p99 ms", "mean ms"]
    print(common.format_table(headers, rows))
    common.print_footer()


def namespace_names(count: int) -> list[str]:
    return ["default", *(f"team-{index:03d}" for index in range(1, count))]


def record_names(records: int, namespaces: int) -> list[str]:
    names = namespace_names(namespaces)
    return [join(names[index % namespaces], f"worker/{index:06d}") for index in range(records)]


def insert_records(database_url: str, names: list[str]) -> None:
    """Write stopped agent records in one transaction, without the registry."""
    now = time.time()
    if database_url.startswith("sqlite"):
        import sqlite3

        rows = [
            (name, "benchmarks.bench_agents.BenchCounter", "stopped", uuid.uuid4().hex, now)
            for name in names
        ]
        connection = sqlite3.connect(database_url.removeprefix("sqlite:///"))
        with connection:
            connection.executemany(
                "INSERT INTO arbor_agents (name, type_path, status, spawn_id, options, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, '{}', ?, ?)",
                [(*row, now) for row in rows],
            )
        connection.close()
        return

    import psycopg

    with psycopg.connect(database_url) as connection, connection.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO arbor_agents (name, type_path, status, spawn_id, options, "
            "created_at, updated_at) VALUES (%s, %s, 'stopped', %s, '{}', now(), now())",
            [(name, "benchmarks.bench_agents.BenchCounter", uuid.uuid4().hex) for name in names],
        )


def run(args: argparse.Namespace) -> list[list[Any]]:
    """Time each listing; returns the table rows."""
    registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
    middle = namespace_names(args.namespaces)[args.namespaces // 2]

    def whole_table_filtered(namespace: str) -> Listing:
        def listing() -> tuple[list[Any], list[Any]]:
            records = ray.get(registry.list_agents.remote(None), timeout=60)
            return [info for info in records if namespace_of(info.name) == namespace], records

        return listing

    def sent_as_kept(call: Callable[[], list[Any]]) -> Listing:
        def listing() -> tuple[list[Any], list[Any]]:
            result = call()
            return result, result

        return listing

    sample = arbor.list_agents(namespace=middle)
    holder = ray.remote(RecordHolder).options(namespace=RAW_NAMESPACE).remote(sample)

    listings: list[tuple[str, Listing]] = [
        (
            f"arbor.list_agents(namespace={middle!r})",
            sent_as_kept(lambda: arbor.list_agents(namespace=middle)),
        ),
        (
            "arbor.list_agents() in 'default'",
            sent_as_kept(lambda: arbor.list_agents(namespace="default")),
        ),
        (f"whole table, filtered in the client ({middle!r})", whole_table_filtered(middle)),
        ("whole table, filtered in the client ('default')", whole_table_filtered("default")),
        (
            "arbor.list_agents(namespace='*')",
            sent_as_kept(lambda: arbor.list_agents(namespace="*")),
        ),
        (
            f"raw Ray: bare actor returns {len(sample)} records",
            sent_as_kept(lambda: ray.get(holder.get.remote())),
        ),
    ]
    rows = []
    for label, listing in listings:
        kept, sent = listing()
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            listing()
            seconds.append(time.perf_counter() - started)
        stats = common.summarize(seconds)
        size = len(pickle.dumps(sent)) / 1024
        row = [label, len(kept), len(sent), size, stats["p50"], stats["p99"], stats["mean"]]
        rows.append(row)
    ray.kill(holder)
    return rows


if __name__ == "__main__":
    main()
