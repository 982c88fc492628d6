"""Crash recovery: SIGKILL an agent's worker process and time until it replies again.

Each trial adds to a durable agent's counter, kills the agent's Ray worker process with
SIGKILL, and times from the kill until an ask returns. The ask must return the counter as
it was before the kill. Ray restarts the actor (``max_restarts=-1``) and Arbor's new
incarnation restores the last checkpoint before it takes the message.

The raw-Ray comparison kills a bare detached actor with ``max_restarts=-1`` and
``max_task_retries=-1`` the same way and times until it replies. Its counter lives only
in memory, so the restarted actor starts again from zero.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_crash_recovery --trials 10 --store sqlite
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import ray

import arbor
from benchmarks import common
from benchmarks.bench_agents import BenchCounter, RawCounter

RAW_NAMESPACE = "bench-raw"
# Seconds an ask may wait for the restarted actor before the trial counts as failed.
RECOVERY_TIMEOUT_S = 60.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--trials", type=int, default=10, help="kills per side (default: 10)")
    parser.add_argument(
        "--store",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="checkpoint store of the run, created empty and deleted afterwards (default: sqlite)",
    )
    parser.add_argument(
        "--pause-s",
        type=float,
        default=1.0,
        help="seconds to wait between trials, so the killed worker is cleaned up (default: 1.0)",
    )
    common.add_cluster_arguments(parser)
    args = parser.parse_args()

    common.print_header(f"Crash recovery, {args.trials} SIGKILLs per side, {args.store} store")
    with common.temporary_database(args.store, args.pg_admin_url) as database_url:
        common.start_arbor(database_url, args)
        try:
            rows = run(args)
        finally:
            arbor.shutdown()
    headers = ["target", "n", "p50 ms", "max ms", "mean ms", "min ms", "new process p50 ms"]
    headers.append("state after restart")
    print(common.format_table(headers, rows))
    print(
        "Times run from os.kill(pid, SIGKILL) until the next call returns. new process: "
        "until the replacement worker process started (10 ms resolution)."
    )
    common.print_footer()


def run(args: argparse.Namespace) -> list[list[object]]:
    """Kill the agent and the bare actor ``args.trials`` times each, alternating order."""
    ref = arbor.spawn(BenchCounter, "bench/crash")
    raw = (
        ray.remote(RawCounter)
        .options(
            name="raw-crash",
            namespace=RAW_NAMESPACE,
            lifetime="detached",
            max_restarts=-1,
            max_task_retries=-1,
        )
        .remote()
    )
    ray.get(raw.get.remote())

    arbor_samples: list[tuple[float, float]] = []
    raw_samples: list[tuple[float, float]] = []
    raw_reset = 0
    for trial in range(args.trials):
        # Alternating which side goes first spreads slow periods of a shared machine evenly.
        sides = ("arbor", "raw") if trial % 2 == 0 else ("raw", "arbor")
        for side in sides:
            if side == "arbor":
                arbor_samples.append(kill_agent(ref, trial))
            else:
                seconds, process_s, reset = kill_raw(raw)
                raw_samples.append((seconds, process_s))
                raw_reset += reset
            time.sleep(args.pause_s)

    arbor.stop(ref.name, purge=True)
    ray.kill(raw, no_restart=True)
    return [
        _row("Arbor durable agent", arbor_samples, f"intact in {args.trials}/{args.trials}"),
        _row(
            "raw Ray detached actor, max_restarts=-1",
            raw_samples,
            f"lost (counter back to 0) in {raw_reset}/{args.trials}",
        ),
    ]


def kill_agent(ref: arbor.AgentRef, trial: int) -> tuple[float, float]:
    """Kill the agent's process and time its recovery.

    Returns:
        Seconds until the agent replied with its state, and seconds until its new worker
        process started.

    Raises:
        AssertionError: the agent replied from the killed process, kept its incarnation,
            or returned a counter other than the one acknowledged before the kill.
    """
    expected = ref.ask("add", trial + 1)
    before = ref.info()

    killed_at = common.seconds_since_boot()
    start = time.perf_counter()
    os.kill(before["pid"], signal.SIGKILL)
    value = ref.ask("get", timeout=RECOVERY_TIMEOUT_S)
    elapsed = time.perf_counter() - start

    after = ref.info()
    assert after["pid"] != before["pid"], f"agent still runs in killed process {before['pid']}"
    assert after["incarnation"] > before["incarnation"], (
        f"incarnation {after['incarnation']} did not grow past {before['incarnation']}"
    )
    assert value == expected, f"agent restored counter {value}, expected {expected}"
    return elapsed, common.process_start_since_boot(after["pid"]) - killed_at


def kill_raw(handle: object) -> tuple[float, float, bool]:
    """Kill the bare actor's process and time its restart.

    Returns:
        Seconds until the actor replied, seconds until its new worker process started,
        and whether its counter came back at zero.
    """
    ray.get(handle.add.remote(1))  # type: ignore[attr-defined]
    pid = ray.get(handle.pid.remote())  # type: ignore[attr-defined]

    killed_at = common.seconds_since_boot()
    start = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    value = ray.get(handle.get.remote(), timeout=RECOVERY_TIMEOUT_S)  # type: ignore[attr-defined]
    elapsed = time.perf_counter() - start

    new_pid = ray.get(handle.pid.remote())  # type: ignore[attr-defined]
    assert new_pid != pid, f"bare actor still runs in killed process {pid}"
    return elapsed, common.process_start_since_boot(new_pid) - killed_at, value == 0


def _row(label: str, samples: list[tuple[float, float]], state: str) -> list[object]:
    stats = common.summarize([seconds for seconds, _ in samples])
    process_stats = common.summarize([process_s for _, process_s in samples])
    return [
        label,
        int(stats["n"]),
        stats["p50"],
        stats["max"],
        stats["mean"],
        stats["min"],
        process_stats["p50"],
        state,
    ]


if __name__ == "__main__":
    main()
