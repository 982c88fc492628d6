"""Topics for clients: `publish`, `subscribe` and `subscriptions`, acting as the operator."""

from __future__ import annotations

import threading
import time
from collections import deque
from types import TracebackType
from typing import Any

from ray.exceptions import RayTaskError

from arbor.client import _call, _namespace_filter, _registry, current_namespace
from arbor.config import get_settings
from arbor.errors import ArborError, InvalidArguments, InvalidTopicName
from arbor.messages import new_message_id
from arbor.names import qualify, qualify_principal
from arbor.persistence import CheckpointStore, open_store
from arbor.registry.topic_spec import SubscriptionInfo, TopicEvent, validate_max_lag, validate_topic
from arbor.runtime.topics import append_event

# Seconds one poll waits in the registry for an event. Closing a subscription wakes the
# poll at once, so the length only sets how often an idle client calls the registry.
POLL_WAIT_S = 5.0

# Events fetched per poll; the iterator hands them out one at a time.
POLL_BATCH = 100

# Seconds added to a poll's wait for the registry call's own timeout.
_CALL_MARGIN_S = 30.0

_stores: dict[str, CheckpointStore] = {}
_stores_lock = threading.Lock()


def publish(topic: str, event: Any) -> int:
    """Publish a JSON ``event`` to ``topic`` as the operator; returns its seq in the topic.

    The event is stored when this returns; the registry then delivers it to every
    subscriber, in the order published. Subscribers that subscribed later do not get it.

    Raises:
        InvalidTopicName: the topic name is invalid.
        InvalidArguments: the event is not JSON or is larger than 256 KiB.

    Example:
        >>> arbor.publish("orders/eu", {"id": 7, "total": 12.5})
        1
    """
    topic = validate_topic(_full_topic(topic))
    _registry()
    return append_event(_store(), topic, event, new_message_id(), None)


def subscribe(topic: str, *, max_lag: int | None = None) -> Subscription:
    """Subscribe this client to ``topic`` from the next event published.

    Args:
        topic: the topic name.
        max_lag: events the client may fall behind before the oldest are skipped;
            default ``ARBOR_TOPIC_MAX_LAG``.

    Returns:
        A `Subscription` to iterate over with ``for`` or ``async for``. Close it, or use
        it as a context manager, to stop. A subscription not polled for 5 minutes is
        deleted.

    Raises:
        InvalidTopicName: the topic name is invalid.
        InvalidArguments: ``max_lag`` is not a positive integer.

    Example:
        >>> with arbor.subscribe("orders/eu") as orders:
        ...     for event in orders:
        ...         print(event.seq, event.data)
    """
    topic = validate_topic(_full_topic(topic))
    validate_max_lag(max_lag, get_settings().topic_max_lag)
    registry = _registry()
    info: SubscriptionInfo = _call(registry.topic.remote("open", topic, max_lag), _CALL_MARGIN_S)
    return Subscription(info, registry)


def subscriptions(
    topic: str | None = None, subscriber: str | None = None, *, namespace: str | None = None
) -> list[SubscriptionInfo]:
    """Return the subscriptions to ``topic`` and of ``subscriber`` (any when None).

    Each shows its position and how many events it was delivered and skipped. Without a
    topic, only topics of ``namespace`` count: default `current_namespace`, ``"*"`` for
    every namespace.
    """
    wanted = _namespace_filter(namespace) if topic is None else None
    if topic is not None:
        topic = _full_topic(topic)
    if subscriber is not None:
        subscriber = qualify_principal(subscriber, current_namespace())
    result: list[SubscriptionInfo] = _call(
        _registry().topic.remote("list", topic, subscriber, wanted), _CALL_MARGIN_S
    )
    return result


