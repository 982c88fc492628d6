"""Agent and actor classes for `bench_reminders`, importable by Ray workers by module path."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import arbor


class ReminderSink(arbor.Agent):
    """Sets one-shot reminders on itself and records how late each one arrived."""

    def __init__(self) -> None:
        self.lateness_s: list[float] = []

    def arm(self, due_times: list[float]) -> int:
        """Set one reminder per Unix time in ``due_times``; the payload carries the due time."""
        for index, due in enumerate(due_times):
            self.context.remind(f"r{index}", at=due, payload={"due": due})
        return len(due_times)

    def on_reminder(self, name: str, payload: Any) -> None:
        self.lateness_s.append(time.time() - payload["due"])

    def lateness(self) -> list[float]:
        return self.lateness_s


class MemoryReminderSink(ReminderSink):
    """A `ReminderSink` whose deliveries change no state and so commit no checkpoint.

    The lateness list is private, so it stays out of the snapshot, and the measurement
    shows the reminder path without the agent's checkpoint writes.
    """

    def __init__(self) -> None:
        self._lateness: list[float] = []

    def on_start(self) -> None:
        self._lateness = []

    def on_reminder(self, name: str, payload: Any) -> None:
        self._lateness.append(time.time() - payload["due"])

    def lateness(self) -> list[float]:
        return self._lateness


class RawSink:
    """The raw-Ray baseline target: records how late each call arrived, in memory only."""

    def __init__(self) -> None:
        self.lateness_s: list[float] = []

    def fire(self, due: float) -> None:
        self.lateness_s.append(time.time() - due)

    def lateness(self) -> list[float]:
        return self.lateness_s


class RawScheduler:
    """The raw-Ray baseline scheduler: an async actor with one asyncio timer per due time.

    It keeps nothing durable, so its timers die with its process. It shows what an
    in-memory scheduler on Ray costs on the same machine.
    """

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    async def arm(self, target: Any, due_times: list[float]) -> int:
        for due in due_times:
            self._tasks.append(asyncio.get_running_loop().create_task(self._fire(target, due)))
        return len(due_times)

    async def _fire(self, target: Any, due: float) -> None:
        await asyncio.sleep(max(due - time.time(), 0.0))
        await target.fire.remote(due)
