"""Node recovery: remove a Ray node and time until its agents reply from other nodes.

The cluster runs on this machine with `ray.cluster_utils.Cluster`: a head node with no
CPUs, so agents never land on it, and worker nodes that all listen on 127.0.0.1. Arbor's
registry is created while the head is the only node, so it lives on the head and survives
every removal. Each trial spawns agents with ``spread=True``, gives each a distinct
counter value, removes the worker node that runs the most of them, and times from the
removal until every agent of that node replies to an ask with its counter. Ray restarts the
lost actors on the surviving nodes, and each new incarnation restores its checkpoint.

The raw-Ray comparison does the same with bare detached actors (``max_restarts=-1``,
``max_task_retries=-1``, SPREAD scheduling); they come back with their counters at zero.

By default every process of the node dies by SIGKILL at once, as in a machine failure:
its raylet first, then the raylet's child processes (actor workers, agents), then the rest
of its Ray daemons. `Cluster.remove_node` alone kills
only the daemons, and on Ray 2.60 the orphaned workers went on replying to calls after it.
The GCS then notices the loss only through missed health checks. This script checks every
1000 ms and declares a node dead after 3 misses (``--health-check-period-ms``,
``--health-check-failure-threshold``). Ray's defaults are 3000 ms and 5 misses, about 15 s
before a dead node is declared.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_node_recovery --agents 6 --workers 3 --trials 3
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray
import ray.cluster_utils

import arbor
from arbor.client import RETRY_TIMER_MS
from arbor.config import NAMESPACE, REGISTRY_NAME
from benchmarks import common
from benchmarks.bench_agents import BenchCounter, RawCounter

RAW_NAMESPACE = "bench-raw"
# Seconds an ask may wait for a lost actor to come back before the trial fails.
RECOVERY_TIMEOUT_S = 120.0


@dataclass
class Trial:
    """The outcome of removing one node."""

    side: str
    actors_on_node: int
    removal_s: float
    detection_s: float
    recovery_s: list[float]
    state: str


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--agents", type=int, default=6, help="agents (and bare actors) per trial (default: 6)"
    )
    parser.add_argument("--workers", type=int, default=3, help="worker nodes (default: 3)")
    parser.add_argument("--trials", type=int, default=3, help="node removals per side (default: 3)")
    parser.add_argument(
        "--store",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="checkpoint store of the run, created empty and deleted afterwards (default: sqlite)",
    )
    parser.add_argument(
        "--graceful",
        action="store_true",
        help="shut the removed node down cleanly (SIGTERM to its Ray daemons) instead of "
        "killing it and its worker processes with SIGKILL",
    )
    parser.add_argument(
        "--health-check-period-ms",
        type=int,
        default=1000,
        help="milliseconds between GCS health checks of each node (default: 1000; Ray's: 3000)",
    )
    parser.add_argument(
        "--health-check-failure-threshold",
        type=int,
        default=3,
        help="missed health checks before the GCS declares a node dead (default: 3; Ray's: 5)",
    )
    common.add_cluster_arguments(parser, num_cpus_help="CPUs of each worker node")
    args = parser.parse_args()

    common.print_header(
        f"Node recovery, {args.agents} actors per side on {args.workers} worker nodes, "
        f"{args.store} store"
    )
    print(
        f"GCS health checks: every {args.health_check_period_ms} ms, node dead after "
        f"{args.health_check_failure_threshold} misses (Ray default: 3000 ms x 5)"
    )
    with common.temporary_database(args.store, args.pg_admin_url) as database_url:
        cluster = start_cluster(args)
        try:
            arbor.init(address=cluster.address, database_url=database_url)
            for _ in range(args.workers):
                add_worker(cluster, args)
            cluster.wait_for_nodes()
            print(f"registry on the head node: {registry_node() == cluster.head_node.node_id}")
            trials = []
            for trial in range(args.trials):
                trials.append(run_arbor_trial(cluster, args, trial))
                add_worker(cluster, args)
                trials.append(run_raw_trial(cluster, args, trial))
                add_worker(cluster, args)
        finally:
            arbor.shutdown()
            cluster.shutdown()

    mode = "clean shutdown (SIGTERM)" if args.graceful else "SIGKILL of every process"
    print(f"node removal: {mode}")
    headers = ["target", "lost actors", "node removal ms", "node declared dead ms"]
    headers += ["all replied ms", "per actor ms", "state"]
    rows = [
        [
            trial.side,
            trial.actors_on_node,
            trial.removal_s * 1000,
            trial.detection_s * 1000,
            max(trial.recovery_s) * 1000,
            ", ".join(f"{seconds * 1000:.0f}" for seconds in sorted(trial.recovery_s)),
            trial.state,
        ]
        for trial in trials
    ]
    print(common.format_table(headers, rows))
    print(
        "All times run from the start of the removal. node removal: until the node's "
        "processes were gone; node declared dead: until ray.nodes() showed it dead (polled "
        "every 100 ms)."
    )
    common.print_footer()


def start_cluster(args: argparse.Namespace) -> ray.cluster_utils.Cluster:
    """Start a head node without CPUs, keeping the machine's "current Ray cluster" file as it was.

    `Cluster` records its head as the machine's current cluster, which a plain
    ``ray.init()`` elsewhere on this machine would then join. Restoring the file keeps
    other users' processes away from this benchmark's cluster.
    """
    from ray._private.utils import get_ray_address_file

    # `arbor up` starts Ray with Arbor's retry timer. `arbor.init` sets it only after this
    # head node has started, so the head's processes get it here.
    os.environ.setdefault("RAY_core_worker_internal_heartbeat_ms", RETRY_TIMER_MS)
    address_file = get_ray_address_file(None)
    previous = None
    if os.path.exists(address_file):
        with open(address_file, encoding="utf-8") as file:
            previous = file.read()
    cluster = ray.cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "node_ip_address": "127.0.0.1",
            "object_store_memory": args.object_store_mb * common.MIB,
            "include_dashboard": False,
            "_system_config": {
                "health_check_period_ms": args.health_check_period_ms,
                "health_check_failure_threshold": args.health_check_failure_threshold,
            },
        },
    )
    if previous is None:
        if os.path.exists(address_file):
            os.remove(address_file)
    else:
        with open(address_file, "w", encoding="utf-8") as file:
            file.write(previous)
    return cluster


def add_worker(cluster: ray.cluster_utils.Cluster, args: argparse.Namespace) -> Any:
    """Add a worker node on 127.0.0.1 and wait until the GCS lists it."""
    node = cluster.add_node(
        num_cpus=args.num_cpus,
        node_ip_address="127.0.0.1",
        object_store_memory=args.object_store_mb * common.MIB,
    )
    cluster.wait_for_nodes()
    return node


def registry_node() -> str:
    """Return the node id of the Arbor registry actor."""
    handle = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
    table = ray._private.state.actors(handle._actor_id.hex())
    node_id: str = table["Address"]["NodeID"]
    return node_id


def run_arbor_trial(
    cluster: ray.cluster_utils.Cluster, args: argparse.Namespace, trial: int
) -> Trial:
    """Spawn spread agents, remove the node that runs the most, and time their recovery."""
    refs = [
        arbor.spawn(BenchCounter, f"bench/node-{trial}-{i}", spread=True)
        for i in range(args.agents)
    ]
    expected = {ref.name: ref.ask("add", 100 + i) for i, ref in enumerate(refs)}
    nodes = {ref.name: ref.info()["node_id"] for ref in refs}
    victim_id = _most_common(nodes.values())
    victims = [ref for ref in refs if nodes[ref.name] == victim_id]

    calls = {ref.name: _ask_get(ref) for ref in victims}
    removal_s, detection_s, results = remove_and_wait(cluster, victim_id, calls, args.graceful)

    for ref in victims:
        value = results[ref.name][1]
        assert value == expected[ref.name], (
            f"{ref.name} restored counter {value}, expected {expected[ref.name]}"
        )
        new_node = ref.info()["node_id"]
        assert new_node != victim_id, f"{ref.name} still reports the removed node {victim_id}"
    for ref in refs:
        arbor.stop(ref.name, purge=True)
    return Trial(
        side="Arbor agents (spread=True)",
        actors_on_node=len(victims),
        removal_s=removal_s,
        detection_s=detection_s,
        recovery_s=[seconds for seconds, _ in results.values()],
        state=f"intact in {len(victims)}/{len(victims)}",
    )


def run_raw_trial(
    cluster: ray.cluster_utils.Cluster, args: argparse.Namespace, trial: int
) -> Trial:
    """Create spread bare actors, remove the node that runs the most, and time their restart."""
    actor_class = ray.remote(RawCounter)
    handles = [
        actor_class.options(
            name=f"raw-node-{trial}-{i}",
            namespace=RAW_NAMESPACE,
            lifetime="detached",
            max_restarts=-1,
            max_task_retries=-1,
            scheduling_strategy="SPREAD",
        ).remote()
        for i in range(args.agents)
    ]
    ray.get([handle.add.remote(100 + i) for i, handle in enumerate(handles)])
    nodes = dict(enumerate(ray.get([handle.node.remote() for handle in handles])))
    victim_id = _most_common(nodes.values())
    victims = {i: handles[i] for i, node_id in nodes.items() if node_id == victim_id}

    calls = {str(i): _raw_get(handle) for i, handle in victims.items()}
    removal_s, detection_s, results = remove_and_wait(cluster, victim_id, calls, args.graceful)

    reset = sum(1 for _, value in results.values() if value == 0)
    for handle in handles:
        ray.kill(handle, no_restart=True)
    return Trial(
        side="raw Ray detached actors (SPREAD)",
        actors_on_node=len(victims),
        removal_s=removal_s,
        detection_s=detection_s,
        recovery_s=[seconds for seconds, _ in results.values()],
        state=f"lost (counter back to 0) in {reset}/{len(victims)}",
    )


def remove_and_wait(
    cluster: ray.cluster_utils.Cluster,
    node_id: str,
    calls: dict[str, Callable[[], Any]],
    graceful: bool,
) -> tuple[float, float, dict[str, tuple[float, Any]]]:
    """Remove node ``node_id``, then run every call until it returns.

    Returns:
        Seconds until the node's processes were gone, seconds until the GCS declared the
        node dead, and each call's completion time and return value. All times count from
        the start of the removal.
    """
    node = next(node for node in cluster.worker_nodes if node.node_id == node_id)
    # The raylet dies first: if one of its agent or worker processes died before it, the
    # raylet could notice, shut down cleanly and tell the GCS, which a dead machine cannot.
    # Its children are listed before the kill, because afterwards they are re-parented.
    raylet_pid = _raylet_pid(node)
    doomed = [] if graceful else [raylet_pid, *_descendants(raylet_pid)]
    start = time.perf_counter()
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    cluster.remove_node(node, allow_graceful=graceful)
    removal_s = time.perf_counter() - start

    def timed(call: Callable[[], Any]) -> tuple[float, Any]:
        value = call()
        return time.perf_counter() - start, value

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = {name: pool.submit(timed, call) for name, call in calls.items()}
        detection_s = _wait_node_dead(node_id, start)
        results = {name: future.result() for name, future in futures.items()}
    return removal_s, detection_s, results


def _raylet_pid(node: Any) -> int:
    from ray._private import ray_constants

    pid: int = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    return pid


def _descendants(pid: int) -> list[int]:
    """Return the ids of every process below ``pid`` in the process tree (Linux only)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as stat_file:
                # Fields after the ')' that closes the command name: state, then parent id.
                parent = int(stat_file.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # the process exited while the table was read
        children[parent].append(int(entry))
    found: list[int] = []
    pending = [pid]
    while pending:
        for child in children[pending.pop()]:
            found.append(child)
            pending.append(child)
    return found


def _wait_node_dead(node_id: str, start: float) -> float:
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while time.monotonic() < deadline:
        if not any(node["NodeID"] == node_id and node["Alive"] for node in ray.nodes()):
            return time.perf_counter() - start
        time.sleep(0.1)
    raise TimeoutError(f"node {node_id} still alive {RECOVERY_TIMEOUT_S} s after its removal")


def _ask_get(ref: arbor.AgentRef) -> Callable[[], Any]:
    return lambda: ref.ask("get", timeout=RECOVERY_TIMEOUT_S)


def _raw_get(handle: Any) -> Callable[[], Any]:
    return lambda: ray.get(handle.get.remote(), timeout=RECOVERY_TIMEOUT_S)


def _most_common(node_ids: Any) -> str:
    node_id: str = collections.Counter(node_ids).most_common(1)[0][0]
    return node_id


if __name__ == "__main__":
    main()
