"""Checkpoint commits per second: one transaction each (durable) against group commit (batched).

Many writer threads, each the stand-in for one running handler of a host, commit
checkpoints of their own agents for a fixed time through one store with the host's
connection pool (``ARBOR_HOST_DB_POOL_MAX``). ``durable`` calls
``store.write_checkpoint``, a transaction per checkpoint. ``batched`` hands each
checkpoint to a `GroupCommitter`, which commits the ones that arrive within its window in
one transaction. A writer waits for its commit either way, as a handler waits before its
reply. Ray plays no part here; raw Ray keeps no durable state to compare with.

``--hosted`` measures the same through real hosted agents on a local Ray cluster with one
host process: a driver agent on that host keeps one ``add`` ask in flight to each of
``--writers`` counter agents, host-mates spawned with ``durability="durable"`` or
``"batched"``, and counts the replies. Each reply follows the commit of the checkpoint
its message changed, so replies per second are commits per second. The host's handler
threads (``ARBOR_HOST_THREADS``) run the commits, so they bound a batch's size.

Run from the repository root (PostgreSQL on 127.0.0.1:5432):

    .venv/bin/python -m benchmarks.bench_group_commit
    .venv/bin/python -m benchmarks.bench_group_commit --hosted
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import os
import statistics
import threading
import time
from typing import Any

import ray

import arbor
from arbor.config import Settings, reset_settings
from arbor.persistence import RUNNING, AgentRecord, open_store
from arbor.persistence.group import GroupCommitter
from arbor.runtime.ref import registry_handle
from benchmarks import common
from benchmarks.bench_agents import BenchCounter

MODES = ("durable", "batched")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_arguments(parser)
    parser.add_argument(
        "--hosted",
        action="store_true",
        help="drive real hosted agents on a local Ray cluster instead of writer threads",
    )
    common.add_cluster_arguments(parser)
    parser.add_argument(
        "--plot-dir",
        default=os.path.join(common.ROOT, "docs", "benchmarks"),
        help="folder for the PNG plot (default: docs/benchmarks)",
    )
    args = parser.parse_args()
    common.print_header("Checkpoint commits per second, durable against batched")
    if args.hosted:
        bench_hosted_commits(args)
    else:
        bench_commits(args)
    common.print_footer()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--writers", type=int, default=64, help="writer threads (default: 64)")
    parser.add_argument(
        "--seconds", type=float, default=6.0, help="per mode, over all rounds (default: 6)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=10,
        help="rounds that alternate the modes, so that a change in the machine's load "
        "falls on both (default: 10)",
    )
    parser.add_argument(
        "--state-bytes", type=int, default=200, help="checkpoint state size (default: 200)"
    )


def bench_commits(args: argparse.Namespace) -> None:
    writers = getattr(args, "writers", 64)
    seconds = getattr(args, "seconds", 6.0)
    rounds = max(1, getattr(args, "rounds", 10))
    state_bytes = getattr(args, "state_bytes", 200)
    settings = Settings()
    pool = settings.model_copy(update={"db_pool_max": settings.host_db_pool_max})
    counts = {mode: 0 for mode in MODES}
    elapsed = {mode: 0.0 for mode in MODES}
    ratios: list[float] = []
    with contextlib.ExitStack() as stack:
        targets: dict[str, Any] = {}
        epochs: dict[str, dict[str, int]] = {}
        committers: dict[str, GroupCommitter] = {}
        for mode in MODES:
            url = stack.enter_context(common.temporary_database("postgresql", args.pg_admin_url))
            store = open_store(url, pool)
            stack.callback(store.close)
            epochs[mode] = start_agents(store, writers)
            if mode == "batched":
                committers[mode] = GroupCommitter(store, settings.batch_window_s)
                stack.callback(committers[mode].close)
            targets[mode] = committers.get(mode, store)
        for index in range(rounds):
            # ABBA order: each mode runs first in every other round.
            order = MODES if index % 2 == 0 else MODES[::-1]
            rates = {}
            for mode in order:
                count, took = run_writers(
                    targets[mode], epochs[mode], seconds / rounds, state_bytes
                )
                counts[mode] += count
                elapsed[mode] += took
                rates[mode] = count / took
            ratios.append(rates["batched"] / rates["durable"])

    rates = {mode: counts[mode] / elapsed[mode] for mode in MODES}
    transactions = {"durable": counts["durable"], "batched": committers["batched"].batches}
    rows = [
        [
            mode,
            writers,
            counts[mode],
            rates[mode],
            transactions[mode] / elapsed[mode],
            counts[mode] / max(transactions[mode], 1),
        ]
        for mode in MODES
    ]
    print("\n## Checkpoint commits per second (PostgreSQL)\n")
    print(
        f"{writers} writers, one agent each, {state_bytes}-byte states, {seconds:g} s per mode "
        f"in {rounds} alternating rounds; pool of {settings.host_db_pool_max} connections; "
        f"batch window {settings.batch_window_s * 1000:g} ms"
    )
    print(
        common.format_table(
            ["mode", "writers", "checkpoints", "per s", "transactions per s", "per transaction"],
            rows,
        )
    )
    print_ratios(rates, ratios)
    plot(
        args,
        rates,
        "hosted-commits.png",
        "Checkpoint commits, PostgreSQL",
        "checkpoints committed per second",
    )


class CommitDriver(arbor.Agent):
    """Keeps one ``add`` ask in flight to each target, a host-mate, and counts the replies."""

    async def drive(self, targets: list[str], seconds: float) -> tuple[int, float]:
        """Ask for ``seconds``; returns the replies and the seconds taken."""
        refs = [self.context.get(target) for target in targets]
        started = time.perf_counter()
        deadline = started + seconds

        async def ask_until_deadline(ref: arbor.AgentRef) -> int:
            replies = 0
            while time.perf_counter() < deadline:
                await ref.ask_async("add", 1)
                replies += 1
            return replies

        counts = await asyncio.gather(*(ask_until_deadline(ref) for ref in refs))
        return sum(counts), time.perf_counter() - started


def bench_hosted_commits(args: argparse.Namespace) -> None:
    """Drive hosted counters of both modes on one host in alternating rounds."""
    writers, seconds, rounds = args.writers, args.seconds, max(1, args.rounds)
    os.environ.update({"ARBOR_HOSTS_PER_NODE": "1", "ARBOR_WARM_POOL_SIZE": "0"})
    reset_settings()
    settings = Settings()
    counts = {mode: 0 for mode in MODES}
    elapsed = {mode: 0.0 for mode in MODES}
    ratios: list[float] = []
    with common.temporary_database("postgresql", args.pg_admin_url) as url:
        common.start_arbor(url, args)
        try:
            # Run as a script, this module is __main__, a name the host cannot import.
            from benchmarks.bench_group_commit import CommitDriver

            driver = arbor.spawn(CommitDriver, "hc/driver", placement="hosted")
            arbor.grant(driver.name, "arbor://agent/ask/hc/*")
            targets = {
                mode: [
                    arbor.spawn(
                        BenchCounter,
                        f"hc/{mode}-{index}",
                        args.state_bytes,
                        placement="hosted",
                        durability=mode,
                    ).name
                    for index in range(writers)
                ]
                for mode in MODES
            }
            batches_before = host_report()["group_commits"]
            for index in range(rounds):
                order = MODES if index % 2 == 0 else MODES[::-1]
                rates = {}
                for mode in order:
                    count, took = driver.ask(
                        "drive", targets[mode], seconds / rounds, timeout=seconds + 120
                    )
                    counts[mode] += count
                    elapsed[mode] += took
                    rates[mode] = count / took
                ratios.append(rates["batched"] / rates["durable"])
            batches = host_report()["group_commits"] - batches_before
        finally:
            arbor.shutdown()

    rates = {mode: counts[mode] / elapsed[mode] for mode in MODES}
    transactions = {"durable": counts["durable"], "batched": batches}
    rows = [
        [
            mode,
            writers,
            counts[mode],
            rates[mode],
            transactions[mode] / elapsed[mode],
            counts[mode] / max(transactions[mode], 1),
        ]
        for mode in MODES
    ]
    print("\n## Asks that change state, per second, through hosted agents (PostgreSQL)\n")
    print(
        f"{writers} counters per mode on one host, one ask in flight each, "
        f"{args.state_bytes}-byte states, {seconds:g} s per mode in {rounds} alternating "
        f"rounds; {settings.host_threads} host threads, pool of {settings.host_db_pool_max} "
        f"connections; batch window {settings.batch_window_s * 1000:g} ms"
    )
    print(
        common.format_table(
            ["mode", "agents", "asks", "per s", "transactions per s", "per transaction"], rows
        )
    )
    print_ratios(rates, ratios)
    plot(
        args,
        rates,
        "hosted-commits-agents.png",
        "Asks that change state, hosted agents, PostgreSQL",
        "asks answered per second",
    )


def print_ratios(rates: dict[str, float], ratios: list[float]) -> None:
    """Print batched / durable over the whole run and the spread of the per-round ratios."""
    print(
        f"batched / durable: {rates['batched'] / rates['durable']:.1f}x overall; per round "
        f"min {min(ratios):.1f}x, median {statistics.median(ratios):.1f}x, "
        f"max {max(ratios):.1f}x"
    )


def host_report() -> dict[str, Any]:
    """Return the only host's report, with its group commit counters."""
    registry = registry_handle()
    (report,) = ray.get(registry.hosts.remote(), timeout=60)
    return report  # type: ignore[no-any-return]


