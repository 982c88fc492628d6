"""The registry's reminder loop: it keeps every reminder in a heap and delivers the due ones.

The store is the source of truth. The loop reads the whole reminder table at start and
every ``ARBOR_REMINDER_RESYNC_S``, and the registry's set and cancel calls update the
heap at once, so the database is read once per resync, not once per reminder.

A delivery is an ordinary message to the agent's ``on_reminder(name, payload)`` handler,
sent as the operator (no sender), with the message id ``reminder:<id>:<due ms>``. The row
moves to its next firing, or a one-shot row is deleted, only after the agent replied. A
registry that crashes between the reply and that write sends the same message id again,
and the agent's deduplication returns the recorded reply without running the handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import ray
from ray.exceptions import ActorUnschedulableError, RayActorError

from arbor.config import NAMESPACE, Settings
from arbor.errors import AgentNotFound
from arbor.messages import Envelope, Reply
from arbor.observability import metrics
from arbor.persistence import FAILED, STOPPED, CheckpointStore
from arbor.persistence.reminders import ReminderRecord
from arbor.registry.info import actor_name, agent_route
from arbor.registry.reminder_spec import (
    REMINDER_HANDLER,
    ReminderInfo,
    ReminderRequest,
    check_owner,
    next_due_ms,
)
from arbor.runtime import telemetry

logger = logging.getLogger(__name__)

# Seconds before a delivery that found no running actor, or failed to commit, is tried
# again. The reconciler recreates a missing actor within about one of its passes.
RETRY_DELAY_S = 1.0

# Deliveries that wait for a reply at once. More would only queue in the agents'
# mailboxes, and fewer would let a few slow agents delay every other reminder.
MAX_CONCURRENT_DELIVERIES = 256

# Seconds the loop sleeps at most while the registry does not hold the cluster lease,
# before it checks again.
INACTIVE_POLL_S = 1.0

_Key = tuple[str, str]


class ReminderService:
    """Stores, lists, cancels and fires the reminders of every agent.

    Args:
        store: the checkpoint store with the reminder table.
        settings: the registry's settings.
        is_active: returns False while another Ray cluster's registry should fire the
            reminders (it holds the cluster lease); this one then fires none.
    """

    def __init__(
        self,
        store: CheckpointStore,
        settings: Settings,
        is_active: Callable[[], bool] | None = None,
    ) -> None:
        self._store: Any = store
        self._settings = settings
        self._is_active = is_active or (lambda: True)
        self._reminders: dict[_Key, ReminderRecord] = {}
        # Entries are (fire at ms, seq, key), current only while _scheduled[key] is seq.
        self._heap: list[tuple[int, int, _Key]] = []
        self._scheduled: dict[_Key, int] = {}
        self._seq = itertools.count()
        # Keys whose last delivery attempt failed, and the Unix ms of the next attempt.
        self._retry_at: dict[_Key, int] = {}
        self._inflight: set[_Key] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # Serialises changes to the in-memory schedule with the resync that replaces it.
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_DELIVERIES)
        # Actor handle and agent type label per agent, and agents to skip until a time.
        self._targets: dict[str, tuple[Any, str]] = {}
        self._unavailable: dict[str, float] = {}
        # Acknowledged deliveries waiting to be written, and the task that writes them.
        self._acks: list[tuple[tuple[str, str, str, int, int | None], asyncio.Future[None]]] = []
        self._ack_writer: asyncio.Task[None] | None = None
        # Delivery errors already logged, so a periodic reminder logs its error once.
        self._logged: set[tuple[str, str, str]] = set()

    async def set_reminder(
        self, agent: str, request: ReminderRequest, by: str | None
    ) -> ReminderInfo:
        """Store a reminder for ``agent``, replacing one of the same name, and schedule it.

        Raises:
            AgentNotFound: the agent does not exist or is stopped.
            InvalidArguments: ``by`` is another agent.
        """
        check_owner(agent, by)
        record = await asyncio.to_thread(self._store.get_agent, agent)
        if record is None or record.status == STOPPED:
            raise AgentNotFound(agent, "a stopped or unknown agent cannot have reminders")
        now = _now_ms()
        reminder = ReminderRecord(
            agent=agent,
            name=request.name,
            id=uuid.uuid4().hex,
            due_ms=request.first_due_ms(now),
            period_ms=request.period_ms,
            payload_json=request.payload_json,
            created_at=datetime.fromtimestamp(now / 1000, UTC),
        )
        await asyncio.to_thread(self._store.save_reminder, reminder)
        async with self._lock:
            self._reminders[(agent, request.name)] = reminder
            self._retry_at.pop((agent, request.name), None)
            self._schedule((agent, request.name))
        logger.debug("agent %s set reminder %s due at %d ms", agent, request.name, reminder.due_ms)
        return ReminderInfo.from_record(reminder)

    async def list_reminders(
        self, agent: str | None, by: str | None, namespace: str | None = None
    ) -> list[ReminderInfo]:
        """Return the reminders of ``agent`` (every agent's when None), soonest first.

        ``namespace`` keeps the reminders of that namespace's agents; None keeps all.
        """
        check_owner(agent, by)
        records = await asyncio.to_thread(self._store.list_reminders, agent, namespace)
        return [ReminderInfo.from_record(record) for record in records]

    async def cancel_reminder(self, agent: str, name: str, by: str | None) -> bool:
        """Delete a reminder; returns whether it existed.

        A delivery already sent when the cancel arrives still reaches the agent.
        """
        check_owner(agent, by)
        deleted: bool = await asyncio.to_thread(self._store.delete_reminder, agent, name)
        async with self._lock:
            self._drop((agent, name))
        if deleted:
            logger.info("reminder %s of agent %s cancelled by %s", name, agent, by or "operator")
        return deleted

    async def forget_agent(self, agent: str) -> int:
        """Delete every reminder of a stopped or deleted agent; returns how many there were."""
        count: int = await asyncio.to_thread(self._store.delete_reminders, agent)
        async with self._lock:
            for key in [key for key in self._reminders if key[0] == agent]:
                self._drop(key)
        self._targets.pop(agent, None)
        if count:
            logger.info("deleted %d reminders of stopped agent %s", count, agent)
        return count

    async def run_forever(self) -> None:
        """Fire due reminders until cancelled, re-reading the table every resync interval."""
        next_resync = 0.0
        while True:
            try:
                if time.monotonic() >= next_resync:
                    await self._resync()
                    next_resync = time.monotonic() + self._settings.reminder_resync_s
                self._wake.clear()
                active = self._is_active()
                if active:
                    self._fire_due()
                wait_s = min(self._seconds_to_next(), next_resync - time.monotonic())
                if not active:
                    wait_s = min(wait_s, INACTIVE_POLL_S)
                if wait_s > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait_s)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception(
                    "reminder loop failed; reading the table again in %.1f s", RETRY_DELAY_S
                )
                await asyncio.sleep(RETRY_DELAY_S)
                next_resync = 0.0

    async def _resync(self) -> None:
        """Replace the in-memory schedule with the table, keeping deliveries under way."""
        async with self._lock:
            records = await asyncio.to_thread(self._store.list_reminders)
            previous = self._reminders
            self._reminders = {}
            for record in records:
                key = (record.agent, record.name)
                known = previous.get(key)
                if key in self._inflight and known is not None:
                    self._reminders[key] = known
                    continue
                if known is None or (known.id, known.due_ms) != (record.id, record.due_ms):
                    self._retry_at.pop(key, None)
                self._reminders[key] = record
            self._heap = []
            self._scheduled = {}
            for key in self._reminders:
                self._schedule(key)
        logger.debug("reminder loop read %d reminders from the store", len(records))

    def _fire_due(self) -> None:
        now = _now_ms()
        while self._heap and self._heap[0][0] <= now:
            _, seq, key = heapq.heappop(self._heap)
            if self._scheduled.get(key) != seq:
                continue
            del self._scheduled[key]
            record = self._reminders.get(key)
            if record is None or key in self._inflight:
                continue
            self._inflight.add(key)
            task = asyncio.get_running_loop().create_task(self._deliver(record))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _seconds_to_next(self) -> float:
        while self._heap and self._scheduled.get(self._heap[0][2]) != self._heap[0][1]:
            heapq.heappop(self._heap)
        if not self._heap:
            return float("inf")
        return max((self._heap[0][0] - _now_ms()) / 1000, 0.0)

    def _schedule(self, key: _Key) -> None:
        """Put the current record of ``key`` on the heap at its due or retry time."""
        record = self._reminders.get(key)
        if record is None or key in self._inflight:
            self._scheduled.pop(key, None)
            return
        fire_at = max(record.due_ms, self._retry_at.get(key, 0))
        seq = next(self._seq)
        self._scheduled[key] = seq
        heapq.heappush(self._heap, (fire_at, seq, key))
        self._wake.set()

    def _drop(self, key: _Key) -> None:
        self._reminders.pop(key, None)
        self._scheduled.pop(key, None)
        self._retry_at.pop(key, None)

    async def _deliver(self, record: ReminderRecord) -> None:
        """Send one due reminder, then advance its row, or schedule another attempt."""
        key = (record.agent, record.name)
        outcome = "retry"
        try:
            async with self._slots:
                outcome = await self._send(record)
            if outcome == "gone":
                await self.forget_agent(record.agent)
            elif outcome != "retry":
                await self._acknowledge(record)
        except Exception as error:
            outcome = "retry"
            logger.warning(
                "reminder %s of agent %s was not recorded as delivered (%s: %s); trying "
                "again in %.1f s",
                record.name,
                record.agent,
                type(error).__name__,
                error,
                RETRY_DELAY_S,
            )
        finally:
            async with self._lock:
                self._inflight.discard(key)
                current = self._reminders.get(key)
                if outcome == "retry" and current is not None and current.id == record.id:
                    self._retry_at[key] = _now_ms() + round(RETRY_DELAY_S * 1000)
                self._schedule(key)

    async def _send(self, record: ReminderRecord) -> str:
        """Deliver ``record`` once; returns ``ok``, ``error``, ``retry`` or ``gone``."""
        target = await self._target(record.agent)
        if target is None:
            return "gone"
        if target == "retry":
            return "retry"
        handle, agent_type = target
        envelope = Envelope(
            handler=REMINDER_HANDLER,
            args=(record.name, json.loads(record.payload_json)),
            kind="send",
            message_id=f"reminder:{record.id}:{record.due_ms}",
        )
        sent_ms = _now_ms()
        try:
            reply = await asyncio.wait_for(
                handle.handle.remote(envelope.to_wire()), self._settings.ask_timeout_s
            )
        except (RayActorError, ActorUnschedulableError) as error:
            logger.info(
                "reminder %s of agent %s: the actor is gone (%s); trying again in %.1f s",
                record.name,
                record.agent,
                type(error).__name__,
                RETRY_DELAY_S,
            )
            self._lose_target(record.agent)
            return "retry"
        except asyncio.TimeoutError:
            logger.warning(
                "reminder %s of agent %s got no reply within %.1f s; sending it again with "
                "the same message id",
                record.name,
                record.agent,
                self._settings.ask_timeout_s,
            )
            return "retry"
        outcome = self._outcome(record, reply)
        if outcome in ("ok", "error"):
            lateness_s = max(sent_ms - record.due_ms, 0) / 1000
            telemetry.record(metrics.record_reminder_fired, agent_type, outcome, lateness_s)
        return outcome

    def _outcome(self, record: ReminderRecord, reply: Any) -> str:
        """Classify the agent's reply: its handler ran (or cannot run), or try again."""
        if not isinstance(reply, Reply) or reply.error is None:
            return "ok"
        error = reply.error
        if error.kind in ("store", "conflict"):
            return "retry"
        if error.kind == "stopped":
            # A stopping agent; the next attempt reads its record and drops its reminders.
            self._lose_target(record.agent)
            return "retry"
        if (record.agent, record.name, error.kind) not in self._logged:
            self._logged.add((record.agent, record.name, error.kind))
            if error.kind == "unknown_handler":
                logger.error(
                    "agent %s has no handler %s, so reminder %s was dropped; define "
                    "%s(self, name, payload) on the agent class",
                    record.agent,
                    REMINDER_HANDLER,
                    record.name,
                    REMINDER_HANDLER,
                )
            else:
                logger.warning(
                    "reminder %s of agent %s was delivered, and %s failed (%s): %s",
                    record.name,
                    record.agent,
                    REMINDER_HANDLER,
                    error.kind,
                    error.message,
                )
        return "error"

    async def _acknowledge(self, record: ReminderRecord) -> None:
        """Move the row to its next firing, or delete a one-shot row."""
        key = (record.agent, record.name)
        next_due = None
        if record.period_ms is not None:
            next_due = next_due_ms(record.due_ms, record.period_ms, _now_ms())
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks.append(
            ((record.agent, record.name, record.id, record.due_ms, next_due), written)
        )
        if self._ack_writer is None:
            self._ack_writer = asyncio.get_running_loop().create_task(self._write_acks())
        await written
        async with self._lock:
            current = self._reminders.get(key)
            if current is None or (current.id, current.due_ms) != (record.id, record.due_ms):
                return
            self._retry_at.pop(key, None)
            if next_due is None:
                del self._reminders[key]
            else:
                self._reminders[key] = replace(record, due_ms=next_due, fired=record.fired + 1)

    async def _write_acks(self) -> None:
        """Write queued acknowledgements, one transaction per batch, until none are left.

        Acknowledgements that arrive while a batch is written form the next batch, so a
        burst of due reminders costs a few commits instead of one each.
        """
        try:
            while self._acks:
                batch, self._acks = self._acks, []
                try:
                    await asyncio.to_thread(
                        self._store.advance_reminders, [delivery for delivery, _ in batch]
                    )
                except Exception as error:
                    for _, written in batch:
                        if not written.done():
                            written.set_exception(error)
                else:
                    for _, written in batch:
                        if not written.done():
                            written.set_result(None)
        finally:
            self._ack_writer = None

    async def _target(self, agent: str) -> tuple[Any, str] | str | None:
        """Return the agent's actor handle and type label, None if stopped, or ``retry``."""
        cached = self._targets.get(agent)
        if cached is not None:
            return cached
        if self._unavailable.get(agent, 0.0) > time.monotonic():
            return "retry"
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
            self._unavailable[agent] = time.monotonic() + RETRY_DELAY_S
            return "retry"
        target = (handle, record.type_path.rsplit(":", 1)[-1])
        self._targets[agent] = target
        self._unavailable.pop(agent, None)
        return target

    def _lose_target(self, agent: str) -> None:
        self._targets.pop(agent, None)
        self._unavailable[agent] = time.monotonic() + RETRY_DELAY_S


def _now_ms() -> int:
    return int(time.time() * 1000)
