"""The registry's warm pool: started, empty agent actors kept ready on each node.

The pool keeps, per agent class and per node with CPUs, at least ``ARBOR_WARM_POOL_SIZE``
ready actors, and as many as that class's spawns of the last WINDOW_S seconds, up to
``ARBOR_WARM_POOL_MAX``. So a burst of spawns finds a larger pool the next time, and the
pool shrinks back once spawns slow down. The registry starts and kills the actors; this
class keeps the account of them.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from arbor.config import Settings
from arbor.registry.spec import WARM_LEND_S

logger = logging.getLogger(__name__)

# Seconds of recent spawns that size the pool.
WINDOW_S = 10.0


@dataclass
class WarmActor:
    """A started actor of an agent class that runs no agent yet."""

    name: str
    handle: Any
    # The node the actor was placed on, or None when Ray chose one.
    node_id: str | None


class WarmPool:
    """Ready and lent warm actors per agent type path, and the recent spawns of each type."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        if settings.warm_pool_size > settings.warm_pool_max:
            logger.warning(
                "ARBOR_WARM_POOL_SIZE=%d is above ARBOR_WARM_POOL_MAX=%d, so the pool keeps %d "
                "warm actors per agent class and node and does not grow; raise "
                "ARBOR_WARM_POOL_MAX to let it grow with spawns",
                settings.warm_pool_size,
                settings.warm_pool_max,
                settings.warm_pool_size,
            )
        # Ready actors per type path, oldest first.
        self._ready: dict[str, deque[WarmActor]] = {}
        # Actors lent to clients, by Ray name, as (type path, actor, time lent).
        self._lent: dict[str, tuple[str, WarmActor, float]] = {}
        # Ready actors named to a client as a spare, by Ray name, with the time named.
        # The client may claim one directly, so the registry does not kill it meanwhile.
        self._spares: dict[str, float] = {}
        # Monotonic times of the spawns of each type in the last WINDOW_S.
        self._spawns: dict[str, deque[float]] = {}

    def take(self, type_path: str) -> WarmActor | None:
        """Remove and return a ready actor of ``type_path``, or None.

        The oldest actor that was not named to a client as a spare goes first, so that a
        client's claim of its spare rarely meets another spawn in the same actor.
        """
        self._reclaim()
        ready = self._ready.get(type_path)
        if not ready:
            return None
        for actor in ready:
            if actor.name not in self._spares:
                ready.remove(actor)
                return actor
        return ready.popleft()

    def ready(self, type_path: str) -> int:
        """Return the number of ready actors of ``type_path``."""
        self._reclaim()
        return len(self._ready.get(type_path, ()))

    def name_spares(self, type_path: str, limit: int) -> list[WarmActor]:
        """Return up to ``limit`` ready actors of ``type_path`` for a client to hold as spares.

        They stay ready for any spawn, and the first claim of one wins. The pool keeps
        them for WARM_LEND_S, as it keeps lent actors.
        """
        now = time.monotonic()
        spares = list(self._ready.get(type_path, ()))[-limit:] if limit > 0 else []
        for actor in spares:
            self._spares[actor.name] = now
        return spares

    def claimed(self, name: str) -> WarmActor | None:
        """Forget actor ``name``, which a client claimed, lent or not; returns it, or None."""
        self._spares.pop(name, None)
        entry = self._lent.pop(name, None)
        if entry is not None:
            return entry[1]
        for ready in self._ready.values():
            for actor in ready:
                if actor.name == name:
                    ready.remove(actor)
                    return actor
        return None

    def put_back(self, type_path: str, actor: WarmActor) -> None:
        """Return an actor that a spawn took but did not use, first in line."""
        self._ready.setdefault(type_path, deque()).appendleft(actor)

    def add(self, type_path: str, actor: WarmActor) -> None:
        """Add a newly started actor."""
        self._ready.setdefault(type_path, deque()).append(actor)

    def lend(self, type_path: str) -> WarmActor | None:
        """Take a ready actor of ``type_path`` and record it as lent, or return None."""
        actor = self.take(type_path)
        if actor is not None:
            self._lent[actor.name] = (type_path, actor, time.monotonic())
        return actor

    def return_loan(self, name: str) -> None:
        """Put the lent actor ``name``, which its borrower does not need, back first in line."""
        entry = self._lent.pop(name, None)
        if entry is not None:
            self.put_back(entry[0], entry[1])

    def count(self, type_path: str) -> int:
        """Return the number of ready and lent actors of ``type_path``."""
        self._reclaim()
        lent = sum(1 for lent_type, _, _ in self._lent.values() if lent_type == type_path)
        return len(self._ready.get(type_path, ())) + lent

    def counts(self) -> dict[str, int]:
        """Return `count` for every type the pool has known."""
        return {type_path: self.count(type_path) for type_path in self._ready}

    def actors(self) -> list[dict[str, Any]]:
        """Describe every ready and lent actor: type path, Ray name, node and whether lent."""
        self._reclaim()
        described = [
            {"type_path": type_path, "name": actor.name, "node_id": actor.node_id, "lent": False}
            for type_path, ready in self._ready.items()
            for actor in ready
        ]
        described += [
            {"type_path": type_path, "name": actor.name, "node_id": actor.node_id, "lent": True}
            for type_path, actor, _ in self._lent.values()
        ]
        return described

    def clear(self) -> list[WarmActor]:
        """Forget every actor and return them."""
        every = [actor for ready in self._ready.values() for actor in ready]
        every += [actor for _, actor, _ in self._lent.values()]
        self._ready.clear()
        self._lent.clear()
        self._spares.clear()
        return every

    def note_spawn(self, type_path: str) -> None:
        """Count a spawn that could claim a warm actor of ``type_path``."""
        self._spawns.setdefault(type_path, deque()).append(time.monotonic())

    def target(self, type_path: str, nodes: int) -> int:
        """Return how many actors of ``type_path`` each of ``nodes`` nodes should keep."""
        size = self._settings.warm_pool_size
        if size == 0 or nodes == 0:
            return 0
        times = self._spawns.get(type_path, deque())
        horizon = time.monotonic() - WINDOW_S
        while times and times[0] < horizon:
            times.popleft()
        ceiling = max(self._settings.warm_pool_max, size)
        return min(max(size, math.ceil(len(times) / nodes)), ceiling)

    def register(self, type_path: str) -> None:
        """Start the account of ``type_path``, so that `counts` lists it from now on."""
        self._ready.setdefault(type_path, deque())

    def missing(self, type_path: str, nodes: list[str]) -> list[str]:
        """Return the nodes that need one more actor of ``type_path``, once per actor.

        The nodes with the fewest actors come first.
        """
        target = self.target(type_path, len(nodes))
        have = self._per_node(type_path)
        return [node for level in range(target) for node in nodes if have.get(node, 0) <= level]

    def surplus(self, type_path: str, nodes: list[str]) -> list[WarmActor]:
        """Remove and return the ready actors beyond the target, and those on other nodes.

        ``nodes`` are the alive nodes with CPUs. Lent actors stay until they come back.
        """
        target = self.target(type_path, len(nodes))
        have = self._per_node(type_path)
        remaining: deque[WarmActor] = deque()
        removed = []
        # The newest go first, so the oldest ones stay.
        for actor in reversed(self._ready.get(type_path, deque())):
            node = actor.node_id
            if actor.name in self._spares and node in nodes:
                # A client may be claiming it right now.
                remaining.appendleft(actor)
            elif node not in nodes or have.get(node, 0) > target:
                removed.append(actor)
                have[node] = have.get(node, 0) - 1
            else:
                remaining.appendleft(actor)
        self._ready[type_path] = remaining
        return removed

    def type_paths(self) -> list[str]:
        """Return the type paths the pool has an account of."""
        return list(self._ready)

    def _per_node(self, type_path: str) -> dict[str | None, int]:
        self._reclaim()
        have: dict[str | None, int] = {}
        for actor in self._ready.get(type_path, ()):
            have[actor.node_id] = have.get(actor.node_id, 0) + 1
        for lent_type, actor, _ in self._lent.values():
            if lent_type == type_path:
                have[actor.node_id] = have.get(actor.node_id, 0) + 1
        return have

    def _reclaim(self) -> None:
        """Put actors lent longer than WARM_LEND_S back among the ready ones.

        Spares named longer ago than that are no client's any more.
        """
        now = time.monotonic()
        for name, named_at in list(self._spares.items()):
            if now - named_at > WARM_LEND_S:
                del self._spares[name]
        for name, (type_path, actor, lent_at) in list(self._lent.items()):
            if now - lent_at > WARM_LEND_S:
                del self._lent[name]
                self.put_back(type_path, actor)
