"""The registry's topic service: subscriptions, client polls and the delivery pump.

Publishers append events to the topic's log in the store themselves and then notify the
registry, so a publish never waits for a subscriber. The registry runs one pump task per
agent subscription. A pump sends its subscriber the events after its position, one at a
time and in log order, each as an ordinary message ``handler(topic, event)`` with no
sender and the message id ``topic:<topic>:<seq>``. It waits for each reply before the
next send, so a crash of the subscriber cannot reorder deliveries. An event whose
delivery failed for a transient reason is sent again with the same id, and the agent's
deduplication drops the copy it already applied.

A pump that finds its subscriber more than ``max_lag`` events behind the head skips the
oldest events, so that ``max_lag`` remain, and counts them. A slow subscriber therefore
holds up only its own pump, and the log keeps about ``max_lag`` events per topic.

Client iterators have no pump: they call `TopicService.poll`, which waits for new events
and returns them, applying the same overflow rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from arbor.config import Settings
from arbor.errors import AgentNotFound, InvalidArguments
from arbor.observability import metrics
from arbor.persistence import STOPPED, CheckpointStore
from arbor.persistence.topics import (
    AGENT_SUBSCRIPTION,
    CLIENT_SUBSCRIPTION,
    SubscriptionRecord,
)
from arbor.registry.topic_delivery import RETRY_DELAY_S, Delivery
from arbor.registry.topic_spec import (
    CLIENT_PREFIX,
    SubscriptionInfo,
    TopicEvent,
    validate_max_lag,
    validate_topic,
)
from arbor.runtime import telemetry

logger = logging.getLogger(__name__)

# Seconds between reads of every topic's head. Publishers notify the registry at once;
# this read finds events whose notice was lost, such as one sent to a restarting registry.
HEAD_POLL_S = 1.0

# Seconds a pump sleeps while the registry does not hold the cluster lease.
INACTIVE_POLL_S = 1.0

# Events one pump reads from the store per query.
READ_BATCH = 100

# A pump records its position after this many deliveries or this many seconds, whichever
# comes first. A registry restart sends the unrecorded deliveries again, and the agent drops
# them by message id, so SAVE_EVERY must stay well below ARBOR_DEDUP_WINDOW (256 by default).
SAVE_EVERY = 32
SAVE_INTERVAL_S = 1.0

# Seconds between trims of the topic logs and between full re-reads of the subscriptions.
TRIM_INTERVAL_S = 5.0
RESYNC_S = 30.0

# Seconds after its last poll that a client subscription is deleted: its process is gone.
CLIENT_IDLE_S = 300.0

# The maximum wait of one client poll, in seconds, and the maximum events it returns.
MAX_POLL_WAIT_S = 30.0
MAX_POLL_EVENTS = 1000

_Key = tuple[str, str]


@dataclass
class _Pump:
    """The delivery state of one agent subscription."""

    record: SubscriptionRecord
    position: int
    delivered: int = 0
    skipped: int = 0
    saved_at: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None


@dataclass
class _Client:
    """The poll state of one client subscription."""

    record: SubscriptionRecord
    position: int
    last_seen: float = field(default_factory=time.monotonic)
    returned: list[int] = field(default_factory=list)


class TopicService:
    """Stores subscriptions, serves client polls, and delivers events to subscribed agents.

    Args:
        store: the checkpoint store with the topic tables.
        settings: the registry's settings.
        guard: the registry's capability guard, which checks subscribe requests.
        is_active: returns False while another Ray cluster's registry holds the cluster
            lease; this one then delivers nothing to agents.
    """

    def __init__(
        self,
        store: CheckpointStore,
        settings: Settings,
        guard: Any,
        is_active: Callable[[], bool] | None = None,
    ) -> None:
        self._store: Any = store
        self._settings = settings
        self._guard = guard
        self._is_active = is_active or (lambda: True)
        self._pumps: dict[_Key, _Pump] = {}
        self._clients: dict[_Key, _Client] = {}
        self._heads: dict[str, int] = {}
        self._trimmed_heads: dict[str, int] = {}
        # One event per topic with waiters; a new event sets it and removes it.
        self._signals: dict[str, asyncio.Event] = {}
        self._delivery = Delivery(store, settings, guard)
        self._requests: dict[str, Callable[..., Any]] = {
            "subscribe": self.subscribe,
            "unsubscribe": self.unsubscribe,
            "list": self.list,
            "published": self.published,
            "open": self.open_client,
            "poll": self.poll,
            "close": self.close_client,
        }

    async def request(self, operation: str, *args: Any) -> Any:
        """Run one topic request by name, for the registry's single ``topic`` method."""
        method = self._requests.get(operation)
        if method is None:
            raise InvalidArguments(
                f"unknown topic request {operation!r}; requests: {', '.join(self._requests)}"
            )
        return await method(*args)

    async def subscribe(
        self,
        topic: str,
        subscriber: str,
        handler: str,
        max_lag: int | None,
        token: str | None,
    ) -> SubscriptionInfo:
        """Subscribe an agent's ``handler`` to ``topic`` from the next event published.

        Raises:
            CapabilityDenied: capabilities are enforced and ``token`` does not grant
                ``arbor://topic/subscribe/<topic>`` to the agent.
            AgentNotFound: the agent does not exist or is stopped.
        """
        validate_topic(topic)
        lag = validate_max_lag(max_lag, self._settings.topic_max_lag)
        if self._settings.enforce_capabilities:
            await asyncio.to_thread(
                self._guard.require, token, subscriber, f"arbor://topic/subscribe/{topic}"
            )
        agent = await asyncio.to_thread(self._store.get_agent, subscriber)
        if agent is None or agent.status == STOPPED:
            raise AgentNotFound(subscriber, "a stopped or unknown agent cannot subscribe")
        record = await asyncio.to_thread(
            self._store.save_subscription, topic, subscriber, AGENT_SUBSCRIPTION, handler, lag
        )
        self._start_pump(record)
        logger.info(
            "agent %s subscribed %s to topic %s from seq %d",
            subscriber,
            handler,
            topic,
            record.position,
        )
        return SubscriptionInfo.from_record(record)

    async def unsubscribe(self, topic: str, subscriber: str) -> bool:
        """Delete an agent's subscription; returns whether it existed.

        A delivery already sent when the request arrives still reaches the agent.
        """
        deleted: bool = await asyncio.to_thread(self._store.delete_subscription, topic, subscriber)
        self._stop_pump((topic, subscriber))
        if deleted:
            logger.info("agent %s unsubscribed from topic %s", subscriber, topic)
        return deleted

    async def list(
        self, topic: str | None, subscriber: str | None, namespace: str | None = None
    ) -> list[SubscriptionInfo]:
        """Return the subscriptions to ``topic`` and of ``subscriber`` (None: any).

        ``namespace`` keeps the subscriptions to that namespace's topics; None keeps all.
        """
        records = await asyncio.to_thread(
            self._store.list_subscriptions, topic, subscriber, namespace
        )
        return [SubscriptionInfo.from_record(record) for record in records]

    async def published(self, topic: str, seq: int) -> None:
        """Wake the pumps and polls of ``topic`` after a publisher appended event ``seq``."""
        self._advance_head(topic, seq)

    async def open_client(self, topic: str, max_lag: int | None) -> SubscriptionInfo:
        """Create a client subscription to ``topic`` from the next event published."""
        validate_topic(topic)
        lag = validate_max_lag(max_lag, self._settings.topic_max_lag)
        subscriber = f"{CLIENT_PREFIX}{uuid.uuid4().hex[:16]}"
        record = await asyncio.to_thread(
            self._store.save_subscription, topic, subscriber, CLIENT_SUBSCRIPTION, None, lag
        )
        self._clients[(topic, subscriber)] = _Client(record, record.position)
        return SubscriptionInfo.from_record(record)

    async def poll(
        self, topic: str, subscriber: str, after: int, limit: int, wait_s: float
    ) -> tuple[list[TopicEvent], int] | None:
        """Return a client's events after ``after``, waiting up to ``wait_s`` for one.

        ``after`` is the seq of the last event the client consumed, and is recorded as its
        position. Returns the events and the number skipped before them by the overflow
        policy, or None when the subscription is closed or expired.
        """
        key = (topic, subscriber)
        client = await self._client(key)
        if client is None:
            return None
        client.last_seen = time.monotonic()
        await self._acknowledge(key, client, after)
        deadline = time.monotonic() + min(max(wait_s, 0.0), MAX_POLL_WAIT_S)
        while self._heads.get(topic, 0) <= client.position:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or key not in self._clients:
                return [], 0
            await self._wait(topic, remaining)

        head = self._heads[topic]
        start = max(client.position, head - client.record.max_lag)
        records = await asyncio.to_thread(
            self._store.read_topic_events, topic, start, min(max(limit, 1), MAX_POLL_EVENTS)
        )
        first = records[0].seq - 1 if records else head
        skipped = max(first - client.position, 0)
        if skipped:
            await asyncio.to_thread(
                self._store.advance_subscription, topic, subscriber, first, 0, skipped
            )
            client.position = first
            telemetry.record(metrics.record_topic_skipped, "client", skipped)
        client.returned = [record.seq for record in records]
        return [TopicEvent.from_record(record) for record in records], skipped

    async def close_client(self, topic: str, subscriber: str) -> bool:
        """Delete a client subscription; returns whether it existed."""
        client = self._clients.pop((topic, subscriber), None)
        if client is not None:
            self._signal(topic)
        deleted: bool = await asyncio.to_thread(self._store.delete_subscription, topic, subscriber)
        return deleted

    async def forget_agent(self, agent: str) -> int:
        """Delete every subscription of a stopped or deleted agent; returns how many."""
        count: int = await asyncio.to_thread(self._store.delete_subscriptions, agent)
        for key in [key for key in self._pumps if key[1] == agent]:
            self._stop_pump(key)
        self._delivery.forget(agent)
        if count:
            logger.info("deleted %d topic subscriptions of stopped agent %s", count, agent)
        return count

    async def run_forever(self) -> None:
        """Read subscriptions and heads, trim logs and expire idle clients until cancelled."""
        next_resync = 0.0
        next_trim = time.monotonic() + TRIM_INTERVAL_S
        while True:
            try:
                if time.monotonic() >= next_resync:
                    await self._resync()
                    next_resync = time.monotonic() + RESYNC_S
                heads = await asyncio.to_thread(self._store.topic_heads)
                for topic, head in heads.items():
                    self._advance_head(topic, head)
                if time.monotonic() >= next_trim:
                    await self._trim()
                    await self._expire_clients()
                    next_trim = time.monotonic() + TRIM_INTERVAL_S
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("topic loop failed; trying again in %.1f s", HEAD_POLL_S)
            await asyncio.sleep(HEAD_POLL_S)

    # --- agent pumps ----------------------------------------------------------------------

    def _start_pump(self, record: SubscriptionRecord) -> None:
        key = (record.topic, record.subscriber)
        pump = self._pumps.get(key)
        if pump is not None:
            pump.record = record
            return
        pump = _Pump(record, record.position)
        self._pumps[key] = pump
        pump.task = asyncio.get_running_loop().create_task(self._pump(key, pump))

    def _stop_pump(self, key: _Key) -> None:
        pump = self._pumps.pop(key, None)
        if pump is not None and pump.task is not None:
            pump.task.cancel()

    async def _pump(self, key: _Key, pump: _Pump) -> None:
        """Deliver the events of one subscription in order until it is removed."""
        topic = key[0]
        while self._pumps.get(key) is pump:
            try:
                if not self._is_active():
                    await asyncio.sleep(INACTIVE_POLL_S)
                    continue
                if pump.position >= self._heads.get(topic, 0):
                    await self._save(key, pump)
                    # Checked again because an event may have come during the save.
                    if pump.position >= self._heads.get(topic, 0):
                        await self._wait(topic, HEAD_POLL_S)
                    continue
                await self._pump_batch(key, pump)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception(
                    "delivery of topic %s to agent %s failed; trying again in %.1f s",
                    topic,
                    key[1],
                    RETRY_DELAY_S,
                )
                await asyncio.sleep(RETRY_DELAY_S)

    async def _pump_batch(self, key: _Key, pump: _Pump) -> None:
        """Read the next events after the pump's position and deliver them one by one."""
        topic = key[0]
        self._skip_overflow(pump)
        records = await asyncio.to_thread(
            self._store.read_topic_events, topic, pump.position, READ_BATCH
        )
        if not records:
            # Trimmed meanwhile by another registry, which saw the subscriber too far behind.
            self._skip_to(pump, self._heads.get(topic, 0))
            return
        self._skip_to(pump, records[0].seq - 1)
        for record in records:
            self._advance_head(topic, record.seq)
            self._skip_overflow(pump)
            if record.seq <= pump.position:
                continue
            if not await self._deliver(key, pump, record.seq, json.loads(record.event_json)):
                return
            pump.position = record.seq
            pump.delivered += 1
            elapsed = time.monotonic() - pump.saved_at
            if pump.delivered >= SAVE_EVERY or elapsed >= SAVE_INTERVAL_S:
                await self._save(key, pump)

    def _skip_overflow(self, pump: _Pump) -> None:
        """Skip the oldest events when the subscriber is more than ``max_lag`` behind."""
        floor = self._heads.get(pump.record.topic, 0) - pump.record.max_lag
        if pump.position < floor:
            self._skip_to(pump, floor)

    def _skip_to(self, pump: _Pump, position: int) -> None:
        skipped = position - pump.position
        if skipped <= 0:
            return
        logger.warning(
            "agent %s fell more than %d events behind on topic %s; skipped %d events "
            "(seq %d to %d)",
            pump.record.subscriber,
            pump.record.max_lag,
            pump.record.topic,
            skipped,
            pump.position + 1,
            position,
        )
        pump.position = position
        pump.skipped += skipped
        agent_type = self._delivery.agent_type(pump.record.subscriber)
        telemetry.record(metrics.record_topic_skipped, agent_type, skipped)

    async def _save(self, key: _Key, pump: _Pump) -> None:
        """Record the pump's position and counts in the store."""
        if pump.delivered == 0 and pump.skipped == 0:
            pump.saved_at = time.monotonic()
            return
        delivered, skipped = pump.delivered, pump.skipped
        await asyncio.to_thread(
            self._store.advance_subscription, key[0], key[1], pump.position, delivered, skipped
        )
        pump.delivered -= delivered
        pump.skipped -= skipped
        pump.saved_at = time.monotonic()

    async def _deliver(self, key: _Key, pump: _Pump, seq: int, event: Any) -> bool:
        """Send one event until the agent has handled it; False when the pump must stop."""
        while self._pumps.get(key) is pump:
            if not self._is_active():
                await asyncio.sleep(INACTIVE_POLL_S)
                continue
            outcome = await self._delivery.send(pump.record, seq, event)
            if outcome in ("ok", "error"):
                return True
            if outcome == "gone":
                await self.forget_agent(key[1])
                return False
            if outcome == "denied":
                await asyncio.to_thread(self._store.delete_subscription, *key)
                self._stop_pump(key)
                return False
            await asyncio.sleep(RETRY_DELAY_S)
        return False

    # --- clients, heads and maintenance ---------------------------------------------------

    async def _client(self, key: _Key) -> _Client | None:
        client = self._clients.get(key)
        if client is not None:
            return client
        # Known to the store but not to this incarnation: the registry restarted.
        records = await asyncio.to_thread(self._store.list_subscriptions, key[0], key[1])
        if not records or records[0].kind != CLIENT_SUBSCRIPTION:
            return None
        client = _Client(records[0], records[0].position)
        self._clients[key] = client
        return client

    async def _acknowledge(self, key: _Key, client: _Client, after: int) -> None:
        """Record that the client consumed the events up to ``after``."""
        if after <= client.position:
            return
        delivered = sum(1 for seq in client.returned if client.position < seq <= after)
        await asyncio.to_thread(
            self._store.advance_subscription, key[0], key[1], after, delivered, 0
        )
        client.position = after
        telemetry.record(metrics.record_topic_delivery, "client", "ok", delivered)

    def _advance_head(self, topic: str, seq: int) -> None:
        if seq > self._heads.get(topic, 0):
            self._heads[topic] = seq
            self._signal(topic)

    def _signal(self, topic: str) -> None:
        signal = self._signals.pop(topic, None)
        if signal is not None:
            signal.set()

    async def _wait(self, topic: str, timeout: float) -> None:
        signal = self._signals.setdefault(topic, asyncio.Event())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(signal.wait(), timeout)

    async def _resync(self) -> None:
        """Match the pumps and clients to the subscription table."""
        records = await asyncio.to_thread(self._store.list_subscriptions)
        stored = {(record.topic, record.subscriber): record for record in records}
        for key, record in stored.items():
            if record.kind == AGENT_SUBSCRIPTION:
                self._start_pump(record)
            elif key not in self._clients:
                self._clients[key] = _Client(record, record.position)
        for key in [key for key in self._pumps if key not in stored]:
            self._stop_pump(key)
        for key in [key for key in self._clients if key not in stored]:
            del self._clients[key]
        logger.debug("topic service read %d subscriptions from the store", len(records))

    async def _trim(self) -> None:
        """Delete log events that every subscription has passed or will skip."""
        for topic, head in list(self._heads.items()):
            if self._trimmed_heads.get(topic) == head:
                continue
            trimmed, emptied = await asyncio.to_thread(self._store.trim_topic, topic)
            if emptied:
                # Nothing is left to trim until the next event.
                self._trimmed_heads[topic] = head
            if trimmed:
                logger.debug("trimmed %d events of topic %s", trimmed, topic)

    async def _expire_clients(self) -> None:
        cutoff = time.monotonic() - CLIENT_IDLE_S
        for key, client in list(self._clients.items()):
            if client.last_seen < cutoff:
                logger.info(
                    "client subscription %s to topic %s was not polled for %.0f s; deleting it",
                    key[1],
                    key[0],
                    CLIENT_IDLE_S,
                )
                await self.close_client(*key)
