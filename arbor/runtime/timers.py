"""In-memory timers of one agent incarnation.

A timer fires by sending the agent an ordinary message, so its handler runs in the
mailbox, one message at a time, like any other. Timers are not stored: they end with the
process of the incarnation that scheduled them, and with a stop.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from arbor.errors import InvalidArguments
from arbor.messages import Envelope

logger = logging.getLogger(__name__)


@dataclass
class _Timer:
    handler: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    every_s: float | None
    fired: int = 0
    # The reply of the last firing. A periodic timer skips a tick while it is pending.
    pending: Any = field(default=None, repr=False)


class Timers:
    """Schedules the timers of one agent and fires them from one daemon thread.

    Args:
        agent: the agent's name, for errors and logs.
        send: sends an envelope to the agent's own mailbox and returns a reference to the
            reply, or None.
        is_done: returns whether such a reply reference is ready.
        is_alive: returns False once the agent is stopped or fenced; no timer fires after.
    """

    def __init__(
        self,
        agent: str,
        send: Callable[[Envelope], Any],
        is_done: Callable[[Any], bool],
        is_alive: Callable[[], bool],
    ) -> None:
        self._agent = agent
        self._send = send
        self._is_done = is_done
        self._is_alive = is_alive
        self._timers: dict[str, _Timer] = {}
        # Entries are (fire at in monotonic seconds, seq, timer id).
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        # Message ids of timer firings start with this, unique to this incarnation.
        self._prefix = uuid.uuid4().hex[:12]

    def schedule(
        self,
        handler: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        delay: Any,
        every: Any,
    ) -> str:
        """Schedule ``handler(*args, **kwargs)``; returns the timer id.

        Raises:
            InvalidArguments: ``delay`` or ``every`` is invalid, or neither is given.
        """
        if delay is None and every is None:
            raise InvalidArguments(
                f"agent {self._agent!r} timer for {handler!r} has no time; pass delay= "
                "(seconds until it fires) and/or every= (its period in seconds)"
            )
        every_s = _seconds(self._agent, handler, "every", every, positive=True)
        delay_s = _seconds(self._agent, handler, "delay", delay, positive=False)
        if delay_s is None:
            assert every_s is not None
            delay_s = every_s
        timer_id = f"timer-{uuid.uuid4().hex[:12]}"
        with self._condition:
            if self._closed:
                raise InvalidArguments(
                    f"agent {self._agent!r} is stopped, so it cannot schedule timers"
                )
            self._timers[timer_id] = _Timer(handler, args, kwargs, every_s)
            heapq.heappush(self._heap, (time.monotonic() + delay_s, next(self._seq), timer_id))
            self._condition.notify()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"arbor-timers-{self._agent}", daemon=True
                )
                self._thread.start()
        logger.debug(
            "agent %s scheduled %s for %s in %.3f s, every %s s",
            self._agent,
            timer_id,
            handler,
            delay_s,
            every_s,
        )
        return timer_id

    def cancel(self, timer_id: str) -> bool:
        """Cancel a timer; returns whether it was scheduled. A firing already sent still runs."""
        with self._condition:
            return self._timers.pop(timer_id, None) is not None

    def active(self) -> list[str]:
        """Return the ids of the scheduled timers."""
        with self._condition:
            return list(self._timers)

    def close(self) -> None:
        """Cancel every timer and end the thread."""
        with self._condition:
            self._closed = True
            self._timers.clear()
            self._heap.clear()
            self._condition.notify()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._condition.wait(timeout)
                if self._closed:
                    return
                fire_at, _, timer_id = heapq.heappop(self._heap)
                timer = self._timers.get(timer_id)
                if timer is None:
                    continue
                if timer.every_s is None:
                    del self._timers[timer_id]
                else:
                    # Fixed rate. Ticks missed while the process was busy are skipped.
                    next_at = max(fire_at + timer.every_s, time.monotonic())
                    heapq.heappush(self._heap, (next_at, next(self._seq), timer_id))
            if not self._is_alive():
                self.close()
                return
            self._fire(timer_id, timer)

    def _fire(self, timer_id: str, timer: _Timer) -> None:
        if timer.pending is not None and not self._is_done(timer.pending):
            logger.debug(
                "agent %s timer %s skips a tick: its last firing is still waiting in the mailbox",
                self._agent,
                timer_id,
            )
            return
        timer.fired += 1
        envelope = Envelope(
            handler=timer.handler,
            args=timer.args,
            kwargs=timer.kwargs,
            kind="send",
            message_id=f"timer:{self._prefix}:{timer_id}:{timer.fired}",
        )
        try:
            timer.pending = self._send(envelope)
        except Exception as error:
            logger.warning(
                "agent %s timer %s could not send %s: %s: %s",
                self._agent,
                timer_id,
                timer.handler,
                type(error).__name__,
                error,
            )


def _seconds(agent: str, handler: str, name: str, value: Any, positive: bool) -> float | None:
    if value is None:
        return None
    invalid = (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (positive and value == 0)
    )
    if invalid:
        bound = "> 0" if positive else ">= 0"
        raise InvalidArguments(
            f"agent {agent!r} timer for {handler!r}: {name}={value!r} is invalid; pass a "
            f"number of seconds {bound}"
        )
    return float(value)