def start_agents(store: Any, count: int) -> dict[str, int]:
    epochs = {}
    for index in range(count):
        name = f"bench/commit-{index}"
        store.create_agent(AgentRecord(name=name, type_path="m:C", status=RUNNING, spawn_id="s"))
        epochs[name] = store.begin_incarnation(name, None)
    return epochs


def run_writers(
    writer: Any, epochs: dict[str, int], seconds: float, state_bytes: int
) -> tuple[int, float]:
    """Commit checkpoints from one thread per agent for ``seconds``; returns count and time."""
    stop = threading.Event()
    padding = "x" * state_bytes
    counts: list[int] = []

    def write(name: str) -> None:
        done = 0
        while not stop.is_set():
            writer.write_checkpoint(name, epochs[name], f'{{"n": {done}, "p": "{padding}"}}', [], 5)
            done += 1
        counts.append(done)

    with concurrent.futures.ThreadPoolExecutor(len(epochs)) as pool:
        started = time.perf_counter()
        futures = [pool.submit(write, name) for name in epochs]
        time.sleep(seconds)
        stop.set()
        for future in futures:
            future.result()
        elapsed = time.perf_counter() - started
    return sum(counts), elapsed


def plot(
    args: argparse.Namespace, rates: dict[str, float], file_name: str, title: str, label: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3))
    axes.barh(list(rates), list(rates.values()))
    axes.invert_yaxis()
    axes.set_xlabel(label)
    axes.set_title(title)
    figure.tight_layout()
    os.makedirs(args.plot_dir, exist_ok=True)
    path = os.path.join(args.plot_dir, file_name)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
