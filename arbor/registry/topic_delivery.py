"""Sending one topic event to a subscribed agent, for the registry's topic service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import ray
from ray.exceptions import ActorUnschedulableError, RayActorError

from arbor.config import NAMESPACE, Settings
from arbor.messages import Envelope, Reply
from arbor.observability import metrics
from arbor.persistence import FAILED, STOPPED, CheckpointStore
from arbor.persistence.topics import SubscriptionRecord
from arbor.registry.info import actor_name, agent_route
from arbor.runtime import telemetry
from arbor.runtime.guard import Wallet

logger = logging.getLogger(__name__)

# Seconds a caller waits before it sends an event again after ``retry``; logged with it.
RETRY_DELAY_S = 1.0


class Delivery:
    """Sends events to agents as messages, and classifies their replies.

    Each event is the message ``handler(topic, event)`` with no sender and the message id
    ``topic:<topic>:<seq>``, so the agent's deduplication drops a copy it already applied.

    Args:
        store: the checkpoint store, for agent records and capabilities.
        settings: the registry's settings.
        guard: the registry's capability guard.
    """

    def __init__(self, store: CheckpointStore, settings: Settings, guard: Any) -> None:
        self._store: Any = store
        self._settings = settings
        self._guard = guard
        # Actor handle and agent type label per subscribed agent.
        self._targets: dict[str, tuple[Any, str]] = {}
        # The capabilities of each subscribed agent, to stop deliveries once it loses its right.
        self._wallets: dict[str, Wallet] = {}
        # Until when each subscription's capability counts as checked, in monotonic seconds.
        self._checked_until: dict[tuple[str, str], float] = {}
        # Delivery errors already logged, so a failing handler logs once per kind.
        self._logged: set[tuple[str, str, str]] = set()

    def agent_type(self, agent: str) -> str:
        """Return the agent's type label for metrics, or ``unknown`` before its first delivery."""
        target = self._targets.get(agent)
        return target[1] if target is not None else "unknown"

    def forget(self, agent: str) -> None:
        """Drop what is cached about a stopped or deleted agent."""
        self._targets.pop(agent, None)
        self._wallets.pop(agent, None)
        for key in [key for key in self._checked_until if key[1] == agent]:
            del self._checked_until[key]

    async def _allowed(self, record: SubscriptionRecord) -> bool:
        """Return whether the subscriber still has a live subscribe capability.

        The check runs at most once per ``ARBOR_REVOCATION_POLL_S`` per subscription, the
        interval at which the registry's guard learns of revocations, so a revoked or
        expired capability stops deliveries within about twice that. A denial is audited.
        """
        if not self._settings.enforce_capabilities:
            return True
        key = (record.topic, record.subscriber)
        if time.monotonic() < self._checked_until.get(key, 0.0):
            return True
        uri = f"arbor://topic/subscribe/{record.topic}"
        wallet = self._wallets.get(record.subscriber)
        if wallet is None:
            wallet = await asyncio.to_thread(Wallet, record.subscriber, self._guard)
            self._wallets[record.subscriber] = wallet
        if await asyncio.to_thread(wallet.token_for, uri) is not None:
            self._checked_until[key] = time.monotonic() + self._settings.revocation_poll_s
            return True
        self._checked_until.pop(key, None)
        await asyncio.to_thread(self._guard.check, None, record.subscriber, uri)
        logger.warning(
            "agent %s has no live capability for %s (revoked or expired), so its "
            "subscription to topic %s is deleted",
            record.subscriber,
            uri,
            record.topic,
        )
        return False

    async def send(self, record: SubscriptionRecord, seq: int, event: Any) -> str:
        """Deliver one event once.

        Returns:
            ``ok`` when the agent handled the event, and ``error`` when its handler raised,
            is missing or rejected the arguments. ``retry`` means the event must be sent
            again, ``gone`` that the agent is stopped or deleted, and ``denied`` that it
            lost its subscribe capability.
        """
        if not await self._allowed(record):
            return "denied"
        target = await self._target(record.subscriber)
        if target is None:
            return "gone"
        if target == "retry":
            return "retry"
        handle, agent_type = target
        envelope = Envelope(
            handler=record.handler or "",
            args=(record.topic, event),
            kind="send",
            message_id=f"topic:{record.topic}:{seq}",
        )
        try:
            reply = await asyncio.wait_for(
                handle.handle.remote(envelope.to_wire()), self._settings.ask_timeout_s
            )
        except (RayActorError, ActorUnschedulableError) as error:
            logger.info(
                "topic %s seq %d to agent %s: the actor is gone (%s); trying again in %.1f s",
                record.topic,
                seq,
                record.subscriber,
                type(error).__name__,
                RETRY_DELAY_S,
            )
            self._targets.pop(record.subscriber, None)
            return "retry"
        except asyncio.TimeoutError:
            logger.warning(
                "topic %s seq %d to agent %s got no reply within %.1f s; sending it again "
                "with the same message id",
                record.topic,
                seq,
                record.subscriber,
                self._settings.ask_timeout_s,
            )
            return "retry"
        outcome = self._outcome(record, reply)
        if outcome in ("ok", "error"):
            telemetry.record(metrics.record_topic_delivery, agent_type, outcome)
        return outcome

    def _outcome(self, record: SubscriptionRecord, reply: Any) -> str:
        """Classify the agent's reply: its handler ran (or cannot run), or try again."""
        if not isinstance(reply, Reply) or reply.error is None:
            return "ok"
        error = reply.error
        if error.kind in ("store", "conflict"):
            return "retry"
        if error.kind == "stopped":
            # A stopping agent: the next attempt reads its record and drops the subscription.
            self._targets.pop(record.subscriber, None)
            return "retry"
        logged = (record.topic, record.subscriber, error.kind)
        if logged not in self._logged:
            self._logged.add(logged)
            logger.warning(
                "agent %s handler %s failed on an event of topic %s (%s: %s); the event "
                "counts as delivered, and later failures of this kind are not logged",
                record.subscriber,
                record.handler,
                record.topic,
                error.kind,
                error.message,
            )
        return "error"

    async def _target(self, agent: str) -> tuple[Any, str] | str | None:
        """Return the agent's actor handle and type label, None if stopped, or ``retry``."""
        cached = self._targets.get(agent)
        if cached is not None:
            return cached
        record = await asyncio.to_thread(self._store.get_agent, agent)
        if record is None or record.status == STOPPED:
            return None
        handle = None
        if record.status != FAILED:
            with contextlib.suppress(ValueError):
                handle = await asyncio.to_thread(ray.get_actor, actor_name(record), NAMESPACE)
                handle = agent_route(record, handle)
        if handle is None:
            # Not running yet: the reconciler is recreating it, or its recreation failed.
            return "retry"
        target = (handle, record.type_path.rsplit(":", 1)[-1])
        self._targets[agent] = target
        return target
