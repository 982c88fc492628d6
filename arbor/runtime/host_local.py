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
import functools
import logging
import threading
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
        if threading.get_ident() == host._loop_thread:
            future = host._post(self._name, _detached(envelope))
            host.local_deliveries += 1
        else:
            result: concurrent.futures.Future[Any] = concurrent.futures.Future()
            host._loop.call_soon_threadsafe(self._post_into, _detached(envelope), result)
            future = asyncio.wrap_future(result)
        # A timeout must not cancel the message itself, which may already run, so the
        # caller waits on a future of its own that the reply or the timer completes.
        waiter: asyncio.Future[asyncio.Future[Any] | None] = host._loop.create_future()
        future.add_done_callback(functools.partial(_complete, waiter))
        timer = host._loop.call_later(timeout, _complete, waiter, None)
        try:
            finished = await waiter
        finally:
            timer.cancel()
        if finished is None:
            return _ask_timeout(envelope, self._name, timeout)
        return _detached_reply(finished.result())

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


def _complete(waiter: asyncio.Future[Any], outcome: Any) -> None:
    if not waiter.done():
        waiter.set_result(outcome)


def _detached(envelope: Envelope) -> Envelope:
    """Return the envelope with arguments the receiver cannot share with the sender."""
    args, kwargs = envelope.args, envelope.kwargs
    if not all(type(value) in _IMMUTABLE for value in args):
        args = copy.deepcopy(args)
    if kwargs:
        if all(type(value) in _IMMUTABLE for value in kwargs.values()):
            kwargs = dict(kwargs)
        else:
            kwargs = copy.deepcopy(kwargs)
    return Envelope(
        envelope.handler,
        tuple(args),
        kwargs,
        envelope.kind,
        envelope.message_id,
        envelope.sender,
        envelope.sent_at,
        dict(envelope.headers),
    )


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
