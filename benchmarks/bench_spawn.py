"""Spawn latency: `arbor.spawn`, cold and from the warm pool, against a detached Ray actor.

`arbor.spawn` returns once the registry has recorded the agent, the agent's actor has
started, restored and committed its first checkpoint, and the actor has replied. The
raw-Ray side creates a detached, named actor with the same restart options and waits for
its first method call.

The run has two phases, each on a new local cluster and store:

- cold: ``ARBOR_WARM_POOL_SIZE=0``; every spawn gets a worker process from Ray, which
  starts a new one unless an idle worker it started earlier is free.
- warm: ``ARBOR_WARM_POOL_SIZE=--pool``; each spawn claims a started, empty actor of the
  agent class, and the script waits for the pool to refill before the next spawn, so it
  measures a spawn that finds the pool ready. The refill time is reported too: it bounds
  the spawn rate the pool can sustain.

Both phases time raw Ray the same way, alternating with Arbor.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_spawn --count 30 --store sqlite
"""

from __future__ import annotations

import argparse
import os
import time

import ray

import arbor
from arbor.config import reset_settings
from arbor.runtime.ref import registry_handle
from benchmarks import common
from benchmarks.bench_agents import BenchCounter, RawCounter

RAW_NAMESPACE = "bench-raw"
BENCH_TYPE = f"{BenchCounter.__module__}:{BenchCounter.__qualname__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--count", type=int, default=30, help="measured spawns per side and phase (default: 30)"
    )
    parser.add_argument(
        "--pool",
        type=int,
        default=2,
        help="warm actors per agent class in the warm phase (default: 2)",
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

    common.print_header(
        f"Spawn latency, {args.count} spawns per side and phase, {args.store} store"
    )
    rows: list[list[object]] = []
    for phase, pool in (("cold", 0), ("warm", args.pool)):
        os.environ["ARBOR_WARM_POOL_SIZE"] = str(pool)
        os.environ["ARBOR_WARM_POOL_MAX"] = str(pool)
        reset_settings()
        with common.temporary_database(args.store, args.pg_admin_url) as database_url:
            common.start_arbor(database_url, args)
            try:
                rows.extend(run(args, phase))
            finally:
                arbor.shutdown()
    print(
        common.format_table(
            ["spawn", "n", "p50 ms", "p99 ms", "mean ms", "min ms", "max ms", "fresh process"], rows
        )
    )
    print(
        "fresh process: spawns whose actor ran in a worker process started after the spawn "
        "request; the others got a process started earlier (an idle Ray worker, or a warm "
        "actor)."
    )
    print(
        f"warm refill: time from a claim until the pool of {args.pool} is full again, which "
        "bounds how many spawns per second the pool serves warm."
    )
    common.print_footer()


def run(args: argparse.Namespace, phase: str) -> list[list[object]]:
    """Spawn one discarded actor per side, then ``args.count`` per side, alternating order."""
    raw_actor_class = ray.remote(RawCounter)
    first_arbor = spawn_arbor("bench/spawn-first", args.pause_s, purge=False)
    first_raw = spawn_raw(raw_actor_class, "raw-spawn-first", args.pause_s)
    refills: list[tuple[float, bool]] = []
    if phase == "warm":
        refills.append((wait_for_pool(args.pool), False))

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
        if phase == "warm":
            refills.append((wait_for_pool(args.pool), False))

    rows: list[list[object]] = [
        _row(f"{phase}: Arbor arbor.spawn", arbor_samples),
        _row(f"{phase}: raw Ray detached actor + first call", raw_samples),
        _row(f"{phase}: Arbor, first spawn of the run", [first_arbor]),
        _row(f"{phase}: raw Ray, first actor of the run", [first_raw]),
    ]
    if refills:
        rows.append(_row("warm: pool refill after a claim", refills[1:]))
    arbor_p50 = common.summarize([seconds for seconds, _ in arbor_samples])["p50"]
    raw_p50 = common.summarize([seconds for seconds, _ in raw_samples])["p50"]
    rows.append(
        [f"{phase}: Arbor / raw Ray, p50", "", f"{arbor_p50 / raw_p50:.2f}x", "", "", "", "", ""]
    )
    return rows


def wait_for_pool(size: int, timeout: float = 120.0) -> float:
    """Wait until the registry holds ``size`` ready warm actors of the benchmark class."""
    registry = registry_handle()
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if ray.get(registry.warm_pool.remote()).get(BENCH_TYPE, 0) >= size:
            return time.perf_counter() - start
        time.sleep(0.01)
    raise RuntimeError(f"the warm pool did not refill to {size} within {timeout} s")


def spawn_arbor(name: str, pause_s: float, purge: bool = True) -> tuple[float, bool]:
    """Time one `arbor.spawn`, then stop and purge the agent unless ``purge`` is False.

    Returns:
        The seconds the spawn took, and whether the actor got a newly started process.
    """
    requested_at = common.seconds_since_boot()
    start = time.perf_counter()
    ref = arbor.spawn(BenchCounter, name)
    elapsed = time.perf_counter() - start

    pid = ref.info()["pid"]
    fresh = common.process_start_since_boot(pid) >= requested_at
    if purge:
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
