"""Hosted placement: spawn latency, ask round trips, memory per agent, against raw Ray.

Sections, each printed as a Markdown table and drawn as a PNG with matplotlib:

- spawn: ``arbor.spawn`` p50/p99 for a hosted agent, a dedicated agent that claims a warm
  actor, and a cold dedicated agent (``num_cpus=0`` keeps it off the warm pool). Raw Ray
  creates a detached named actor and waits for its first call.
- ask: round trips between two agents of one host (in process), between agents of two
  hosts on one node (through Ray), from the driver to a hosted and a dedicated agent;
  raw Ray calls from the driver and from one actor to another, and an asyncio.Queue round
  trip in one process, the floor of any in-process delivery.
- throughput: messages per second on the node, with several senders asking at once:
  between agents of one host, between agents of two hosts, between two dedicated agents,
  and between two raw Ray async actors.
- memory: resident memory (RSS, and USS, the memory unique to the process) of the host
  processes per hosted agent at 100, 1,000 and 10,000 agents, and of the actor processes
  per dedicated agent and per raw Ray actor at ``--dedicated`` actors; with the spawn
  latency at each level, timed over the level's last ``--level-spawns`` spawns.
- nodes: ask round trips between hosted agents on two Ray nodes of a
  ``ray.cluster_utils.Cluster`` on this machine, against raw Ray actor calls between the
  same two nodes; the cluster is separate from the one of the other sections.
- commits: checkpoint commits per second through the store with many agents writing at
  once, ``durable`` (a transaction per checkpoint) against ``batched`` (group commit).

Run from the repository root (PostgreSQL on 127.0.0.1:5432):

    .venv/bin/python -m benchmarks.bench_hosted --store postgresql
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import ray

import arbor
from arbor.config import reset_settings
from arbor.runtime.ref import registry_handle
from benchmarks import common
from benchmarks.bench_agents import (
    BenchCounter,
    BenchPeer,
    RawAsyncPinger,
    RawCounter,
    RawPinger,
    RawSyncCounter,
)

RAW_NAMESPACE = "bench-raw"
BENCH_TYPE = f"{BenchCounter.__module__}:{BenchCounter.__qualname__}"
PEER_TYPE = f"{BenchPeer.__module__}:{BenchPeer.__qualname__}"

# Seconds of quiet before each timed spawn that starts or claims a process.
SETTLE_S = 0.5
WARM_IDLE = f"dedicated, warm, after {SETTLE_S} s idle"
WARM_NEXT = "dedicated, warm, right after another"
RAW_CALL_IDLE = f"raw Ray: one call, after {SETTLE_S} s idle"
SECTIONS = ("spawn", "ask", "throughput", "memory", "commits", "nodes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--hosted-spawns", type=int, default=200, help="(default: 200)")
    parser.add_argument("--actor-spawns", type=int, default=20, help="per kind (default: 20)")
    parser.add_argument("--asks", type=int, default=2000, help="per kind (default: 2000)")
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="per throughput run (default: 3)"
    )
    parser.add_argument(
        "--senders",
        type=int,
        default=4,
        help="sending agents per throughput run, each with 4 asks in flight (default: 4)",
    )
    parser.add_argument(
        "--levels", default="100,1000,10000", help="hosted agent counts (default: 100,1000,10000)"
    )
    parser.add_argument(
        "--level-spawns",
        type=int,
        default=50,
        help="spawns timed one at a time at each memory level (default: 50)",
    )
    parser.add_argument(
        "--dedicated",
        type=int,
        default=10,
        help="dedicated agents measured; each holds ARBOR_DB_POOL_MAX database connections "
        "(default: 10)",
    )
    parser.add_argument(
        "--store",
        choices=("sqlite", "postgresql"),
        default="postgresql",
        help="checkpoint store, created empty and deleted afterwards (default: postgresql)",
    )
    parser.add_argument(
        "--plot-dir",
        default=os.path.join(common.ROOT, "docs", "benchmarks"),
        help="folder for the PNG plots (default: docs/benchmarks)",
    )
    parser.add_argument(
        "--lean",
        action="store_true",
        help="run with ARBOR_METRICS=false and ARBOR_ENFORCE_CAPABILITIES=false, to show "
        "what metrics and capability checks add to each message",
    )
    common.add_cluster_arguments(parser)
    args = parser.parse_args()
    sections = [name for name in args.sections.split(",") if name]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    os.makedirs(args.plot_dir, exist_ok=True)

    lean = ", without metrics and capability checks" if args.lean else ""
    common.print_header(f"Hosted placement, {args.store} store{lean}")
    # A pool of a fixed size, so that no refill beyond two actors runs during the timings.
    os.environ.update(
        {"ARBOR_WARM_POOL_SIZE": "2", "ARBOR_WARM_POOL_MAX": "2", "ARBOR_HOSTS_PER_NODE": "2"}
    )
    if args.lean:
        os.environ.update({"ARBOR_METRICS": "false", "ARBOR_ENFORCE_CAPABILITIES": "false"})
    reset_settings()
    with common.temporary_database(args.store, args.pg_admin_url) as database_url:
        common.start_arbor(database_url, args)
        try:
            if "spawn" in sections:
                bench_spawn(args)
            if "ask" in sections:
                bench_ask(args)
            if "throughput" in sections:
                bench_throughput(args)
            if "memory" in sections:
                bench_memory(args)
        finally:
            arbor.shutdown()
    if "commits" in sections:
        from benchmarks.bench_group_commit import bench_commits

        bench_commits(args)
    if "nodes" in sections:
        with common.temporary_database(args.store, args.pg_admin_url) as database_url:
            bench_nodes(args, database_url)
    common.print_footer()


# Spawn latency.


def bench_spawn(args: argparse.Namespace) -> None:
    arbor.spawn(BenchCounter, "bench/hosted-first", placement="hosted")
    arbor.spawn(BenchCounter, "bench/warm-first")
    wait_for_pool(2)
    raw_class = ray.remote(RawCounter)

    samples: dict[str, list[float]] = {
        "hosted": [],
        WARM_IDLE: [],
        WARM_NEXT: [],
        "dedicated, cold": [],
        "raw Ray actor": [],
        RAW_CALL_IDLE: [],
    }
    for index in range(args.hosted_spawns):
        samples["hosted"].append(timed(spawn_hosted, f"bench/hosted-{index}"))
    # Each kind of spawn that starts or claims a process runs in a phase of its own. Every
    # spawn waits SETTLE_S first, so that the process start-ups of one spawn (a cold agent,
    # a raw actor, the warm pool's refill) do not run during the next. An idle machine
    # replies to its first call more slowly. So the warm phase also times a second spawn
    # right after the first, from the pool's second actor, and the raw phase times one
    # call to a running actor after the same wait. Each dedicated agent keeps database
    # connections open, so each is stopped before the next.
    for index in range(args.actor_spawns):
        wait_for_pool(2)
        time.sleep(SETTLE_S)
        for kind, name in (
            (WARM_IDLE, f"bench/warm-{index}"),
            (WARM_NEXT, f"bench/warm-next-{index}"),
        ):
            samples[kind].append(timed(arbor.spawn, BenchCounter, name))
        arbor.stop(f"bench/warm-{index}", purge=True)
        arbor.stop(f"bench/warm-next-{index}", purge=True)
    for index in range(args.actor_spawns):
        time.sleep(SETTLE_S)
        samples["dedicated, cold"].append(
            timed(arbor.spawn, BenchCounter, f"bench/cold-{index}", num_cpus=0)
        )
        arbor.stop(f"bench/cold-{index}", purge=True)
    running = raw_class.remote()
    ray.get(running.get.remote())
    for index in range(args.actor_spawns):
        time.sleep(SETTLE_S)
        samples["raw Ray actor"].append(timed(spawn_raw, raw_class, f"raw-{index}"))
        time.sleep(SETTLE_S)
        samples[RAW_CALL_IDLE].append(timed(lambda: ray.get(running.get.remote())))

    rows = [[kind, *stat_row(values)] for kind, values in samples.items()]
    print("\n## Spawn latency\n")
    print(common.format_table(["spawn", "n", "p50 ms", "p99 ms", "min ms", "max ms"], rows))
    plot_bars(
        args,
        "hosted-spawn.png",
        "Spawn latency (ms, log scale)",
        {kind: (row[1], row[2]) for kind, *row in rows},
    )


def spawn_hosted(name: str) -> None:
    arbor.spawn(BenchCounter, name, placement="hosted")


def spawn_raw(actor_class: Any, name: str) -> None:
    handle = actor_class.options(
        name=name, namespace=RAW_NAMESPACE, lifetime="detached", max_restarts=-1
    ).remote()
    ray.get(handle.get.remote())


def wait_for_pool(size: int, type_path: str = BENCH_TYPE, timeout: float = 120.0) -> None:
    registry = registry_handle()
    deadline = time.monotonic() + timeout
    while ray.get(registry.warm_pool.remote()).get(type_path, 0) < size:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the warm pool of {type_path} did not refill to {size} within {timeout} s"
            )
        time.sleep(0.01)


# Ask round trips.


def bench_ask(args: argparse.Namespace) -> None:
    peers = [
        arbor.spawn(BenchPeer, f"bench/peer-{index}", placement="hosted") for index in range(4)
    ]
    hosts = {peer.name: peer.info()["actor"] for peer in peers}
    first = peers[0]
    same = next(peer for peer in peers[1:] if hosts[peer.name] == hosts[first.name])
    other = next(peer for peer in peers[1:] if hosts[peer.name] != hosts[first.name])
    if not args.lean:
        for target in (same, other):
            arbor.grant(first.name, f"arbor://agent/ask/{target.name}")
    dedicated = arbor.spawn(BenchPeer, "bench/peer-dedicated")
    raw_async = ray.remote(RawCounter).remote()
    raw_sync = ray.remote(RawSyncCounter).remote()
    raw_pinger = ray.remote(RawPinger).remote()
    ray.get([raw_async.get.remote(), raw_sync.get.remote()])
    # The dedicated spawn starts a warm pool of BenchPeer actors, whose process start-ups
    # would otherwise run during the first round trips.
    wait_for_pool(2, PEER_TYPE)
    time.sleep(SETTLE_S)
    count = args.asks

    def inside(target: arbor.AgentRef, handler: str) -> list[float]:
        first.ask("time_asks", target.name, handler, 100, timeout=300)
        result: list[float] = first.ask("time_asks", target.name, handler, count, timeout=300)
        return result

    samples = {
        "asyncio.Queue round trip, one process (floor)": queue_round_trips(count),
        "same host, async handler (in process)": inside(same, "echo"),
        "same host, sync handler (in process)": inside(same, "echo_sync"),
        "two hosts, one node (Ray)": inside(other, "echo"),
        "raw Ray actor to actor, one node": raw_actor_to_actor(raw_pinger, raw_sync, count),
        "driver to hosted agent (Ray)": driver_asks(lambda i: same.ask("echo", i), count),
        "driver to dedicated agent (Ray)": driver_asks(lambda i: dedicated.ask("echo", i), count),
        "driver to raw Ray async actor": driver_asks(
            lambda i: ray.get(raw_async.get.remote()), count
        ),
        "driver to raw Ray sync actor": driver_asks(
            lambda i: ray.get(raw_sync.get.remote()), count
        ),
    }
    rows = [[kind, *stat_row(values, scale=1e6)] for kind, values in samples.items()]
    print("\n## Ask round trip\n")
    print(common.format_table(["round trip", "n", "p50 µs", "p99 µs", "min µs", "max µs"], rows))
    plot_bars(
        args,
        "hosted-ask-lean.png" if args.lean else "hosted-ask.png",
        "Ask round trip (µs, log scale)",
        {kind: (row[1], row[2]) for kind, *row in rows},
    )


def queue_round_trips(count: int) -> list[float]:
    async def run() -> list[float]:
        requests: asyncio.Queue[int] = asyncio.Queue()
        replies: asyncio.Queue[int] = asyncio.Queue()

        async def echo() -> None:
            while True:
                replies.put_nowait(await requests.get())

        server = asyncio.get_running_loop().create_task(echo())
        samples = []
        for index in range(count):
            start = time.perf_counter()
            requests.put_nowait(index)
            await replies.get()
            samples.append(time.perf_counter() - start)
        server.cancel()
        return samples

    return asyncio.run(run())


def raw_actor_to_actor(pinger: Any, target: Any, count: int) -> list[float]:
    ray.get(pinger.ping.remote(target, 100))
    result: list[float] = ray.get(pinger.ping.remote(target, count))
    return result


def driver_asks(call: Callable[[int], Any], count: int) -> list[float]:
    for index in range(100):
        call(index)
    samples = []
    for index in range(count):
        start = time.perf_counter()
        call(index)
        samples.append(time.perf_counter() - start)
    return samples


# Ask round trips across nodes.


def bench_nodes(args: argparse.Namespace, database_url: str) -> None:
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_args = {
        "num_cpus": 1,
        "object_store_memory": args.object_store_mb * common.MIB,
        "node_ip_address": "127.0.0.1",
    }
    cluster = Cluster(
        initialize_head=True, head_node_args={**node_args, "include_dashboard": False}
    )
    cluster.add_node(**node_args)
    cluster.wait_for_nodes()
    arbor.init(address=cluster.address, database_url=database_url)
    try:
        peers = [
            arbor.spawn(BenchPeer, f"bench/node-peer-{index}", placement="hosted")
            for index in range(4)
        ]
        nodes = {peer.name: peer.info()["node_id"] for peer in peers}
        first = peers[0]
        other = next((peer for peer in peers[1:] if nodes[peer.name] != nodes[first.name]), None)
        if other is None:
            raise RuntimeError(f"the hosts did not spread over the two nodes: {nodes}")
        arbor.grant(first.name, f"arbor://agent/ask/{other.name}")
        first.ask("time_asks", other.name, "echo", 100, timeout=300)
        hosted = first.ask("time_asks", other.name, "echo", args.asks, timeout=300)

        node_ids = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
        placed = [
            NodeAffinitySchedulingStrategy(node_id=node_id, soft=False) for node_id in node_ids
        ]
        pinger = ray.remote(RawPinger).options(scheduling_strategy=placed[0]).remote()
        target = ray.remote(RawSyncCounter).options(scheduling_strategy=placed[1]).remote()
        raw = raw_actor_to_actor(pinger, target, args.asks)
    finally:
        arbor.shutdown()
        cluster.shutdown()
    rows = [
        ["hosted agent to hosted agent, two nodes (Ray)", *stat_row(hosted, scale=1e6)],
        ["raw Ray actor to actor, two nodes", *stat_row(raw, scale=1e6)],
    ]
    print("\n## Ask round trip across two nodes on this machine\n")
    print(common.format_table(["round trip", "n", "p50 µs", "p99 µs", "min µs", "max µs"], rows))


# Messages per second.

# Asks each sender keeps in flight in a throughput run.
IN_FLIGHT = 4


def bench_throughput(args: argparse.Namespace) -> None:
    # New agents go to the host with the fewest, so 6 x senders agents fill both hosts.
    agents = [
        arbor.spawn(BenchPeer, f"bench/rate-{index}", placement="hosted")
        for index in range(6 * args.senders)
    ]
    by_host: dict[str, list[arbor.AgentRef]] = {}
    for agent in agents:
        by_host.setdefault(agent.info()["actor"], []).append(agent)
    if len(by_host) < 2:
        raise RuntimeError(f"the throughput section needs two hosts; the agents are in {by_host}")
    first, second = (group for _, group in sorted(by_host.items())[:2])
    half = max(args.senders // 2, 1)
    # Same host: half the pairs in each host. Two hosts: half the senders in each host.
    same = [(first.pop(), first.pop()) for _ in range(half)]
    same += [(second.pop(), second.pop()) for _ in range(half)]
    across = [(first.pop(), second.pop()) for _ in range(half)]
    across += [(second.pop(), first.pop()) for _ in range(half)]
    dedicated = [
        (
            arbor.spawn(BenchPeer, f"bench/rate-sender-{index}"),
            arbor.spawn(BenchPeer, f"bench/rate-receiver-{index}"),
        )
        for index in range(2)
    ]
    if not args.lean:
        for sender, receiver in [*same, *across, *dedicated]:
            arbor.grant(sender.name, f"arbor://agent/ask/{receiver.name}")
    raw = [
        (ray.remote(RawAsyncPinger).remote(), ray.remote(RawCounter).remote())
        for _ in range(args.senders)
    ]
    ray.get([receiver.get.remote() for _, receiver in raw])
    wait_for_pool(2, PEER_TYPE)
    time.sleep(SETTLE_S)

    def agents_rate(pairs: list[tuple[arbor.AgentRef, arbor.AgentRef]]) -> tuple[int, float]:
        def run(pair: tuple[arbor.AgentRef, arbor.AgentRef]) -> int:
            sender, receiver = pair
            count: int = sender.ask(
                "ask_for", receiver.name, args.seconds, IN_FLIGHT, timeout=args.seconds + 60
            )
            return count

        run(pairs[0])  # warm up: the first requests look up routes and capabilities
        with concurrent.futures.ThreadPoolExecutor(len(pairs)) as pool:
            total = sum(pool.map(run, pairs))
        return len(pairs), total / args.seconds

    def raw_rate() -> tuple[int, float]:
        calls = [
            pinger.call_for.remote(receiver, args.seconds, IN_FLIGHT) for pinger, receiver in raw
        ]
        return len(raw), sum(ray.get(calls)) / args.seconds

    results = {
        "hosted, same host (in process)": agents_rate(same),
        "hosted, two hosts (Ray)": agents_rate(across),
        "dedicated to dedicated (Ray)": agents_rate(dedicated),
        "raw Ray async actor to actor": raw_rate(),
    }
    rows = [[kind, senders, senders * IN_FLIGHT, rate] for kind, (senders, rate) in results.items()]
    print(f"\n## Messages per second on one node ({args.seconds:g} s per run)\n")
    print(common.format_table(["between", "senders", "asks in flight", "messages/s"], rows))
    plot_rates(args, {kind: rate for kind, (_, rate) in results.items()})


def plot_rates(args: argparse.Namespace, rates: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rates)
    figure, axes = plt.subplots(figsize=(10, 0.5 * len(labels) + 1.5))
    axes.barh(range(len(labels)), [rates[label] for label in labels])
    axes.set_yticks(list(range(len(labels))), labels)
    axes.invert_yaxis()
    axes.set_xlabel("messages per second (asks answered)")
    axes.set_title("Messages per second on one node")
    figure.tight_layout()
    path = os.path.join(args.plot_dir, "hosted-throughput.png")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"\nplot: {path}")


# Memory per agent.


def bench_memory(args: argparse.Namespace) -> None:
    levels = [int(level) for level in args.levels.split(",") if level]
    # The first hosted spawn starts the hosts, whose memory without agents is the base.
    arbor.spawn(BenchCounter, "bench/mem-first", placement="hosted")
    host_pids = [report["pid"] for report in ray.get(registry_handle().hosts.remote())]
    base_rss, base_uss = memory_of(host_pids)
    rows: list[list[object]] = []
    spawned = 0
    per_agent: dict[str, list[tuple[int, float]]] = {"hosted, RSS": [], "hosted, USS": []}
    # Spawn latency at each level: the last spawns of a level run one at a time, timed.
    growth: list[list[object]] = []
    growth_points: dict[str, list[tuple[Any, ...]]] = {"hosted": [], "dedicated, cold": []}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for level in levels:
            timed_from = max(spawned, level - args.level_spawns)
            started = time.perf_counter()
            list(
                pool.map(
                    spawn_hosted, [f"bench/mem/{index}" for index in range(spawned, timed_from)]
                )
            )
            seconds = time.perf_counter() - started
            one_by_one = [
                timed(spawn_hosted, f"bench/mem/{index}") for index in range(timed_from, level)
            ]
            growth.append([f"hosted, {level} agents", *stat_row(one_by_one)])
            growth_points["hosted"].append((level, *stat_row(one_by_one)[1:3]))
            spawned_now, spawned = timed_from - spawned, level
            rss, uss = memory_of(host_pids)
            per_agent["hosted, RSS"].append((level, (rss - base_rss) / level))
            per_agent["hosted, USS"].append((level, (uss - base_uss) / level))
            print(
                f"hosted, {level} agents: {rss / common.MIB:.0f} MiB RSS, "
                f"{uss / common.MIB:.0f} MiB USS in the host processes",
                flush=True,
            )
            rows.append(
                [
                    f"hosted, {level} agents",
                    rss / common.MIB,
                    uss / common.MIB,
                    (rss - base_rss) / level / 1024,
                    (uss - base_uss) / level / 1024,
                    f"{spawned_now / seconds:.0f} spawns/s",
                ]
            )

    dedicated_pids = []
    dedicated_spawns = []
    for index in range(args.dedicated):
        started = time.perf_counter()
        ref = arbor.spawn(BenchCounter, f"bench/mem-dedicated-{index}", num_cpus=0)
        dedicated_spawns.append(time.perf_counter() - started)
        dedicated_pids.append(ref.info()["pid"])
    if dedicated_spawns:
        last = dedicated_spawns[-args.level_spawns :]
        growth.append([f"dedicated, cold, last {len(last)} of {args.dedicated}", *stat_row(last)])
        growth_points["dedicated, cold"].append((args.dedicated, *stat_row(last)[1:3]))
    raw_handles = [
        ray.remote(RawSyncCounter).options(num_cpus=0).remote() for _ in range(args.dedicated)
    ]
    raw_pids = ray.get([handle.pid.remote() for handle in raw_handles])
    for label, pids in (("dedicated", dedicated_pids), ("raw Ray actor", raw_pids)):
        rss, uss = memory_of(pids)
        per_agent[f"{label}, RSS"] = [(len(pids), rss / len(pids))]
        per_agent[f"{label}, USS"] = [(len(pids), uss / len(pids))]
        rows.append(
            [
                f"{label}, {len(pids)} processes",
                rss / common.MIB,
                uss / common.MIB,
                rss / len(pids) / 1024,
                uss / len(pids) / 1024,
                "one process each",
            ]
        )
    print("\n## Resident memory\n")
    print(f"host processes before the hosted agents: {base_rss / common.MIB:.0f} MiB RSS")
    print(
        common.format_table(
            ["agents", "RSS MiB", "USS MiB", "RSS KiB/agent", "USS KiB/agent", "note"], rows
        )
    )
    plot_memory(args, per_agent)
    print("\n## Spawn latency as agents accumulate\n")
    print(common.format_table(["spawns", "n", "p50 ms", "p99 ms", "min ms", "max ms"], growth))
    plot_growth(args, growth_points)


def memory_of(pids: list[int]) -> tuple[int, int]:
    """Return the summed RSS and USS of the processes, in bytes."""
    rss = uss = 0
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        rss += info.rss
        uss += info.uss
    return rss, uss


# Shared helpers.


def timed(action: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    start = time.perf_counter()
    action(*args, **kwargs)
    return time.perf_counter() - start


def stat_row(values: list[float], scale: float = 1000.0) -> list[object]:
    stats = common.summarize(values)
    factor = scale / 1000.0
    return [
        int(stats["n"]),
        stats["p50"] * factor,
        stats["p99"] * factor,
        stats["min"] * factor,
        stats["max"] * factor,
    ]


def plot_bars(
    args: argparse.Namespace, filename: str, title: str, values: dict[str, tuple[Any, Any]]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(values)
    positions = range(len(labels))
    figure, axes = plt.subplots(figsize=(10, 0.5 * len(labels) + 1.5))
    axes.barh([p - 0.2 for p in positions], [values[k][0] for k in labels], 0.4, label="p50")
    axes.barh([p + 0.2 for p in positions], [values[k][1] for k in labels], 0.4, label="p99")
    axes.set_yticks(list(positions), labels)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(args.plot_dir, filename), dpi=100)
    plt.close(figure)
    print(f"\nplot: {os.path.join(args.plot_dir, filename)}")


def plot_memory(args: argparse.Namespace, per_agent: dict[str, list[tuple[int, float]]]) -> None:
    with log_log_plot(
        args,
        "hosted-memory",
        "Resident memory per agent",
        "agents (actors for dedicated and raw Ray)",
        "KiB per agent",
    ) as axes:
        for label, points in per_agent.items():
            counts = [count for count, _ in points]
            kib = [value / 1024 for _, value in points]
            axes.plot(counts, kib, marker="o", label=label)


def plot_growth(args: argparse.Namespace, points: dict[str, list[tuple[Any, ...]]]) -> None:
    """Plot spawn p50 and p99 against the number of agents already running."""
    with log_log_plot(
        args,
        "hosted-spawn-growth",
        "Spawn latency as agents accumulate",
        "agents running",
        "spawn latency (ms)",
    ) as axes:
        for label, rows in points.items():
            if not rows:
                continue
            counts = [row[0] for row in rows]
            p50 = [row[1] for row in rows]
            p99 = [row[2] for row in rows]
            axes.plot(counts, p50, marker="o", label=f"{label}, p50")
            axes.plot(counts, p99, marker="x", linestyle="--", label=f"{label}, p99")


@contextlib.contextmanager
def log_log_plot(
    args: argparse.Namespace, stem: str, title: str, x_label: str, y_label: str
) -> Iterator[Any]:
    """Yield the axes of a line plot with log scales, then save it in the plot folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    yield axes
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    path = os.path.join(args.plot_dir, plot_name(stem, args))
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"\nplot: {path}")


def plot_name(stem: str, args: argparse.Namespace) -> str:
    """Return the PNG name of a plot; a run on SQLite gets its own, beside PostgreSQL's."""
    return f"{stem}.png" if args.store == "postgresql" else f"{stem}-{args.store}.png"


if __name__ == "__main__":
    main()
