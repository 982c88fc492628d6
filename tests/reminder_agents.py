"""Agent classes for the timer and reminder tests; importable so Ray workers find them."""

from __future__ import annotations

import time
from typing import Any

import arbor


class Reminded(arbor.Agent):
    """Sets reminders on itself and records every delivery with the time it ran."""

    def __init__(self) -> None:
        self.deliveries: list[list[Any]] = []

    def on_reminder(self, name: str, payload: Any) -> None:
        self.deliveries.append([name, payload, time.time()])

    def remind(self, name: str, **options: Any) -> dict[str, Any]:
        info = self.context.remind(name, **options)
        return {"name": info.name, "due": info.due_at.timestamp(), "every": info.every}

    def cancel(self, name: str) -> bool:
        return self.context.cancel_reminder(name)

    def listed(self) -> list[list[Any]]:
        return [
            [info.name, info.due_at.timestamp(), info.every, info.payload, info.fired]
            for info in self.context.reminders()
        ]

    def received(self) -> list[list[Any]]:
        return self.deliveries


class Unreminded(arbor.Agent):
    """Has no on_reminder handler."""

    def __init__(self) -> None:
        self.count = 0

    def remind(self, name: str, **options: Any) -> None:
        self.context.remind(name, **options)


class Ticker(arbor.Agent):
    """Schedules timers and records each event with the time it ran."""

    def __init__(self) -> None:
        self.events: list[list[Any]] = []

    def start(self, label: str, delay: float | None = None, every: float | None = None) -> str:
        return self.context.schedule("tick", label, delay=delay, every=every)

    def start_method(self, label: str, delay: float) -> str:
        return self.context.schedule(self.tick, label, delay=delay)

    def schedule_raw(self, handler: Any, **options: Any) -> str:
        return self.context.schedule(handler, **options)

    def tick(self, label: str) -> None:
        self.events.append([label, time.time()])

    def note(self, label: str) -> None:
        self.events.append([label, time.time()])

    def slow(self, seconds: float) -> None:
        started = time.time()
        time.sleep(seconds)
        self.events.append(["slow", started, time.time()])

    def cancel(self, timer_id: str) -> bool:
        return self.context.cancel_timer(timer_id)

    def log(self) -> list[list[Any]]:
        return self.events


class Heartbeat(arbor.Agent):
    """Starts a periodic timer in on_start, so every incarnation has one."""

    def __init__(self) -> None:
        self.beats: list[list[Any]] = []

    def on_start(self) -> None:
        self.context.schedule("beat", every=0.2)

    def beat(self) -> None:
        self.beats.append([self.context.incarnation, time.time()])

    def log(self) -> list[list[Any]]:
        return self.beats