class Subscription:
    """A client's subscription to one topic; iterating yields each `TopicEvent` in order.

    Iteration blocks until the next event arrives and ends when the subscription is
    closed, from any thread. ``skipped`` counts the events this client never received
    because it fell more than ``max_lag`` behind.
    """

    def __init__(self, info: SubscriptionInfo, registry: Any) -> None:
        self.topic = info.topic
        self.id = info.subscriber
        self.skipped = 0
        self._registry = registry
        self._after = info.position
        self._events: deque[TopicEvent] = deque()
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether the subscription is closed; a closed one yields no more events."""
        return self._closed

    def poll(self, timeout: float | None = None) -> TopicEvent | None:
        """Return the next event, waiting up to ``timeout`` seconds (None: until one comes).

        Returns:
            The event, or None after ``timeout`` or once the subscription is closed.

        Raises:
            InvalidArguments: ``timeout`` is negative or not a number.
        """
        _check_poll_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._events:
            if self._closed:
                return None
            wait_s = POLL_WAIT_S if deadline is None else deadline - time.monotonic()
            if wait_s <= 0:
                return None
            request = self._poll_request(min(wait_s, POLL_WAIT_S))
            self._take(_call(request, min(wait_s, POLL_WAIT_S) + _CALL_MARGIN_S))
        return self._next()

    async def poll_async(self, timeout: float | None = None) -> TopicEvent | None:
        """Like `poll`, for async code: the wait does not block the event loop."""
        _check_poll_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._events:
            if self._closed:
                return None
            wait_s = POLL_WAIT_S if deadline is None else deadline - time.monotonic()
            if wait_s <= 0:
                return None
            try:
                result = await self._poll_request(min(wait_s, POLL_WAIT_S))
            except RayTaskError as error:
                cause = getattr(error, "cause", None)
                if isinstance(cause, ArborError):
                    raise cause from None
                raise
            self._take(result)
        return self._next()

    def close(self) -> None:
        """Delete the subscription; iteration ends, in this thread or another one."""
        if self._closed:
            return
        self._closed = True
        _call(self._registry.topic.remote("close", self.topic, self.id), _CALL_MARGIN_S)

    async def aclose(self) -> None:
        """Like `close`, for async code."""
        if self._closed:
            return
        self._closed = True
        await self._registry.topic.remote("close", self.topic, self.id)

    def __iter__(self) -> Subscription:
        return self

    def __next__(self) -> TopicEvent:
        event = self.poll()
        if event is None:
            raise StopIteration
        return event

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> TopicEvent:
        event = await self.poll_async()
        if event is None:
            raise StopAsyncIteration
        return event

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"Subscription(topic={self.topic!r}, id={self.id!r}, closed={self._closed})"

    def _poll_request(self, wait_s: float) -> Any:
        return self._registry.topic.remote(
            "poll", self.topic, self.id, self._after, POLL_BATCH, wait_s
        )

    def _take(self, result: tuple[list[TopicEvent], int] | None) -> None:
        if result is None:
            # Deleted by close() in another thread, or expired after idling.
            self._closed = True
            return
        events, skipped = result
        self.skipped += skipped
        self._events.extend(events)

    def _next(self) -> TopicEvent:
        event = self._events.popleft()
        # Acknowledged with the next poll, so an event is consumed before it is recorded.
        self._after = event.seq
        return event


def _store() -> CheckpointStore:
    """Return this process's store for publishing, opened at the first publish.

    A store opened for another database (after `arbor.init` with a new URL) is closed,
    so that its connections do not stay open for the rest of the process.
    """
    url = get_settings().database_url
    with _stores_lock:
        store = _stores.get(url)
        if store is None:
            for stale in _stores.values():
                stale.close()
            _stores.clear()
            store = open_store(url, get_settings())
            _stores[url] = store
        return store


def _full_topic(topic: str) -> str:
    """Return the full name of a topic named in `current_namespace`."""
    return qualify(topic, current_namespace(), InvalidTopicName)


def _check_poll_timeout(timeout: object) -> None:
    """Reject a poll timeout that is not None or a number of seconds of 0 or more."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0:
        raise InvalidArguments(
            f"timeout={timeout!r} is invalid; pass seconds of 0 or more, or None to wait "
            "until an event comes"
        )
