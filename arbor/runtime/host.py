"""The hosted placement: one Ray actor process that runs many agent cells.

Each hosted agent has its own mailbox in the host and handles one message at a time, in
arrival order, while other agents of the same host handle theirs. Async handlers run on
the host's event loop. Synchronous handlers, agent starts and checkpoint writes run in
the host's thread pool, so neither a slow handler nor the database stalls the loop.

A handler that runs past its time limit is abandoned rather than waited for. The host
records the message as failed with `AskTimeout` under a new epoch, drops the agent's
object, and starts the agent again from its last checkpoint for the next message. A
thread cannot be stopped from outside, so the host raises an exception inside the
abandoned handler's thread, which ends a handler that runs Python code. One blocked in a
C call (a long ``time.sleep``, a socket read) keeps its thread until that call returns;
when half the pool's threads are held that way, the host process exits and Ray restarts
it, and every agent of the host comes back from its checkpoint.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import functools
import inspect
import logging
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import ray

from arbor.agent import Agent, import_type
from arbor.config import NAMESPACE, Settings
from arbor.errors import AgentNotFound, AgentOverloaded, ArborError, NameTaken
from arbor.messages import Envelope, ErrorInfo, Reply
from arbor.persistence import RUNNING, STOPPED, AgentRecord, open_store
from arbor.persistence.audit import AuditEntry
from arbor.persistence.group import GroupCommitter
from arbor.runtime import kv, telemetry
from arbor.runtime.actor import start_cell
from arbor.runtime.cell import AgentCell
from arbor.runtime.host_local import AskDeadlines, HostLocalRoute, log_failure
from arbor.runtime.host_order import StreamOrder
from arbor.runtime.ref import (
    REROUTE_HEADER,
    SEQUENCE_HEADER,
    HostedRoute,
    route_to,
    set_local_router,
)

logger = logging.getLogger(__name__)

_Method = TypeVar("_Method", bound=Callable[..., Any])

# Ray names of host actors start with this; agent names cannot, since "arbor-" is reserved.
HOST_PREFIX = "arbor-host-"

# Calls a host accepts at once. A waiting message is a coroutine in the host, not a
# thread, so the bound is memory: about 2 KB per waiting call.
MAX_CONCURRENCY = 10_000

# Seconds between the host's passivation and periodic checkpoint sweeps, at most.
_SWEEP_INTERVAL_S = 1.0


class HandlerAbandoned(BaseException):
    """Raised inside a handler's thread after the host gave up waiting for it.

    A BaseException, so that the handler's own ``except Exception`` does not swallow it.
    """


def _untraced(method: _Method) -> _Method:
    """Keep Ray's tracing wrapper off a method that runs per message inside the process.

    `ray.remote` wraps every method of an actor class, private ones included, to carry
    Ray's own trace context, and each wrapped call costs a microsecond or more. Methods
    that Ray never calls need no wrapper. Ray leaves a method alone when it carries the
    mark it puts on methods it has already wrapped.
    """
    method.__ray_tracing_wrapped__ = True  # type: ignore[attr-defined]
    return method


class _Slot:
    """One agent's place in the host: its mailbox and, while active, its cell."""

    __slots__ = (
        "name",
        "cell",
        "queue",
        "draining",
        "last_active",
        "last_flush",
        "recovery",
        "spawn",
        "idle_s",
        "running",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.cell: AgentCell | None = None
        # Items, their futures and whether to run them when the future is done already.
        self.queue: deque[tuple[Any, asyncio.Future[Any], bool]] = deque()
        self.draining = False
        self.last_active = time.monotonic()
        self.last_flush = time.monotonic()
        # Passed to on_recover at the next start; None for a start after passivation.
        self.recovery: str | None = None
        # The spawn's record, __init__ arguments and audit row (when the start stores the
        # record), used once by the first start.
        self.spawn: (
            tuple[AgentRecord, tuple[Any, ...] | None, dict[str, Any] | None, AuditEntry | None]
            | None
        ) = None
        self.idle_s = 0.0
        # Whether a message or operation taken off the queue is running now.
        self.running = False


class _Elsewhere(Exception):
    """The agent's record names another actor, so this host must not start it."""

    def __init__(self, record: AgentRecord) -> None:
        super().__init__(record.name)
        self.record = record


class _Running:
    """The thread that runs a synchronous handler, for interrupting it past its limit."""

    __slots__ = ("lock", "thread_id")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.thread_id: int | None = None


class HostActor:
    """Ray actor body that runs many agent cells, each with its own mailbox.

    Ray calls ``__init__`` again when it restarts the host process; the new incarnation
    starts every running agent whose record names this host from its checkpoint.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = Settings(**settings)
        telemetry.configure_process(self._settings)
        store_settings = self._settings.model_copy(
            update={"db_pool_max": self._settings.host_db_pool_max}
        )
        self._store = open_store(self._settings.database_url, store_settings, migrate=False)
        # Commits the checkpoints of this host's batched agents together.
        self._committer = GroupCommitter(self._store, self._settings.batch_window_s)
        runtime = ray.get_runtime_context()
        self._name = runtime.get_actor_name() or "?"
        self._node_id = runtime.get_node_id()
        self._handle = runtime.current_actor
        with warnings.catch_warnings():
            # Ray's property reads its own deprecated actor_id and warns about it.
            warnings.simplefilter("ignore", DeprecationWarning)
            reconstructed = runtime.was_current_actor_reconstructed
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self._settings.host_threads, thread_name_prefix="arbor-host"
        )
        self._thread_loops = threading.local()
        self._slots: dict[str, _Slot] = {}
        # Agents whose record names this host, active or passivated.
        self._owned: set[str] = set()
        self._async_handlers: dict[tuple[type[Agent], str], bool] = {}
        # Handler threads past their limit that have not returned yet.
        self._abandoned: set[asyncio.Future[Any]] = set()
        self._routes: dict[str, HostLocalRoute] = {}
        self._ask_deadlines = AskDeadlines(self._loop)
        # The max_pending of each agent started or asked here, or None for no limit.
        self._limits: dict[str, int | None] = {}
        # Messages delivered between agents of this host without Ray.
        self.local_deliveries = 0
        # The number of "moved" replies sent for agents that moved to another host.
        self._moved_replies = 0
        self._order = StreamOrder(self._name, self._loop, self._post)
        set_local_router(self._local_route)
        self._recovery = self._loop.create_task(
            self._recover("crash" if reconstructed else "recreated")
        )
        self._sweeper = self._loop.create_task(self._sweep_forever())
        logger.info("host %s started (pid %d)", self._name, os.getpid())

    # Calls from the registry and from AgentRef.

    async def deliver(self, name: str, wire: tuple[Any, ...]) -> Any:
        """Apply one message to agent ``name``; returns what a dedicated actor's `handle` does."""
        envelope = Envelope.from_wire(wire)
        sequence = envelope.headers.pop(SEQUENCE_HEADER, None)
        if sequence is None:
            reply = await self._post(name, envelope)
        else:
            reply = await self._order.post(name, envelope, sequence)
        if isinstance(reply, Reply) and reply.error is None and not isinstance(reply.value, Reply):
            return reply.value
        return reply

    async def activate(
        self,
        record: AgentRecord,
        init_args: tuple[Any, ...] | None,
        init_kwargs: dict[str, Any] | None,
        audit: AuditEntry | None = None,
    ) -> dict[str, Any]:
        """Start the agent of ``record``, which the registry has placed in this host.

        The registry has stored ``record``, or with ``audit`` the agent's first commit
        stores it, the audit row of the spawn and the first checkpoint together. A repeated
        call (Ray resends it after a host restart) only reports.

        Returns:
            `agent_info` with the cell's ``spawn_record``, or ``{"taken": True}`` when
            ``audit`` was given and another spawn's agent has the name.
        """
        name = record.name

        async def start(slot: _Slot) -> dict[str, Any]:
            if slot.cell is None:
                slot.spawn = (record, init_args, init_kwargs, audit)
                try:
                    await self._activate(slot)
                except NameTaken:
                    return {"taken": True}
                except _Elsewhere as moved:
                    raise ArborError(
                        f"agent {name!r} is recorded in {moved.record.options.get('host')}, "
                        f"not in host {self._name}"
                    ) from None
            elif audit is not None and not await self._runs_spawn(record):
                return {"taken": True}
            assert slot.cell is not None
            return {**self._info(slot), "record": slot.cell.spawn_record}

        return await self._post(name, start)  # type: ignore[no-any-return]

    async def _runs_spawn(self, record: AgentRecord) -> bool:
        """Return whether the running agent of ``record``'s name came from that spawn."""
        stored = await self._loop.run_in_executor(self._pool, self._store.get_agent, record.name)
        return stored is not None and stored.spawn_id == record.spawn_id

    async def agent_info(self, name: str) -> dict[str, Any]:
        """Return the process, node, epoch and checkpoint version of agent ``name``."""

        async def report(slot: _Slot) -> dict[str, Any]:
            if slot.cell is None:
                await self._activate(slot)
            return self._info(slot)

        return await self._post(name, report)  # type: ignore[no-any-return]

    async def stop_agent(self, name: str) -> None:
        """Run the agent's `on_stop`, commit its state and drop it from this host.

        Past ``ARBOR_STOP_TIMEOUT_S`` the agent is fenced instead, so a late commit of
        the stopping handler is rejected, as the dedicated placement's kill makes sure.
        """

        async def stop(slot: _Slot) -> None:
            self._order.forget_agent(name)
            if slot.cell is None:
                await self._start_to_stop(slot)
            cell = slot.cell
            self._owned.discard(name)
            if cell is None:
                return
            work = self._loop.run_in_executor(self._pool, cell.stop_now)
            try:
                await asyncio.wait_for(asyncio.shield(work), self._settings.stop_timeout_s)
            except asyncio.TimeoutError:
                cell.fenced = True
                await asyncio.to_thread(self._store.fence, name)
                logger.warning(
                    "agent %s did not finish on_stop and its final checkpoint within "
                    "ARBOR_STOP_TIMEOUT_S (%s s); it keeps its last checkpoint",
                    name,
                    self._settings.stop_timeout_s,
                )
            finally:
                self._drop(slot)

        await self._post(name, stop)

    async def _start_to_stop(self, slot: _Slot) -> None:
        """Start a passivated agent from its checkpoint, so that its ``on_stop`` runs.

        The registry has marked the agent stopped already, so the start takes a new epoch
        without marking it running. An agent that cannot start keeps its last checkpoint.
        """
        try:
            await self._activate(slot, stopping=True)
        except (AgentNotFound, _Elsewhere):
            return
        except Exception as error:  # noqa: BLE001 - the stop goes on without on_stop
            logger.warning(
                "agent %s was passivated and failed to start again to run on_stop (%s), "
                "so it keeps its last checkpoint",
                slot.name,
                error,
            )

    async def reload(self, name: str) -> dict[str, Any]:
        """Start agent ``name`` again from its newest checkpoint, after `arbor.restore`."""

        async def restart(slot: _Slot) -> dict[str, Any]:
            if slot.cell is not None:
                slot.cell.fenced = True
                self._drop(slot)
            slot.recovery = "rollback"
            await self._activate(slot)
            return self._info(slot)

        return await self._post(name, restart)  # type: ignore[no-any-return]

    async def adopt(self, names: list[str]) -> int:
        """Start agents that the reconciler moved here from a host that is gone.

        Returns:
            How many of them started; the others report their error at their next message.
        """
        started = await asyncio.gather(
            *(self._start_owned(name, "recreated") for name in names), return_exceptions=True
        )
        return sum(1 for outcome in started if outcome is True)

    async def release(self, name: str) -> bool:
        """Commit agent ``name``'s state and drop it, so that another host can take it over.

        Returns:
            Whether the agent was active here.
        """

        async def passivate(slot: _Slot) -> bool:
            self._owned.discard(name)
            return await self._passivate(slot)

        return await self._post(name, passivate)  # type: ignore[no-any-return]

    async def active_agents(self) -> list[str]:
        """Return the names of the agents whose objects are in this host's memory, sorted."""
        return sorted(name for name, slot in self._slots.items() if slot.cell is not None)

    async def passivated(self, names: list[str]) -> list[str]:
        """Return those of ``names`` that this host runs and has no object of in memory.

        A passivated agent's slot goes once its mailbox is empty.
        """
        passivated = []
        for name in names:
            slot = self._slots.get(name)
            if name in self._owned and (slot is None or slot.cell is None):
                passivated.append(name)
        return passivated

    async def ping(self) -> dict[str, Any]:
        """Return the host's process id, node and agent counts."""
        active = sum(1 for slot in self._slots.values() if slot.cell is not None)
        return {
            "name": self._name,
            "pid": os.getpid(),
            "node_id": self._node_id,
            "agents": len(self._owned),
            "active": active,
            "abandoned_threads": len(self._abandoned),
            "group_commits": self._committer.batches,
            "group_commit_writes": self._committer.writes,
            "local_deliveries": self.local_deliveries,
            "moved_replies": self._moved_replies,
            "order_streams": len(self._order),
        }

    async def mailbox_depths(self) -> dict[str, Any]:
        """Return this host's node and, per agent with waiting messages, how many wait.

        A waiting message is one in the agent's mailbox that has not started, or one held
        back for an earlier message of its sender. The running message does not count, as
        for dedicated agents.
        """
        depths = self._order.held_by_agent()
        for name, slot in self._slots.items():
            waiting = sum(1 for item, _, _ in slot.queue if isinstance(item, Envelope))
            if waiting:
                depths[name] += waiting
        return {"node_id": self._node_id, "depths": dict(depths)}

    # The mailbox.

    @_untraced
    def _post(
        self,
        name: str,
        item: Any,
        future: asyncio.Future[Any] | None = None,
        run_anyway: bool = False,
    ) -> asyncio.Future[Any]:
        """Append a message or an operation to the agent's mailbox; call on the host's loop.

        The append happens before the caller's first await, so messages keep the order
        in which they reach the host. An item whose future is done by the time its turn
        comes is skipped (a cancelled Ray call), unless ``run_anyway``.
        """
        slot = self._slots.get(name)
        if slot is None:
            slot = self._slots[name] = _Slot(name)
        if future is None:
            future = self._loop.create_future()
        # Only an ask is refused at the limit, because its caller reads the refusal. A
        # send has no reader, so it is queued: the sending process counts its own sends
        # against the limit, as for a dedicated agent, and outbox sends are not counted.
        limit = None
        if type(item) is Envelope and item.kind == "ask":
            limit = self._limits[name] if name in self._limits else self._mailbox_limit(name)
        if limit is not None and len(slot.queue) + slot.running >= limit:
            # Every sender's messages reach the host, so the limit covers them all together.
            future.set_result(_error_reply(item, AgentOverloaded(name, limit, False)))
            return future
        slot.queue.append((item, future, run_anyway))
        if not slot.draining:
            slot.draining = True
            self._loop.create_task(self._drain(slot))
        return future

    @_untraced
    def _mailbox_limit(self, name: str) -> int | None:
        """Return the ``max_pending`` of agent ``name``, read once from Ray's key-value store."""
        if name not in self._limits:
            value = kv.get(kv.max_pending_key(name))
            self._limits[name] = int(value) if value else None
        return self._limits[name]

    @_untraced
    async def _drain(self, slot: _Slot) -> None:
        try:
            while True:
                if not slot.queue:
                    # Yield once before ending. An agent of this host that asked this one
                    # usually posts its next message as soon as it reads the reply, and
                    # finding the mailbox still draining saves a task (about 1.3 µs).
                    await asyncio.sleep(0)
                    if not slot.queue:
                        break
                item, future, run_anyway = slot.queue.popleft()
                if future.done() and not run_anyway:
                    continue
                slot.running = True
                try:
                    cell = slot.cell
                    if (
                        type(item) is Envelope
                        and cell is not None
                        and cell.handler_timeout(item.handler) is None
                        and self._is_async(cell, item.handler)
                        and not cell.fenced
                    ):
                        # The common case of `_run_message`, without its extra coroutine.
                        result = await cell.handle_serialised(item)
                        if cell.fenced:
                            result = await self._after_fenced(slot, item, result)
                    elif isinstance(item, Envelope):
                        result = await self._run_message(slot, item)
                    else:
                        result = await item(slot)
                except Exception as error:
                    if not future.done():
                        future.set_exception(error)
                else:
                    if not future.done():
                        future.set_result(result)
                finally:
                    slot.running = False
        finally:
            slot.draining = False
            slot.last_active = time.monotonic()
            # An idle slot without a cell goes, unless it keeps the reason for the next
            # start's on_recover, as after a handler time limit.
            idle = slot.cell is None and not slot.queue and slot.recovery is None
            if idle and self._slots.get(slot.name) is slot:
                del self._slots[slot.name]

    @_untraced
    async def _run_message(self, slot: _Slot, envelope: Envelope, retried: bool = False) -> Any:
        cell = slot.cell
        if cell is None:
            try:
                cell = await self._activate(slot)
            except _Elsewhere as moved:
                if envelope.headers.pop(REROUTE_HEADER, None) is not None:
                    # The sender looks the agent up again and resends; see `AgentRef`.
                    self._moved_replies += 1
                    return _moved_reply(envelope, moved.record)
                return await self._forward(moved.record, envelope)
            except AgentNotFound as error:
                return _stopped_reply(envelope, error)
            except Exception as error:
                return _error_reply(envelope, error)

        timeout = cell.handler_timeout(envelope.handler)
        if self._is_async(cell, envelope.handler):
            job: Awaitable[Reply] = cell.handle_serialised(envelope)
            running = None
        else:
            running = _Running()
            job = self._loop.run_in_executor(self._pool, self._run_sync, cell, envelope, running)
        if timeout is None:
            reply = await job
        else:
            task = asyncio.ensure_future(job)
            done, _ = await asyncio.wait((task,), timeout=timeout)
            if not done:
                return await self._abandon(slot, cell, envelope, timeout, task, running)
            reply = task.result()

        if cell.fenced:
            return await self._after_fenced(slot, envelope, reply, retried)
        return reply

    async def _after_fenced(
        self, slot: _Slot, envelope: Envelope, reply: Reply, retried: bool = False
    ) -> Reply:
        """Drop a cell that a newer incarnation fenced off while it ran ``envelope``."""
        self._drop(slot)
        if not retried and reply.error is not None and reply.error.kind == "conflict":
            # A newer incarnation owns the agent and this one applied nothing. Run the
            # message where the record places the agent now, as Ray's retry would.
            result: Reply = await self._run_message(slot, envelope, retried=True)
            return result
        return reply

    @_untraced
    def _run_sync(self, cell: AgentCell, envelope: Envelope, running: _Running) -> Reply:
        with running.lock:
            running.thread_id = threading.get_ident()
        try:
            return cell.handle_now(envelope, self._run_in_thread_loop)
        finally:
            with running.lock:
                running.thread_id = None

    @_untraced
    def _run_in_thread_loop(self, awaitable: Awaitable[Any]) -> Any:
        """Run a coroutine that a synchronous hook or handler returned, on its thread's loop."""
        loop = getattr(self._thread_loops, "loop", None)
        if loop is None:
            loop = self._thread_loops.loop = asyncio.new_event_loop()
        return loop.run_until_complete(awaitable)

    @_untraced
    def _is_async(self, cell: AgentCell, handler: str) -> bool:
        key = (cell.agent_class, handler)
        known = self._async_handlers.get(key)
        if known is None:
            method = getattr(cell.agent_class, handler, None) if isinstance(handler, str) else None
            known = inspect.iscoroutinefunction(method)
            if method is not None:
                self._async_handlers[key] = known
        return known

    async def _abandon(
        self,
        slot: _Slot,
        cell: AgentCell,
        envelope: Envelope,
        timeout: float,
        task: asyncio.Future[Reply],
        running: _Running | None,
    ) -> Reply:
        """Give up on a handler past its limit; the agent starts again for its next message."""
        cell.fenced = True
        self._drop(slot)
        slot.recovery = "timeout"
        try:
            reply = await asyncio.to_thread(cell.record_timeout, envelope, timeout, True)
        except Exception:
            logger.exception(
                "agent %s could not record the timeout of message %s; the agent restarts "
                "from its last checkpoint anyway",
                cell.name,
                envelope.message_id,
            )
            reply = Reply(
                envelope.message_id,
                error=ErrorInfo(
                    kind="timeout",  # type: ignore[arg-type]
                    error_type="arbor.errors.AskTimeout",
                    message=f"agent {cell.name!r} handler {envelope.handler!r} ran longer "
                    f"than its {timeout:g} s limit",
                ),
            )
        task.add_done_callback(_ignore_outcome)
        if running is None:
            task.cancel()
            return reply
        with running.lock:
            if running.thread_id is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(running.thread_id), ctypes.py_object(HandlerAbandoned)
                )
        if not task.done():
            self._abandoned.add(task)
            task.add_done_callback(self._abandoned.discard)
        limit = max(1, self._settings.host_threads // 2)
        if len(self._abandoned) >= limit:
            logger.critical(
                "host %s: %d handler threads ran past their limits and did not stop; the "
                "host process exits so that Ray restarts it, and its agents restart from "
                "their checkpoints",
                self._name,
                len(self._abandoned),
            )
            os._exit(1)
        return reply

    # Starting, stopping and moving agents.

    async def _activate(self, slot: _Slot, stopping: bool = False) -> AgentCell:
        """Start the slot's agent: restore its checkpoint, or run ``__init__`` for a spawn.

        ``stopping`` starts a stopped agent, only so that its ``on_stop`` runs.

        Raises:
            _Elsewhere: the record places the agent in another actor.
            AgentNotFound: the agent is stopped (unless ``stopping``) or has no record.
        """
        name = slot.name
        spawn, slot.spawn = slot.spawn, None
        audit = None
        if spawn is not None:
            # The registry passes the record it stored or is about to, which saves a read.
            record: AgentRecord | None = spawn[0]
            init_args, init_kwargs, audit = spawn[1], spawn[2], spawn[3]
        else:
            record = await self._loop.run_in_executor(self._pool, self._store.get_agent, name)
            init_args = init_kwargs = None
        if record is None:
            raise AgentNotFound(name)
        if record.status == STOPPED and not stopping:
            raise AgentNotFound(name, "it was stopped or deleted, so it does not start again")
        if record.options.get("host") != self._name:
            self._owned.discard(name)
            raise _Elsewhere(record)
        agent_class = import_type(record.type_path)
        # The record is the source of the limit; the key-value copy may not be there yet.
        limit = record.options.get("max_pending")
        self._limits[name] = int(limit) if limit is not None else None
        reason, slot.recovery = slot.recovery, None
        durability = record.options.get("durability", self._settings.durability)
        handle = self._handle
        cell = await self._loop.run_in_executor(
            self._pool,
            functools.partial(
                start_cell,
                name,
                agent_class,
                self._store,
                self._settings,
                node_id=self._node_id,
                init_args=init_args,
                init_kwargs=init_kwargs,
                durability=durability,
                recovery=(lambda: reason) if reason is not None else None,
                run=self._run_in_thread_loop,
                offload_io=True,
                self_route=lambda: HostedRoute(handle, name),
                committer=self._committer,
                deferred_metrics=True,
                record=record,
                audit=audit,
                stopping=stopping,
            ),
        )
        slot.cell = cell
        slot.idle_s = float(record.options.get("passivate_idle_s", self._settings.passivate_idle_s))
        slot.last_flush = time.monotonic()
        self._owned.add(name)
        return cell

    async def _start_owned(self, name: str, reason: str) -> bool:
        self._owned.add(name)

        async def start(slot: _Slot) -> bool:
            if slot.cell is not None:
                return True
            slot.recovery = reason
            await self._activate(slot)
            return True

        return await self._post(name, start)  # type: ignore[no-any-return]

    async def _recover(self, reason: str) -> None:
        """Start every running agent that the store places in this host."""
        try:
            records = await asyncio.to_thread(self._store.list_agents, RUNNING)
        except Exception:
            logger.exception(
                "host %s could not list its agents; they start on their next message", self._name
            )
            return
        names = [record.name for record in records if record.options.get("host") == self._name]
        if not names:
            return
        logger.info("host %s starts %d agents from their checkpoints", self._name, len(names))
        outcomes = await asyncio.gather(
            *(self._start_owned(name, reason) for name in names), return_exceptions=True
        )
        for name, outcome in zip(names, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                logger.error("host %s could not start agent %s: %s", self._name, name, outcome)

    def _drop(self, slot: _Slot) -> None:
        """Forget the slot's cell; its timers stop and its late commits are fenced or moot."""
        cell = slot.cell
        slot.cell = None
        if cell is not None and not cell.fenced:
            cell.stopped = True

    async def _passivate(self, slot: _Slot) -> bool:
        cell = slot.cell
        if cell is None:
            return False
        await self._loop.run_in_executor(self._pool, cell.flush_now)
        self._drop(slot)
        logger.debug("host %s passivated agent %s", self._name, slot.name)
        return True

    async def _forward(self, record: AgentRecord, envelope: Envelope) -> Reply:
        """Send a message that reached the wrong actor to the one the record names."""
        from arbor.registry.info import actor_name, placement_of

        try:
            handle = await asyncio.to_thread(ray.get_actor, actor_name(record), NAMESPACE)
        except ValueError:
            return _stopped_reply(
                envelope, AgentNotFound(record.name, "its actor is being recreated; retry")
            )
        route = route_to(record.name, handle, placement_of(record))
        result = await asyncio.wait_for(
            route.handle.remote(envelope.to_wire()), self._settings.ask_timeout_s
        )
        return result if isinstance(result, Reply) else Reply(envelope.message_id, value=result)

    def _info(self, slot: _Slot) -> dict[str, Any]:
        cell = slot.cell
        return {
            "name": slot.name,
            "actor": self._name,
            "pid": os.getpid(),
            "node_id": self._node_id,
            "incarnation": cell.epoch if cell else 0,
            "checkpoint_version": cell.checkpoint_version if cell else 0,
            "messages_processed": cell.messages_processed if cell else 0,
        }

    # Passivation and periodic checkpoints.

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval())
            try:
                self._sweep()
            except Exception:
                logger.exception("host %s sweep failed; retrying", self._name)

    def _sweep_interval(self) -> float:
        intervals = [_SWEEP_INTERVAL_S, self._settings.checkpoint_interval_s]
        if self._settings.passivate_idle_s > 0:
            intervals.append(self._settings.passivate_idle_s / 2)
        return max(min(intervals), 0.05)

    def _sweep(self) -> None:
        now = time.monotonic()
        self._order.prune(now)
        for slot in list(self._slots.values()):
            cell = slot.cell
            if cell is None or slot.draining or slot.queue:
                continue
            if slot.idle_s > 0 and now - slot.last_active >= slot.idle_s and not _has_timers(cell):
                self._post(slot.name, self._passivate).add_done_callback(log_failure)
            elif (
                cell.durability == "periodic"
                and now - slot.last_flush >= self._settings.checkpoint_interval_s
            ):
                slot.last_flush = now
                self._post(slot.name, self._flush).add_done_callback(log_failure)

    async def _flush(self, slot: _Slot) -> None:
        cell = slot.cell
        if cell is not None:
            await self._loop.run_in_executor(self._pool, cell.flush_now)
            if cell.fenced:
                self._drop(slot)

    # Delivery between agents of this host.

    @_untraced
    def _local_route(self, name: str) -> HostLocalRoute | None:
        if name not in self._owned:
            return None
        route = self._routes.get(name)
        if route is None:
            route = self._routes[name] = HostLocalRoute(self, name)
        return route

    def __repr__(self) -> str:
        # Ray prefixes this actor's log lines with its repr.
        return f"Host({self._name})"


def _stopped_reply(envelope: Envelope, error: AgentNotFound) -> Reply:
    info = ErrorInfo(kind="stopped", error_type="arbor.errors.AgentNotFound", message=str(error))
    return Reply(envelope.message_id, error=info)


def _moved_reply(envelope: Envelope, record: AgentRecord) -> Reply:
    info = ErrorInfo(
        kind="moved",
        error_type="arbor.errors.AgentNotFound",
        message=f"agent {record.name!r} moved to {record.options.get('host')}",
    )
    return Reply(envelope.message_id, error=info)


def _error_reply(envelope: Envelope, error: Exception) -> Reply:
    info = ErrorInfo(
        kind="handler",
        error_type=f"{type(error).__module__}.{type(error).__qualname__}",
        message=str(error),
    )
    return Reply(envelope.message_id, error=info, exception=error)


def _has_timers(cell: AgentCell) -> bool:
    context = getattr(cell.agent, "_arbor_context", None)
    timers = getattr(context, "_timers", None)
    return timers is not None and bool(timers.active())


def _ignore_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def create_host_actor(host_name: str, settings: Settings, node_id: str | None = None) -> Any:
    """Create a detached host actor, spread over the nodes by Ray or placed on ``node_id``.

    A node preference is soft, so Ray restarts the host on another node when that one dies.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    strategy: Any = "SPREAD"
    if node_id is not None:
        strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=True)
    return (
        ray.remote(HostActor)
        .options(
            name=host_name,
            namespace=NAMESPACE,
            lifetime="detached",
            # Restart forever and resubmit in-flight messages to the new incarnation; the
            # cells' deduplication makes a resubmitted message apply once.
            max_restarts=-1,
            max_task_retries=-1,
            max_concurrency=MAX_CONCURRENCY,
            scheduling_strategy=strategy,
            # A sliver of a CPU keeps hosts off nodes that offer none (a head node started
            # with num_cpus=0) without taking a CPU from the node's agents.
            num_cpus=0.01,
        )
        .remote(settings.model_dump())
    )
