"""Delivery between agents of one host, in process and without Ray.

A process that runs a host installs a local router in `arbor.runtime.ref`, and an
`AgentRef` used inside a handler looks there first. For an agent of the same host, the
envelope goes straight into the receiver's mailbox, so it passes the same admission
(capability check, then deduplication) and keeps the order of posting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from arbor.errors import ArborError
from arbor.messages import Envelope, ErrorInfo, Reply
from arbor.runtime.ref import LocalRoute

if TYPE_CHECKING:
    from arbor.runtime.host import HostActor

logger = logging.getLogger(__name__)

# Values that need no copy when a message or reply stays in the process.
_IMMUTABLE = frozenset({str, int, float, bool, type(None), bytes})


class HostLocalRoute(LocalRoute):
    """Delivers to an agent of the same host through its mailbox, without Ray.

    The envelope goes through the same admission as one from Ray (capability check,
    deduplication, order), and mutable arguments and replies are copied, so the two
    agents never share an object. It posts with the host's private mailbox method and
    loop, which are not Ray methods, because a Ray actor exposes its public methods.
    """

    def __init__(self, host: HostActor, name: str) -> None:
        self._host = host
        self._name = name

    def ask(self, envelope: Envelope, timeout: float) -> Any:
        host = self._host
        if threading.get_ident() == host._loop_thread:
            raise ArborError(
                f"a blocking ask to agent {self._name!r} from the host's event loop would "
                "stall every agent of the host; use `await ref.ask_async(...)` in async handlers"
            )
        result: concurrent.futures.Future[Any] = concurrent.futures.Future()
        host._loop.call_soon_threadsafe(self._post_into, _detached(envelope), result)
        try:
            return _detached_reply(result.result(timeout))
        except concurrent.futures.TimeoutError:
            return _ask_timeout(envelope, self._name, timeout)

    async def ask_async(self, envelope: Envelope, timeout: float) -> Any:
        host = self._host
        loop = host._loop
        if threading.get_ident() != host._loop_thread:
            result: concurrent.futures.Future[Any] = concurrent.futures.Future()
            loop.call_soon_threadsafe(self._post_into, _detached(envelope), result)
            try:
                return _detached_reply(await asyncio.wait_for(asyncio.wrap_future(result), timeout))
            except asyncio.TimeoutError:
                return _ask_timeout(envelope, self._name, timeout)
        posted = self.post_ask(envelope, timeout)
        assert posted is not None
        future, unwatch = posted
        try:
            reply = await future
        finally:
            unwatch(future)
        return self.ask_outcome(envelope, timeout, reply)

    def post_ask(
        self, envelope: Envelope, timeout: float
    ) -> tuple[asyncio.Future[Any], Callable[[asyncio.Future[Any]], None]] | None:
        """Post an ask from the host's loop; returns its future and the function to end its timeout.

        The caller awaits the message's own future. The mailbox runs the message even
        when that future is done already, so neither a timeout nor the caller's
        cancellation takes back a message that was posted. None off the host's loop.
        """
        host = self._host
        if threading.get_ident() != host._loop_thread:
            return None
        future = host._post(self._name, _detached(envelope), None, True)
        host.local_deliveries += 1
        return future, host._ask_deadlines.watch(future, timeout)

    def ask_outcome(self, envelope: Envelope, timeout: float, reply: Reply | None) -> Reply:
        """Return the reply of a posted ask: a copy, or a timeout for None."""
        if reply is None:
            return _ask_timeout(envelope, self._name, timeout)
        return _detached_reply(reply)

    def send(self, envelope: Envelope) -> Any:
        host = self._host
        if threading.get_ident() == host._loop_thread:
            future = host._post(self._name, _detached(envelope))
            host.local_deliveries += 1
            future.add_done_callback(log_failure)
            return future
        result: concurrent.futures.Future[Any] = concurrent.futures.Future()
        host._loop.call_soon_threadsafe(self._post_into, _detached(envelope), result)
        result.add_done_callback(log_failure)
        return result

    def _post_into(self, envelope: Envelope, result: concurrent.futures.Future[Any]) -> None:
        future = self._host._post(self._name, envelope)
        self._host.local_deliveries += 1

        def copy_outcome(done: asyncio.Future[Any]) -> None:
            if done.cancelled():
                result.cancel()
            elif done.exception() is not None:
                result.set_exception(done.exception())  # type: ignore[arg-type]
            else:
                result.set_result(done.result())

        future.add_done_callback(copy_outcome)


class AskDeadlines:
    """Times out the ask calls posted on a host's loop, with one timer per window of deadlines.

    A timer for each call took about 1 µs of a 14 µs round trip between two agents of one
    host. So calls whose deadlines fall in the same window share one timer, and a call
    times out up to one window late.
    """

    WINDOW_S = 0.01

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # Pending futures by window number. Window n ends at n times WINDOW_S on the loop's clock.
        self._windows: dict[int, set[asyncio.Future[Any]]] = {}

    def watch(
        self, future: asyncio.Future[Any], timeout: float
    ) -> Callable[[asyncio.Future[Any]], None]:
        """Complete ``future`` with None after ``timeout`` seconds.

        Returns the function that ends the watch: call it with the future once the caller
        has the reply.
        """
        window = math.ceil((self._loop.time() + timeout) / self.WINDOW_S)
        pending = self._windows.get(window)
        if pending is None:
            pending = self._windows[window] = set()
            self._loop.call_at(window * self.WINDOW_S, self._expire, window)
        pending.add(future)
        return pending.discard

    def _expire(self, window: int) -> None:
        for future in self._windows.pop(window):
            _time_out(future)


def _time_out(future: asyncio.Future[Any]) -> None:
    """Complete an ask's future with None, which its caller takes as a timeout."""
    if not future.done():
        future.set_result(None)


def _detached(envelope: Envelope) -> Envelope:
    """Give the envelope arguments that the receiver does not share with the sender.

    The sender made the envelope for this one delivery and keeps no reference to it. So
    the receiver takes the envelope itself, and only mutable arguments are copied.
    """
    args = envelope.args
    for value in args:
        if type(value) not in _IMMUTABLE:
            envelope.args = tuple(copy.deepcopy(args))
            break
    kwargs = envelope.kwargs
    if kwargs:
        if all(type(value) in _IMMUTABLE for value in kwargs.values()):
            envelope.kwargs = dict(kwargs)
        else:
            envelope.kwargs = copy.deepcopy(kwargs)
    return envelope


def _detached_reply(reply: Reply) -> Reply:
    if type(reply.value) in _IMMUTABLE:
        return reply
    return Reply(
        reply.message_id,
        value=copy.deepcopy(reply.value),
        error=reply.error,
        exception=reply.exception,
        duplicate=reply.duplicate,
    )


def _ask_timeout(envelope: Envelope, name: str, timeout: float) -> Reply:
    return Reply(
        envelope.message_id,
        error=ErrorInfo(
            kind="timeout",  # type: ignore[arg-type]
            error_type="arbor.errors.AskTimeout",
            message=f"agent {name!r} handler {envelope.handler!r} did not reply within "
            f"{timeout} s; the message may still be applied, so retry with the same "
            "message_id to stay idempotent",
        ),
    )


def log_failure(future: asyncio.Future[Any]) -> None:
    if future.cancelled():
        return
    error = future.exception()
    if error is not None:
        logger.error("hosted agent operation failed: %s: %s", type(error).__name__, error)
