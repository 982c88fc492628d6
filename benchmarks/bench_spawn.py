"""Spawn latency: `arbor.spawn` against creating a detached named Ray actor.

`arbor.spawn` returns once the registry has recorded the agent, the agent's actor has
started, restored and committed its first checkpoint, and the actor has replied. The
raw-Ray side creates a detached, named async actor with the same restart options and
waits for its first method call. Arbor keeps no warm pool of started actors yet, so both
sides are cold: each spawn gets a worker process from Ray, which starts a new one unless
an idle worker it started earlier is free.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_spawn --count 30 --store sqlite
"""

from __future__ import annotations

import argparse
import time

import ray

import arbor
from benchmarks import common
from benchmarks.bench_agents import BenchCounter, RawCounter

RAW_NAMESPACE = "bench-raw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--count", type=int, default=30, help="measured spawns per side (default: 30)"
    )
    parser.add_argument(
        "--store",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="checkpoint store of the run, created empty and deleted afterwards (default: sqlite)",
    )
    parser.add_argument(
        "--pause-s",
        type=float,
        default=0.3,
        help="seconds to wait after stopping each actor, so its teardown does not overlap "
        "the next spawn (default: 0.3)",
    )
    common.add_cluster_arguments(parser)
    args = parser.parse_args()

    common.print_header(f"Spawn latency, {args.count} spawns per side, {args.store} store")
    with common.temporary_database(args.store, args.pg_admin_url) as database_url:
        common.start_arbor(database_url, args)
        try:
            rows = run(args)
        finally:
            arbor.shutdown()
    print(
        common.format_table(
            ["spawn", "n", "p50 ms", "p99 ms", "mean ms", "min ms", "max ms", "fresh process"], rows
        )
    )
    print(
        "fresh process: spawns whose actor ran in a worker process started after the spawn "
        "request; the others got an idle worker Ray had started earlier."
    )
    print("No warm pool: Arbor does not keep started actors for spawns to claim.")
    common.print_footer()


def run(args: argparse.Namespace) -> list[list[object]]:
    """Spawn one discarded actor per side, then ``args.count`` per side, alternating order."""
    raw_actor_class = ray.remote(RawCounter)
    first_arbor = spawn_arbor("bench/spawn-first", args.pause_s)
    first_raw = spawn_raw(raw_actor_class, "raw-spawn-first", args.pause_s)

    arbor_samples: list[tuple[float, bool]] = []
    raw_samples: list[tuple[float, bool]] = []
    for i in range(args.count):
        # Alternating which side goes first spreads slow periods of a shared machine evenly.
        if i % 2 == 0:
            arbor_samples.append(spawn_arbor(f"bench/spawn-{i}", args.pause_s))
            raw_samples.append(spawn_raw(raw_actor_class, f"raw-spawn-{i}", args.pause_s))
        else:
            raw_samples.append(spawn_raw(raw_actor_class, f"raw-spawn-{i}", args.pause_s))
            arbor_samples.append(spawn_arbor(f"bench/spawn-{i}", args.pause_s))

    rows: list[list[object]] = [
        _row("Arbor arbor.spawn", arbor_samples),
        _row("raw Ray detached actor + first call", raw_samples),
        _row("Arbor, first spawn of the run", [first_arbor]),
        _row("raw Ray, first actor of the run", [first_raw]),
    ]
    arbor_p50 = common.summarize([seconds for seconds, _ in arbor_samples])["p50"]
    raw_p50 = common.summarize([seconds for seconds, _ in raw_samples])["p50"]
    rows.append(["Arbor / raw Ray, p50", "", f"{arbor_p50 / raw_p50:.2f}x", "", "", "", "", ""])
    return rows


def spawn_arbor(name: str, pause_s: float) -> tuple[float, bool]:
    """Time one `arbor.spawn`, then stop and purge the agent.

    Returns:
        The seconds the spawn took, and whether the actor got a newly started process.
    """
    requested_at = common.seconds_since_boot()
    start = time.perf_counter()
    ref = arbor.spawn(BenchCounter, name)
    elapsed = time.perf_counter() - start

    pid = ref.info()["pid"]
    fresh = common.process_start_since_boot(pid) >= requested_at
    arbor.stop(name, purge=True)
    time.sleep(pause_s)
    return elapsed, fresh


def spawn_raw(actor_class: object, name: str, pause_s: float) -> tuple[float, bool]:
    """Time creating a detached named actor and its first call, then kill it."""
    requested_at = common.seconds_since_boot()
    start = time.perf_counter()
    handle = actor_class.options(  # type: ignore[attr-defined]
        name=name,
        namespace=RAW_NAMESPACE,
        lifetime="detached",
        max_restarts=-1,
        max_task_retries=-1,
    ).remote()
    ray.get(handle.get.remote())
    elapsed = time.perf_counter() - start

    pid = ray.get(handle.pid.remote())
    fresh = common.process_start_since_boot(pid) >= requested_at
    ray.kill(handle, no_restart=True)
    time.sleep(pause_s)
    return elapsed, fresh


def _row(label: str, samples: list[tuple[float, bool]]) -> list[object]:
    stats = common.summarize([seconds for seconds, _ in samples])
    fresh = sum(1 for _, is_fresh in samples if is_fresh)
    return [
        label,
        int(stats["n"]),
        stats["p50"],
        stats["p99"],
        stats["mean"],
        stats["min"],
        stats["max"],
        f"{fresh}/{len(samples)}",
    ]


if __name__ == "__main__":
    main()
