"""Capability enforcement: its cost on agent-to-agent asks, and how fast a revocation spreads.

Part 1, enforcement cost. A `Pinger` agent asks a `BenchCounter` agent from inside a
handler, so both sides check: the sender picks the token it holds for the target, and the
receiver verifies it with the cluster's public key. The run alternates two local
clusters, one with ``ARBOR_ENFORCE_CAPABILITIES=false`` and one with it on (the pinger
granted ``arbor://agent/ask/<target>``), for ``--rounds`` rounds each, and reports the
p50 and p99 round trip of each and their ratio. Raw Ray, one actor calling another's
method, runs in every round as the floor.

Part 2, revocation spread. A cluster of a head node without CPUs and three worker nodes
runs one pinger and one target per worker node. An owner capability with delegation
depth 1 is delegated to each pinger; revoking the owner's capability cascades to the
three. A driver thread per node asks its pinger to probe its target in a loop, and the
script times from the start of `arbor.revoke` until each node's first denied probe.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_security --asks 500 --rounds 3 --trials 5
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import ray

import arbor
from arbor.config import reset_settings
from arbor.registry.security import GrantRequest
from arbor.runtime.ref import registry_handle
from benchmarks import common
from benchmarks.bench_agents import BenchCounter, Pinger, RawCounter, RawPinger
from benchmarks.bench_node_recovery import add_worker, start_cluster

# Seconds a probe loop waits for a revocation to take effect before the trial fails.
SPREAD_TIMEOUT_S = 30.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--asks", type=int, default=500, help="asks per round (default: 500)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per enforcement setting (default: 3)"
    )
    parser.add_argument("--trials", type=int, default=5, help="revocations in part 2 (default: 5)")
    parser.add_argument(
        "--store",
        choices=("sqlite", "postgresql"),
        default="postgresql",
        help="checkpoint store, created empty and deleted afterwards (default: postgresql)",
    )
    parser.add_argument("--health-check-period-ms", type=int, default=1000, help=argparse.SUPPRESS)
    parser.add_argument(
        "--health-check-failure-threshold", type=int, default=3, help=argparse.SUPPRESS
    )
    common.add_cluster_arguments(parser, "CPUs of each Ray node")
    args = parser.parse_args()

    common.print_header(
        f"Capability enforcement, {args.asks} asks x {args.rounds} rounds per setting, "
        f"{args.trials} revocations across 3 nodes, {args.store} store"
    )
    samples: dict[str, list[float]] = {"off": [], "on": [], "raw": []}
    for _ in range(args.rounds):
        for setting in ("off", "on"):
            samples[setting].extend(enforcement_round(args, setting == "on", samples["raw"]))
    rows = [
        [label, *summary_row(samples[key])]
        for key, label in (
            ("off", "Arbor ask, enforcement off"),
            ("on", "Arbor ask, enforcement on"),
            ("raw", "raw Ray actor-to-actor call"),
        )
    ]
    on_p50 = common.summarize(samples["on"])["p50"]
    off_p50 = common.summarize(samples["off"])["p50"]
    on_p99 = common.summarize(samples["on"])["p99"]
    off_p99 = common.summarize(samples["off"])["p99"]
    rows.append(["on / off", "", f"{on_p50 / off_p50:.3f}x", f"{on_p99 / off_p99:.3f}x", "", ""])
    print(
        common.format_table(
            ["ask from an agent", "n", "p50 ms", "p99 ms", "mean ms", "max ms"], rows
        )
    )

    spread = revocation_spread(args)
    print(
        common.format_table(
            ["revocation reaches", "n", "p50 ms", "p99 ms", "mean ms", "max ms"],
            [
                ["each node (all trials, all nodes)", *summary_row(spread["each"])],
                ["the last of the 3 nodes, per trial", *summary_row(spread["last"])],
            ],
        )
    )
    common.print_footer()


def enforcement_round(args: argparse.Namespace, enforce: bool, raw: list[float]) -> list[float]:
    """Start a local cluster with enforcement on or off and time asks between two agents."""
    os.environ["ARBOR_ENFORCE_CAPABILITIES"] = "true" if enforce else "false"
    reset_settings()
    with common.temporary_database(args.store, args.pg_admin_url) as database_url:
        common.start_arbor(database_url, args)
        try:
            arbor.spawn(BenchCounter, "bench/target")
            capabilities = ["arbor://agent/ask/bench/target"] if enforce else []
            pinger = arbor.spawn(Pinger, "bench/pinger", capabilities=capabilities)
            pinger.ask("ping", "bench/target", 50)  # warm-up
            measured: list[float] = pinger.ask("ping", "bench/target", args.asks, timeout=600)
            if enforce:
                target = ray.remote(RawCounter).remote()
                raw_pinger = ray.remote(RawPinger).remote()
                ray.get(raw_pinger.ping.remote(target, 50))
                raw.extend(ray.get(raw_pinger.ping.remote(target, args.asks)))
        finally:
            arbor.shutdown()
    return measured


def revocation_spread(args: argparse.Namespace) -> dict[str, list[float]]:
    """Time a cascading revocation until every node's pinger is denied."""
    os.environ["ARBOR_ENFORCE_CAPABILITIES"] = "true"
    reset_settings()
    each: list[float] = []
    last: list[float] = []
    with common.temporary_database(args.store, args.pg_admin_url) as database_url:
        cluster = start_cluster(args)
        try:
            nodes = [add_worker(cluster, args) for _ in range(3)]
            arbor.init(address=cluster.address, database_url=database_url)
            node_ids = [node.node_id for node in nodes]
            for trial in range(args.trials):
                times = one_revocation(trial, node_ids)
                each.extend(times)
                last.append(max(times))
        finally:
            arbor.shutdown()
            cluster.shutdown()
    return {"each": each, "last": last}


