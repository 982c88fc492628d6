"""Agent and actor classes the benchmarks run.

Ray workers import these classes by module path, so they live in this importable module
and the benchmark scripts put the repository root on ``PYTHONPATH`` before Ray starts.
"""

from __future__ import annotations

import os

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
