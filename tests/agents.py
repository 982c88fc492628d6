"""Agent classes used by the tests; importable so Ray workers and the reconciler find them."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import arbor


class Counter(arbor.Agent):
    """Counts; the workhorse of the recovery tests."""

    def __init__(self, start: int = 0) -> None:
        self.count = start
        self.log: list[Any] = []

    def add(self, n: int) -> int:
        self.count += n
        return self.count

    def get(self) -> int:
        return self.count

    def append(self, item: Any) -> int:
        self.log.append(item)
        return len(self.log)

    def items(self) -> list[Any]:
        return self.log

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def store_value(self, value: Any) -> None:
        self.log.append(value)

    def set_extra(self, value: Any) -> None:
        self.extra = value

    def environment(self, key: str) -> str | None:
        return os.environ.get(key)

    def whoami(self) -> dict[str, Any]:
        return {
            "name": self.context.name,
            "namespace": self.context.namespace,
            "incarnation": self.context.incarnation,
        }

    def _private(self) -> str:
        return "hidden"


class Parent(arbor.Agent):
    """Spawns and messages a child agent through its context."""

    def __init__(self) -> None:
        self.children: list[str] = []

    def make_child(self, name: str, start: int) -> str:
        self.context.spawn(Counter, name, start=start)
        self.children.append(name)
        return name

    async def add_to_child(self, name: str, n: int) -> int:
        result: int = await self.context.get(name).ask_async("add", n)
        return result


class Explicit(arbor.Agent):
    """Uses snapshot/restore instead of public attributes."""

    def __init__(self) -> None:
        self._total = 0
        self.restored = False

    def add(self, n: int) -> int:
        self._total += n
        return self._total

    def state(self) -> dict[str, Any]:
        return {"total": self._total, "restored": self.restored}

    def snapshot(self) -> dict[str, Any]:
        return {"total": self._total}

    def restore(self, state: dict[str, Any]) -> None:
        self._total = state["total"]
        self.restored = True


class BrokenInit(arbor.Agent):
    """Raises in __init__."""

    def __init__(self) -> None:
        raise RuntimeError("cannot start without a license key")


class Relay(arbor.Agent):
    """Forwards numbers to another agent with fire-and-forget sends."""

    def __init__(self) -> None:
        self.forwarded = 0

    def forward(self, target: str, n: int) -> int:
        self.context.get(target).send("add", n)
        self.forwarded += 1
        return self.forwarded


class Picky(arbor.Agent):
    """Starts, or raises in __init__ when asked to, so a warm actor's claim can fail."""

    def __init__(self, fail: bool = False) -> None:
        if fail:
            raise RuntimeError("refusing to start: no licence key")
        self.value = 0

    def set(self, value: int) -> int:
        self.value = value
        return value


class Delegator(arbor.Agent):
    """Exercises the capability side of the context: spawn with grants, delegate, revoke."""

    def __init__(self) -> None:
        self.spawned: list[str] = []

    def spawn_child(self, name: str, capabilities: list[Any]) -> str:
        self.context.spawn(Counter, name, capabilities=capabilities)
        self.spawned.append(name)
        return name

    def ask_other(self, name: str, handler: str) -> Any:
        return self.context.get(name).ask(handler)

    def stop_other(self, name: str) -> None:
        self.context.stop(name)

    def held(self) -> list[dict[str, Any]]:
        return [
            {"id": info.id, "pattern": info.pattern, "parent_id": info.parent_id}
            for info in self.context.capabilities
        ]

    def delegate(self, capability_id: str, to: str, pattern: str | None = None) -> str:
        return self.context.delegate(capability_id, to, pattern).id

    def revoke(self, capability_id: str) -> list[str]:
        return self.context.revoke(capability_id)

    def read_secret(self, path: str) -> str:
        return self.context.secret(path).reveal()


class Chain(arbor.Agent):
    """Passes a request down a chain of agents and reports each hop's trace ids."""

    def __init__(self) -> None:
        self.hops = 0

    def relay(self, rest: list[str]) -> list[dict[str, Any]]:
        from arbor.observability.tracing import current_trace_ids

        self.hops += 1
        ids = current_trace_ids()
        logging.getLogger("tests.chain").info("relay step at %s", self.context.name)
        here = {
            "agent": self.context.name,
            "trace_id": ids[0] if ids else None,
            "span_id": ids[1] if ids else None,
            "pid": os.getpid(),
        }
        if not rest:
            return [here]
        return [here, *self.context.get(rest[0]).ask("relay", rest[1:])]


