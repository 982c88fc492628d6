"""Helpers shared by the benchmark scripts: temporary databases, statistics, tables."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import arbor
from benchmarks import _ROOT as ROOT

DEFAULT_PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
MIB = 1024 * 1024


def add_cluster_arguments(
    parser: argparse.ArgumentParser, num_cpus_help: str = "CPUs of the local Ray cluster"
) -> None:
    """Add the options every benchmark shares: cluster size and PostgreSQL server."""
    parser.add_argument("--num-cpus", type=int, default=2, help=f"{num_cpus_help} (default: 2)")
    parser.add_argument(
        "--object-store-mb",
        type=int,
        default=100,
        help="object store size of each Ray node, in MiB (default: 100)",
    )
    parser.add_argument(
        "--pg-admin-url",
        default=DEFAULT_PG_ADMIN_URL,
        help="PostgreSQL server on which each run creates, then drops, a database named "
        f"arbor_bench_<random> (default: {DEFAULT_PG_ADMIN_URL})",
    )


@contextmanager
def temporary_database(kind: str, pg_admin_url: str = DEFAULT_PG_ADMIN_URL) -> Iterator[str]:
    """Create an empty store for one run, yield its URL, and delete the store afterwards.

    Args:
        kind: ``"sqlite"`` for a file in a new temporary directory, or ``"postgresql"``
            for a new database ``arbor_bench_<random>`` on ``pg_admin_url``'s server.
    """
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="arbor_bench_") as directory:
            yield f"sqlite:///{directory}/arbor.db"
        return
    if kind != "postgresql":
        raise ValueError(f"store kind {kind!r} is invalid; use 'sqlite' or 'postgresql'")

    import psycopg

    name = f"arbor_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{pg_admin_url.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_arbor(database_url: str, args: argparse.Namespace) -> None:
    """Start a new local Ray cluster with Arbor's registry on ``database_url``."""
    arbor.init(
        database_url=database_url,
        num_cpus=args.num_cpus,
        object_store_memory=args.object_store_mb * MIB,
    )


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Return p50, p99, mean, min and max of ``seconds``, in milliseconds.

    Percentiles interpolate linearly between the two nearest samples, so the p99 of a few
    dozen samples lies close to the maximum.
    """
    import numpy

    values = numpy.asarray(seconds, dtype=float) * 1000.0
    return {
        "n": float(len(values)),
        "p50": float(numpy.percentile(values, 50)),
        "p99": float(numpy.percentile(values, 99)),
        "mean": float(values.mean()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Render rows as a Markdown table; floats get two decimals."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [
        max(len(str(header)), *(len(row[i]) for row in cells)) for i, header in enumerate(headers)
    ]
    lines = [
        "| " + " | ".join(str(header).ljust(widths[i]) for i, header in enumerate(headers)) + " |",
        "|" + "|".join("-" * (width + 2) for width in widths) + "|",
    ]
    for row in cells:
        lines.append(
            "| " + " | ".join(value.ljust(widths[i]) for i, value in enumerate(row)) + " |"
        )
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def print_header(title: str) -> None:
    """Print the benchmark's title, the time, the software versions and the machine's load."""
    import ray

    print(f"# {title}")
    print(
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; Python {platform.python_version()}, "
        f"Ray {ray.__version__}, Arbor {arbor.__version__} ({git_revision()}); "
        f"{os.cpu_count()} CPUs"
    )
    print(f"load average at start (1, 5, 15 min): {_load_average()}")
    sys.stdout.flush()


def print_footer() -> None:
    """Print the load average at the end, to show whether other work shared the machine."""
    print(f"load average at end (1, 5, 15 min): {_load_average()}")


def git_revision() -> str:
    """Return the checkout's short commit id, with ``+changes`` if files under arbor/ differ."""
    import subprocess

    def git(*command: str) -> str:
        result = subprocess.run(
            ["git", "-C", ROOT, *command], capture_output=True, text=True, check=False
        )
        return result.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    return commit + ("+changes" if git("status", "--porcelain", "--", "arbor") else "")


def seconds_since_boot() -> float:
    """Return the time since the machine booted, on the clock that process start times use."""
    with open("/proc/uptime", encoding="ascii") as uptime_file:
        return float(uptime_file.read().split()[0])


def process_start_since_boot(pid: int) -> float:
    """Return when process ``pid`` started, in seconds since boot (Linux only).

    The kernel counts in clock ticks, so the value has a resolution of 10 ms on most systems.
    """
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat_file:
        # The command name in field 2 may contain spaces, so count fields from its ')'.
        fields = stat_file.read().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _load_average() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())