def one_revocation(trial: int, node_ids: list[str]) -> list[float]:
    """Delegate one owner capability to a pinger per node, revoke it, and time the denials."""
    owner = f"bench/owner-{trial}"
    root = arbor.grant(owner, f"arbor://agent/ask/bench/{trial}/**", depth=1)
    registry = registry_handle()
    pingers = []
    for index, node_id in enumerate(node_ids):
        target = f"bench/{trial}/target-{index}"
        arbor.spawn(BenchCounter, target, node_id=node_id, node_affinity="hard")
        name = f"bench/pinger-{trial}-{index}"
        pinger = arbor.spawn(Pinger, name, node_id=node_id, node_affinity="hard")
        request = GrantRequest(pattern=f"arbor://agent/ask/{target}")
        ray.get(registry.delegate.remote(owner, root.id, name, request))
        assert pinger.ask("probe", target)
        pingers.append((pinger, target))

    denied_at: list[float] = [0.0] * len(pingers)
    started = threading.Event()

    def probe(index: int) -> None:
        pinger, target = pingers[index]
        started.wait()
        deadline = time.perf_counter() + SPREAD_TIMEOUT_S
        while time.perf_counter() < deadline:
            if not pinger.ask("probe", target):
                denied_at[index] = time.perf_counter()
                return
        raise RuntimeError(f"{target} was still allowed {SPREAD_TIMEOUT_S} s after the revocation")

    threads = [threading.Thread(target=probe, args=(i,)) for i in range(len(pingers))]
    for thread in threads:
        thread.start()
    revoke_start = time.perf_counter()
    started.set()
    arbor.revoke(root.id)
    for thread in threads:
        thread.join()
    return [moment - revoke_start for moment in denied_at]


def summary_row(seconds: list[float]) -> list[object]:
    stats = common.summarize(seconds)
    return [int(stats["n"]), stats["p50"], stats["p99"], stats["mean"], stats["max"]]


if __name__ == "__main__":
    main()
