"""Agent and actor classes the benchmarks run.

Ray workers import these classes by module path, so they live in this importable module
and the benchmark scripts put the repository root on ``PYTHONPATH`` before Ray starts.
"""

from __future__ import annotations

import asyncio
import os
import time

import arbor


class BenchCounter(arbor.Agent):
    """A counter whose checkpointed state can be padded to a chosen size."""

    def __init__(self, padding_bytes: int = 0) -> None:
        self.count = 0
        # Padding is a public attribute, so it is part of every snapshot and checkpoint.
        self.padding = "x" * padding_bytes

    def add(self, n: int) -> int:
        self.count += n
        return self.count

    def get(self) -> int:
        return self.count


class RawCounter:
    """The raw-Ray baseline: the same handlers as an async Ray actor, state in memory only.

    Wrap it with ``ray.remote`` to use it. A restarted actor starts again from zero.
    """

    def __init__(self, padding_bytes: int = 0) -> None:
        self.count = 0
        self.padding = "x" * padding_bytes

    async def add(self, n: int) -> int:
        self.count += n
        return self.count

    async def get(self) -> int:
        return self.count

    async def pid(self) -> int:
        return os.getpid()

    async def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


class RawSyncCounter:
    """`RawCounter` as a synchronous Ray actor, the kind of actor Arbor runs each agent in."""

    def __init__(self, padding_bytes: int = 0) -> None:
        self.count = 0
        self.padding = "x" * padding_bytes

    def add(self, n: int) -> int:
        self.count += n
        return self.count

    def get(self) -> int:
        return self.count

    def pid(self) -> int:
        return os.getpid()


class Pinger(arbor.Agent):
    """Asks another agent from inside a handler, where capabilities are checked."""

    def __init__(self) -> None:
        self.rounds = 0

    def ping(self, target: str, count: int) -> list[float]:
        """Ask ``target`` for its count ``count`` times; returns each round trip in seconds."""
        ref = self.context.get(target)
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            ref.ask("get")
            samples.append(time.perf_counter() - start)
        return samples

    def probe(self, target: str) -> bool:
        """Return whether an ask to ``target`` is still allowed."""
        try:
            self.context.get(target).ask("get")
        except arbor.CapabilityDenied:
            return False
        return True


class RawPinger:
    """The raw-Ray baseline of `Pinger`: one actor calling another actor's method."""

    def ping(self, target: object, count: int) -> list[float]:
        import ray

        samples = []
        for _ in range(count):
            start = time.perf_counter()
            ray.get(target.get.remote())  # type: ignore[attr-defined]
            samples.append(time.perf_counter() - start)
        return samples


class BenchPeer(arbor.Agent):
    """An agent that times its ask calls to a host-mate from an async handler."""

    def __init__(self) -> None:
        self.count = 0

    async def echo(self, value: int) -> int:
        return value

    def echo_sync(self, value: int) -> int:
        return value

    async def time_asks(self, target: str, handler: str, count: int) -> list[float]:
        """Ask ``target`` to run ``handler(index)`` ``count`` times; returns each round trip."""
        ref = self.context.get(target)
        samples = []
        for index in range(count):
            start = time.perf_counter()
            await ref.ask_async(handler, index)
            samples.append(time.perf_counter() - start)
        return samples

    async def ask_for(self, target: str, seconds: float, concurrency: int) -> int:
        """Ask ``target`` to echo from ``concurrency`` loops for ``seconds``; returns the count."""
        ref = self.context.get(target)
        deadline = time.perf_counter() + seconds
        return sum(await asyncio.gather(*(_ask_until(ref, deadline) for _ in range(concurrency))))


async def _ask_until(ref: arbor.AgentRef, deadline: float) -> int:
    count = 0
    while time.perf_counter() < deadline:
        await ref.ask_async("echo", count)
        count += 1
    return count


class RawAsyncPinger:
    """The raw-Ray baseline of `BenchPeer.ask_for`: concurrent calls to another actor."""

    async def call_for(self, target: object, seconds: float, concurrency: int) -> int:
        deadline = time.perf_counter() + seconds

        async def loop() -> int:
            count = 0
            while time.perf_counter() < deadline:
                await target.add.remote(1)  # type: ignore[attr-defined]
                count += 1
            return count

        return sum(await asyncio.gather(*(loop() for _ in range(concurrency))))
