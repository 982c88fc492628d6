"""Agent classes for the topic tests and benchmark; importable so Ray workers find them."""

from __future__ import annotations

import os
import time
from typing import Any

import arbor


class Listener(arbor.Agent):
    """Subscribes to topics and records every event it handles, in order."""

    def __init__(self) -> None:
        self.events: list[list[Any]] = []

    def join(self, topic: str, max_lag: int | None = None) -> list[Any]:
        info = self.context.subscribe(topic, "on_event", max_lag=max_lag)
        return [info.topic, info.subscriber, info.handler, info.max_lag]

    def join_with(self, topic: str, handler: Any) -> None:
        self.context.subscribe(topic, handler)

    def leave(self, topic: str) -> bool:
        return self.context.unsubscribe(topic)

    def on_event(self, topic: str, event: Any) -> None:
        self.events.append([topic, event])

    def wrong_signature(self, event: Any) -> None:
        self.events.append(["wrong", event])

    def received(self) -> list[list[Any]]:
        return self.events

    def count(self) -> int:
        return len(self.events)


class Gated(arbor.Agent):
    """Handles each event only once the file at ``gate`` exists, so it can stall on purpose."""

    def __init__(self, gate: str) -> None:
        self.gate = gate
        self.events: list[Any] = []

    def join(self, topic: str, max_lag: int) -> None:
        self.context.subscribe(topic, self.on_event, max_lag=max_lag)

    def on_event(self, topic: str, event: Any) -> None:
        with open(f"{self.gate}.entered", "w"):
            pass
        while not os.path.exists(self.gate):
            time.sleep(0.05)
        self.events.append(event)

    def received(self) -> list[Any]:
        return self.events


class Publisher(arbor.Agent):
    """Publishes events from its handlers."""

    def __init__(self) -> None:
        self.published = 0

    def emit(self, topic: str, events: list[Any]) -> list[int]:
        seqs = [self.context.publish(topic, event) for event in events]
        self.published += len(events)
        return seqs

    def try_publish(self, topic: str, event: Any) -> str:
        try:
            self.context.publish(topic, event)
        except arbor.ArborError as error:
            return f"{type(error).__name__}: {error}"
        return "published"

    def try_subscribe(self, topic: str) -> str:
        try:
            self.context.subscribe(topic, "emit")
        except arbor.ArborError as error:
            return f"{type(error).__name__}: {error}"
        return "subscribed"


class Tally(arbor.Agent):
    """Counts events without keeping them, for the fan-out benchmark."""

    def __init__(self) -> None:
        self.seen = 0
        self.last_at = 0.0

    def join(self, topic: str, max_lag: int | None = None) -> None:
        self.context.subscribe(topic, "on_event", max_lag=max_lag)

    def on_event(self, topic: str, event: Any) -> None:
        self.seen += 1
        self.last_at = time.time()

    def progress(self) -> list[float]:
        return [self.seen, self.last_at]
