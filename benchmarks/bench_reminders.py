"""Reminder firing precision: how late 1,000 durable reminders reach their agents.

Ten agents each set a share of the one-shot reminders on themselves, with ``at=`` due
times, and the payload carries the due time. Each ``on_reminder`` records ``time.time()``
minus the due time when it starts, so the lateness covers the registry's loop, the
message to the agent and the wait in its mailbox. Two kinds of agent run: `ReminderSink`
keeps the lateness in its state, so each delivery commits a checkpoint before the next
one runs, as a real reminder handler that changes state does. `MemoryReminderSink` keeps
it out of its state, so its deliveries commit nothing and show the reminder path alone.

Two schedules run one after the other: ``spread`` puts the due times evenly over
``--spread-s`` seconds, and ``burst`` makes every reminder due at the same moment.

The raw-Ray comparison is an async actor with one asyncio timer per due time, which calls
ten bare synchronous target actors. It stores nothing, so it shows what an in-memory
scheduler on Ray costs on the same machine.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_reminders --reminders 1000 --store postgresql
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

import arbor
from benchmarks import common
from benchmarks.bench_reminder_agents import (
    MemoryReminderSink,
    RawScheduler,
    RawSink,
    ReminderSink,
)

RAW_NAMESPACE = "bench-raw"
AGENTS = 10
# Seconds between arming and the first due time, so that every reminder is stored first.
ARM_MARGIN_S = 3.0
# Seconds to wait after the last due time for the last delivery.
DRAIN_TIMEOUT_S = 120.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--reminders", type=int, default=1000, help="reminders per schedule (default: 1000)"
    )
    parser.add_argument(
        "--spread-s",
        type=float,
        default=10.0,
        help="seconds over which the spread schedule's due times fall (default: 10)",
    )
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
        f"Reminder firing precision, {args.reminders} reminders per schedule, {args.store} store"
    )
    with common.temporary_database(args.store, args.pg_admin_url) as database_url:
        common.start_arbor(database_url, args)
        try:
            rows = run(args)
        finally:
            arbor.shutdown()
    headers = ["schedule", "target", "n", "p50 ms", "p99 ms", "max ms", "arming s"]
    print(common.format_table(headers, rows))
    print(
        "Lateness runs from a reminder's due time to the start of its handler. arming: time "
        "to set every reminder (one registry call each for Arbor)."
    )
    common.print_footer()


def run(args: argparse.Namespace) -> list[list[Any]]:
    """Run both schedules on Arbor and on the raw-Ray baseline; returns the table rows."""
    sinks = [arbor.spawn(ReminderSink, f"bench/reminders/{index}") for index in range(AGENTS)]
    raw_targets = [
        ray.remote(RawSink).options(namespace=RAW_NAMESPACE).remote() for _ in range(AGENTS)
    ]
    scheduler = ray.remote(RawScheduler).options(namespace=RAW_NAMESPACE).remote()
    ray.get([target.lateness.remote() for target in raw_targets])

    memory_sinks = [
        arbor.spawn(MemoryReminderSink, f"bench/reminders/memory/{index}")
        for index in range(AGENTS)
    ]

    rows = []
    for schedule in ("spread", "burst"):
        rows.append(
            [schedule, "Arbor, handler commits state", *measure_arbor(sinks, schedule, args)]
        )
        rows.append(
            [
                schedule,
                "Arbor, handler changes no state",
                *measure_arbor(memory_sinks, schedule, args),
            ]
        )
        rows.append(
            [
                schedule,
                "raw Ray asyncio timers",
                *measure_raw(scheduler, raw_targets, schedule, args),
            ]
        )

    for sink in [*sinks, *memory_sinks]:
        arbor.stop(sink.name, purge=True)
    return rows


def due_times(schedule: str, count: int, start: float, spread_s: float) -> list[float]:
    """Return ``count`` Unix due times from ``start``, spread evenly or all the same."""
    if schedule == "burst" or count == 1:
        return [start] * count
    return [start + spread_s * index / (count - 1) for index in range(count)]


def measure_arbor(
    sinks: list[arbor.AgentRef], schedule: str, args: argparse.Namespace
) -> list[Any]:
    """Set the reminders through the agents, wait for every delivery, and summarise."""
    already = [len(sink.ask("lateness")) for sink in sinks]
    # Setting a reminder takes a registry round trip, a few milliseconds each on two cores.
    start = time.time() + ARM_MARGIN_S + args.reminders * 0.01
    times = due_times(schedule, args.reminders, start, args.spread_s)
    armed_at = time.perf_counter()
    with ThreadPoolExecutor(max_workers=AGENTS) as pool:
        list(
            pool.map(
                lambda index: sinks[index].ask("arm", times[index::AGENTS], timeout=600),
                range(AGENTS),
            )
        )
    arming_s = time.perf_counter() - armed_at
    if time.time() > start:
        print(f"warning: arming ended {time.time() - start:.2f} s after the first due time")

    deadline = max(times) + DRAIN_TIMEOUT_S
    samples: list[float] = []
    while time.time() < deadline:
        values = [sink.ask("lateness") for sink in sinks]
        samples = [value for seen, got in zip(already, values, strict=True) for value in got[seen:]]
        if len(samples) >= args.reminders:
            break
        time.sleep(0.5)
    return _summary(samples, args.reminders, arming_s)


def measure_raw(
    scheduler: Any, targets: list[Any], schedule: str, args: argparse.Namespace
) -> list[Any]:
    """Arm the raw-Ray scheduler the same way, wait for every call, and summarise."""
    already = [len(values) for values in ray.get([t.lateness.remote() for t in targets])]
    start = time.time() + ARM_MARGIN_S
    times = due_times(schedule, args.reminders, start, args.spread_s)
    armed_at = time.perf_counter()
    ray.get(
        [scheduler.arm.remote(target, times[index::AGENTS]) for index, target in enumerate(targets)]
    )
    arming_s = time.perf_counter() - armed_at

    deadline = max(times) + DRAIN_TIMEOUT_S
    samples: list[float] = []
    while time.time() < deadline:
        values = ray.get([target.lateness.remote() for target in targets])
        samples = [value for seen, got in zip(already, values, strict=True) for value in got[seen:]]
        if len(samples) >= args.reminders:
            break
        time.sleep(0.5)
    return _summary(samples, args.reminders, arming_s)


def _summary(samples: list[float], expected: int, arming_s: float) -> list[Any]:
    if len(samples) < expected:
        print(f"warning: {len(samples)} of {expected} deliveries arrived before the deadline")
    stats = common.summarize(samples)
    return [int(stats["n"]), stats["p50"], stats["p99"], stats["max"], round(arming_s, 2)]


if __name__ == "__main__":
    main()
