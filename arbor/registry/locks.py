"""Locks per agent name inside the registry's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class NameLocks:
    """One asyncio lock per agent name, dropped once no task holds it or waits for it.

    A stop and the reconciler's recreation of the same agent take the name's lock, so a
    reconciler pass that read the agent's record before a stop cannot start a new actor
    for it after the stop.
    """

    def __init__(self) -> None:
        # Each name's lock and the number of tasks that hold it or wait for it.
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def busy(self, name: str) -> bool:
        """Return whether a task holds the lock of ``name`` or waits for it."""
        return name in self._locks

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        """Hold the lock of ``name`` for the body of an ``async with`` block."""
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)
