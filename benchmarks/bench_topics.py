"""Topic fan-out throughput: events per second delivered to 10 and 100 subscribers.

For each subscriber count, the driver publishes ``--events`` events to one topic as fast
as it can with `arbor.publish`. Each subscriber is a `Tally` agent whose handler counts
the event in its state, so every delivery commits a checkpoint, as it would for a
subscriber that records what it saw. The run ends when every subscriber has handled every event.
Delivered per second is subscribers x events over the time from the first publish to the
last handler call.

The raw-Ray comparison sends the same events from the driver to the same number of bare
synchronous actors with ``actor.on_event.remote``: no log, no checkpoint, no retry, and no
isolation between slow and fast receivers. It shows what fan-out costs on Ray alone.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_topics --subscribers 10,100 --events 200
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

import arbor
from benchmarks import common
from tests.topic_agents import Tally

RAW_NAMESPACE = "bench-raw"
# Seconds to wait for the last delivery after the last publish.
DRAIN_TIMEOUT_S = 600.0
# Spawns sent to the registry at once; Ray starts a worker process for each.
SPAWN_THREADS = 8


class RawTally:
    """A bare Ray actor that counts events, the baseline receiver."""

    def __init__(self) -> None:
        self.seen = 0
        self.last_at = 0.0

    def on_event(self, topic: str, event: Any) -> None:
        self.seen += 1
        self.last_at = time.time()

    def progress(self) -> list[float]:
        return [self.seen, self.last_at]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--subscribers",
        default="10,100",
        help="comma-separated subscriber counts, one run each (default: 10,100)",
    )
    parser.add_argument(
        "--events", type=int, default=200, help="events published per run (default: 200)"
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
    counts = [int(count) for count in args.subscribers.split(",")]

    common.print_header(
        f"Topic fan-out, {args.events} events to {args.subscribers} subscribers, {args.store} store"
    )
    rows = []
    with common.temporary_database(args.store, args.pg_admin_url) as database_url:
        common.start_arbor(database_url, args)
        try:
            for count in counts:
                rows.append([count, "raw Ray actor calls", *measure_raw(count, args.events)])
                rows.append([count, "Arbor topic", *measure_arbor(count, args.events)])
        finally:
            arbor.shutdown()
    headers = [
        "subscribers",
        "path",
        "events",
        "publish s",
        "events/s published",
        "drain s",
        "delivered/s",
    ]
    print(common.format_table(headers, rows))
    print(
        "publish s: time to publish every event. drain s: from the first publish to the last "
        "handler call at any subscriber. delivered/s: subscribers x events / drain s."
    )
    common.print_footer()


def measure_arbor(count: int, events: int) -> list[Any]:
    """Spawn ``count`` subscribers, publish ``events`` events, and time their delivery."""
    topic = f"bench/fanout{count}"
    names = [f"bench/topics/{count}/{index}" for index in range(count)]

    def spawn(name: str) -> arbor.AgentRef:
        ref = arbor.spawn(Tally, name, capabilities=[f"arbor://topic/subscribe/{topic}"])
        ref.ask("join", topic, events)
        return ref

    with ThreadPoolExecutor(max_workers=SPAWN_THREADS) as pool:
        subscribers = list(pool.map(spawn, names))

    started = time.time()
    for index in range(events):
        arbor.publish(topic, index + 1)
    published_s = time.time() - started

    last_at = wait_for_all(lambda: [ref.ask("progress") for ref in subscribers], events)

    with ThreadPoolExecutor(max_workers=SPAWN_THREADS) as pool:
        list(pool.map(lambda name: arbor.stop(name, purge=True), names))
    return summary(count, events, published_s, last_at - started)


def measure_raw(count: int, events: int) -> list[Any]:
    """Send the same events from the driver to ``count`` bare actors, and time them."""
    actors = [
        ray.remote(RawTally).options(namespace=RAW_NAMESPACE, num_cpus=0).remote()
        for _ in range(count)
    ]
    ray.get([actor.progress.remote() for actor in actors], timeout=600)

    started = time.time()
    for index in range(events):
        for actor in actors:
            actor.on_event.remote("raw", index + 1)
    published_s = time.time() - started

    last_at = wait_for_all(
        lambda: ray.get([actor.progress.remote() for actor in actors], timeout=600), events
    )
    for actor in actors:
        ray.kill(actor)
    return summary(count, events, published_s, last_at - started)


def wait_for_all(progress: Any, events: int) -> float:
    """Poll until every receiver has ``events`` events; returns the latest handler time."""
    deadline = time.time() + DRAIN_TIMEOUT_S
    while True:
        values = progress()
        if all(int(seen) >= events for seen, _ in values):
            return max(float(last) for _, last in values)
        if time.time() > deadline:
            done = sum(int(seen) for seen, _ in values)
            raise RuntimeError(f"only {done} of {events * len(values)} deliveries arrived")
        time.sleep(0.5)


def summary(count: int, events: int, published_s: float, drain_s: float) -> list[Any]:
    return [events, published_s, events / published_s, drain_s, count * events / drain_s]


if __name__ == "__main__":
    main()