class Sleeper(arbor.Agent):
    """Holds its mailbox for a while, so that messages queue behind it."""

    def nap(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


class Lifecycle(arbor.Agent):
    """Records its lifecycle hooks in its state; one handler has a time limit."""

    def __init__(self) -> None:
        self.count = 0
        self.recoveries: list[str] = []
        self.stopped = False

    def on_recover(self, reason: str) -> None:
        self.recoveries.append(reason)

    def on_stop(self) -> None:
        self.stopped = True

    def add(self) -> int:
        self.count += 1
        return self.count

    def state(self) -> dict[str, Any]:
        return {"count": self.count, "recoveries": self.recoveries}

    @arbor.handler(timeout=1.0)
    def hang(self) -> None:
        # This change must be dropped with the timed-out message.
        self.count += 100
        time.sleep(120)


class SlowStopper(arbor.Agent):
    """Takes longer in on_stop than a stop waits."""

    def __init__(self) -> None:
        self.count = 0
        self.stopped = False

    def add(self) -> int:
        self.count += 1
        return self.count

    def on_stop(self) -> None:
        self.stopped = True
        time.sleep(60)


class BrokenRecovery(arbor.Agent):
    """Raises in on_recover; the agent must still come back."""

    def __init__(self) -> None:
        self.count = 0

    def on_recover(self, reason: str) -> None:
        raise RuntimeError(f"on_recover failed on purpose ({reason})")

    def add(self) -> int:
        self.count += 1
        return self.count


class Poison(arbor.Agent):
    """Misbehaves on request: raises, spins in Python past its limit, or awaits past it."""

    def __init__(self) -> None:
        self.count = 0

    def add(self) -> int:
        self.count += 1
        return self.count

    def get(self) -> int:
        return self.count

    def crash(self) -> None:
        raise RuntimeError("poisoned on purpose")

    @arbor.handler(timeout=1.0)
    def spin(self) -> None:
        # This change must be dropped with the timed-out message.
        self.count += 100
        while True:
            pass

    @arbor.handler(timeout=1.0)
    async def stall(self) -> None:
        self.count += 100
        await asyncio.sleep(3600)


class Peer(arbor.Agent):
    """Messages another agent from its handlers, synchronously and asynchronously."""

    def __init__(self) -> None:
        self.log: list[Any] = []

    def append(self, item: Any) -> int:
        self.log.append(item)
        return len(self.log)

    def items(self) -> list[Any]:
        return self.log

    def fan_out(self, target: str, count: int) -> None:
        # Durable sends wait in the outbox until this handler's checkpoint commits.
        ref = self.context.get(target)
        for index in range(count):
            ref.send("append", index)

    async def fan_out_async(self, target: str, first: int, count: int) -> int:
        ref = self.context.get(target)
        for index in range(first, first + count):
            await ref.ask_async("append", index)
        result: int = len(await ref.ask_async("items"))
        return result

    def ask_with_id(self, target: str, item: Any, message_id: str) -> int:
        result: int = self.context.get(target).ask("append", item, message_id=message_id)
        return result

    def share(self, target: str) -> list[Any]:
        """Send a list, then change it; the receiver must keep the list as sent."""
        sent = [1, 2]
        self.context.get(target).ask("append", sent)
        sent.append(3)
        result: list[Any] = self.context.get(target).ask("items")
        return result

    async def echo(self, value: Any) -> Any:
        return value

    async def nap(self, seconds: float) -> int:
        await asyncio.sleep(seconds)
        self.log.append("napped")
        return len(self.log)

    async def ask_nap(self, target: str, seconds: float, timeout: float) -> str:
        """Ask ``target`` to nap for ``seconds``; returns "replied", or the error's type name."""
        try:
            await self.context.get(target).ask_async("nap", seconds, timeout=timeout)
        except arbor.ArborError as error:
            return type(error).__name__
        return "replied"

    async def time_asks(self, target: str, count: int) -> list[float]:
        """Ask ``target`` to echo ``count`` times; returns each round trip in seconds."""
        ref = self.context.get(target)
        durations = []
        for index in range(count):
            started = time.perf_counter()
            await ref.ask_async("echo", index)
            durations.append(time.perf_counter() - started)
        return durations


class FragileStart(arbor.Agent):
    """Starts fresh, but its on_start fails in every incarnation after `arm`."""

    def __init__(self) -> None:
        self.armed = False

    def on_start(self) -> None:
        if self.armed:
            raise RuntimeError("on_start refused to start")

    def arm(self) -> None:
        self.armed = True

    def get(self) -> bool:
        return self.armed
