"""The dedicated placement: one detached Ray actor per agent, named after the agent."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import ray
from ray.exceptions import ActorUnschedulableError, RayActorError

from arbor.agent import Agent
from arbor.config import NAMESPACE, Settings
from arbor.errors import AgentNotFound, ClusterLeaseLost, NameTaken
from arbor.messages import Envelope, ErrorInfo, Reply
from arbor.observability import metrics
from arbor.persistence import FAILED, RUNNING, STARTING, AgentRecord, open_store
from arbor.persistence.audit import AuditEntry
from arbor.persistence.group import GroupCommitter
from arbor.runtime import kv, telemetry
from arbor.runtime.cell import CAPABILITY_HEADER, AgentCell
from arbor.runtime.context import RuntimeContext
from arbor.runtime.guard import Wallet, process_guard
from arbor.runtime.outbox import Outbox

logger = logging.getLogger(__name__)

# Seconds between the watchdog's checks of a running handler's deadline.
_WATCH_INTERVAL_S = 0.05

# Restarts in a row that may fail (in restore or on_start) before the agent is marked
# failed, and the wait before the next restart, growing by this much with each failure.
START_ATTEMPTS = 3
START_RETRY_BACKOFF_S = 1.0


class AgentActor:
    """Ray actor body that runs one agent cell.

    Ray calls ``__init__`` again in every restarted incarnation, so each restart takes a
    new epoch and restores the latest checkpoint before the first message runs.

    The actor is a synchronous one on purpose: Ray runs a synchronous actor's tasks from
    one caller in submission order, which an async actor does not promise. Each task runs
    the cell's coroutine to completion on the actor's private event loop, in Ray's task
    thread, so async handlers work without a thread hand-off per message. A lock shares
    the loop with the periodic checkpoint thread.
    """

    def __init__(
        self,
        name: str | None,
        agent_class: type[Agent],
        settings: dict[str, Any],
        init_args: tuple[Any, ...] | None,
        init_kwargs: dict[str, Any] | None,
        durability: str | None,
    ) -> None:
        self._settings = Settings(**settings)
        telemetry.configure_process(self._settings)
        self._agent_class = agent_class
        self._name = name
        self._loop = asyncio.new_event_loop()
        self._loop_lock = threading.Lock()
        self._store = open_store(self._settings.database_url, self._settings, migrate=False)
        self._node_id = ray.get_runtime_context().get_node_id()
        self._stopping = threading.Event()
        self._cell: AgentCell | None = None
        # The running message with a time limit, as (envelope, limit, deadline), and the
        # thread that ends the process when a deadline passes.
        self._watched: tuple[Envelope, float, float] | None = None
        self._watch_lock = threading.Lock()
        self._watchdog: threading.Thread | None = None
        if name is not None:
            durability = durability or self._settings.durability
            if (init_args is None and init_kwargs is None) or _reconstructed():
                self._resume(name, durability, init_args, init_kwargs)
            else:
                # A spawn: its caller gets any error itself.
                self._start(name, init_args, init_kwargs, durability)
            return
        # A warm actor: started ahead of any spawn, with imports done and the store open.
        # After a crash Ray runs this again, and it resumes the agent it was given.
        bound = self._bound_record()
        if bound is not None and bound.checkpoint_version > 0:
            self._resume(bound.name, bound.options.get("durability", self._settings.durability))
            return
        self._prepare_for_claim()

    def _prepare_for_claim(self) -> None:
        """Do the per-process set-up of an agent start now, so that a claim skips it.

        The capability guard reads the public key and the revocations from the store, and
        the metric objects are made once per process.
        """
        metrics.prepare()
        try:
            self._store.rehearse_first_incarnation(self._settings.cluster_id)
            if self._settings.enforce_capabilities:
                process_guard(self._store, self._settings)
        except Exception as error:
            # The claim tries again and reports the error to the spawn's caller.
            logger.warning("warm actor %s could not prepare: %s", self._actor_name(), error)

    def _resume(
        self,
        name: str,
        durability: str,
        init_args: tuple[Any, ...] | None = None,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Start an agent again, after a crash or for the reconciler.

        It restores the checkpoint; the spawn's arguments, which Ray passes again after a
        crash, matter only when the first incarnation died before its first checkpoint.
        """
        try:
            self._start(name, init_args, init_kwargs, durability)
        except Exception as error:
            self._retry_or_fail(name, error)
            raise
        kv.delete(kv.start_failures_key(name))

    def _retry_or_fail(self, name: str, error: Exception) -> None:
        """Count a failed restart; after `START_ATTEMPTS` in a row, mark the agent failed.

        A stopped agent, or one whose cluster lost the lease, exits at once without a
        restart, since every restart would fail the same way.

        An earlier failure waits before Ray's next restart, so a restore or ``on_start``
        that fails for a moment (a service still starting) gets another chance. The last
        one records the error for `arbor.list_agents` and exits without a restart, so an
        agent that can never start does not restart forever.
        """
        if isinstance(error, AgentNotFound | ClusterLeaseLost):
            # Stopped, or owned by another cluster: a restart would fail the same way.
            logger.warning("agent %s does not start here and its actor exits: %s", name, error)
            ray.actor.exit_actor()
        key = kv.start_failures_key(name)
        failures = int(kv.get(key) or 0) + 1
        summary = f"{type(error).__name__}: {error}"
        if failures < START_ATTEMPTS:
            kv.put(key, str(failures).encode())
            logger.error(
                "agent %s failed to start again (attempt %d of %d): %s",
                name,
                failures,
                START_ATTEMPTS,
                summary,
            )
            time.sleep(START_RETRY_BACKOFF_S * failures)
            return
        kv.delete(key)
        reason = f"it failed to start {failures} times in a row after a restart: {summary}"
        logger.error("agent %s is marked failed: %s", name, reason)
        self._store.set_status(name, FAILED, reason)
        ray.actor.exit_actor()

    def claim(
        self,
        name: str,
        init_args: tuple[Any, ...] | None,
        init_kwargs: dict[str, Any] | None,
        durability: str,
        record: AgentRecord | None = None,
        audit: AuditEntry | None = None,
    ) -> dict[str, Any]:
        """Turn this warm actor into agent ``name``.

        ``record`` is the agent's record as the registry stored it, or with ``audit``, the
        record to store: the first commit then stores it, the audit row of the spawn and
        the first checkpoint together. Ray may run a claim again after a crash, when the
        restarted actor has already resumed the agent; the repeat then only reports.

        Returns:
            `info` with the cell's ``spawn_record``; ``{"taken": True}`` when ``audit``
            was given and an agent of that name exists, and this actor then stays ready;
            or ``{"runs": other}`` when another claim made this actor agent ``other``.
            The registry and clients that a warm actor was lent to both claim, so the
            first claim wins.
        """
        if self._cell is None:
            try:
                self._start(name, init_args, init_kwargs, durability, record, audit)
            except NameTaken:
                self._name = None
                return {"taken": True}
        elif self._cell.name != name:
            return {"runs": self._cell.name}
        assert self._cell is not None
        return {**self.info(), "record": self._cell.spawn_record}

    def _start(
        self,
        name: str,
        init_args: tuple[Any, ...] | None,
        init_kwargs: dict[str, Any] | None,
        durability: str,
        record: AgentRecord | None = None,
        audit: AuditEntry | None = None,
    ) -> None:
        self._name = name
        cell = start_cell(
            name,
            self._agent_class,
            self._store,
            self._settings,
            node_id=self._node_id,
            init_args=init_args,
            init_kwargs=init_kwargs,
            durability=durability,
            recovery=functools.partial(_recovery_reason, name),
            run=self._loop.run_until_complete,
            offload_io=False,
            record=record,
            audit=audit,
        )
        self._cell = cell
        if durability == "periodic":
            threading.Thread(
                target=self._checkpoint_periodically,
                name=f"arbor-checkpoint-{name}",
                daemon=True,
            ).start()

    def _bound_record(self) -> AgentRecord | None:
        """Return the agent the registry gave this warm actor, if any."""
        actor_name = self._actor_name()
        for record in self._store.list_agents():
            if record.options.get("actor") == actor_name and record.status in (RUNNING, STARTING):
                return record
        return None

    def _actor_name(self) -> str:
        return ray.get_runtime_context().get_actor_name() or "?"

    def handle(self, wire: tuple[Any, ...]) -> Reply | Any:
        """Apply one message; a fenced-off incarnation exits so Ray retries on the current one.

        Returns:
            The handler's value as is when the message succeeded, or else a `Reply`
            holding the error; plain values keep the common path cheap to serialise.
        """
        envelope = Envelope.from_wire(wire)
        cell = self._cell
        if cell is None:
            return Reply(
                message_id=envelope.message_id,
                error=ErrorInfo(
                    kind="stopped",
                    error_type="arbor.errors.AgentNotFound",
                    message=f"warm actor {self._actor_name()} runs no agent yet",
                ),
            )
        timeout = cell.handler_timeout(envelope.handler)
        if timeout is not None:
            self._watch(envelope, timeout)
        with self._loop_lock:
            reply = cell.handle_now(envelope, self._loop.run_until_complete)
        if timeout is not None:
            with self._watch_lock:
                self._watched = None
        if cell.fenced:
            _exit_fenced(cell)
        if reply.error is None and not isinstance(reply.value, Reply):
            return reply.value
        return reply

    def _watch(self, envelope: Envelope, timeout: float) -> None:
        with self._watch_lock:
            self._watched = (envelope, timeout, time.monotonic() + timeout)
        if self._watchdog is None:
            self._watchdog = threading.Thread(
                target=self._watch_forever, name=f"arbor-watchdog-{self._name}", daemon=True
            )
            self._watchdog.start()

    def _watch_forever(self) -> None:
        """End the process when a handler runs past its limit, recording the timeout first.

        A Python thread cannot be stopped from outside, so a restart from the checkpoint is
        the only way to free the agent. Ray then retries the message on the new
        incarnation, which replies with the recorded `AskTimeout`.
        """
        while True:
            time.sleep(_WATCH_INTERVAL_S)
            with self._watch_lock:
                watched = self._watched
                if watched is None or time.monotonic() < watched[2]:
                    continue
                envelope, timeout, _ = watched
                cell = self._cell
                assert cell is not None
                # The next incarnation's on_recover gets "timeout" rather than "crash".
                with contextlib.suppress(Exception):
                    kv.put(kv.rollback_key(cell.name), b"timeout")
                try:
                    cell.record_timeout(envelope, timeout)
                except Exception:
                    logger.exception(
                        "agent %s could not record the timeout of message %s; restarting anyway",
                        cell.name,
                        envelope.message_id,
                    )
                os._exit(1)

    def info(self) -> dict[str, Any]:
        """Return the process id, node, epoch and checkpoint version of this incarnation."""
        cell = self._cell
        return {
            "name": self._name,
            "actor": self._actor_name(),
            "pid": os.getpid(),
            "node_id": self._node_id,
            "incarnation": cell.epoch if cell else 0,
            "checkpoint_version": cell.checkpoint_version if cell else 0,
            "messages_processed": cell.messages_processed if cell else 0,
        }

    def stop(self) -> None:
        """Commit pending state and refuse further messages; the registry then kills the actor."""
        self._stopping.set()
        if self._cell is None:
            return
        with self._loop_lock:
            self._cell.stop_now()

    def _checkpoint_periodically(self) -> None:
        interval = self._settings.checkpoint_interval_s
        cell = self._cell
        assert cell is not None
        while not self._stopping.wait(interval):
            try:
                with self._loop_lock:
                    cell.flush_now()
            except Exception:
                logger.exception(
                    "agent %s incarnation %d periodic checkpoint failed; retrying in %.1f s",
                    self._name,
                    cell.epoch,
                    interval,
                )
            if cell.fenced:
                _exit_fenced(cell)

    def __repr__(self) -> str:
        # Ray prefixes this actor's log lines with its repr.
        return f"{type(self).__name__}({self._name or 'warm'})"


def start_cell(
    name: str,
    agent_class: type[Agent],
    store: Any,
    settings: Settings,
    *,
    node_id: str,
    init_args: tuple[Any, ...] | None,
    init_kwargs: dict[str, Any] | None,
    durability: str,
    recovery: Callable[[], str] | None,
    run: Callable[[Awaitable[Any]], Any] | None,
    offload_io: bool,
    self_route: Callable[[], Any] | None = None,
    committer: GroupCommitter | None = None,
    deferred_metrics: bool = False,
    record: AgentRecord | None = None,
    audit: AuditEntry | None = None,
    stopping: bool = False,
) -> AgentCell:
    """Build the cell of one agent incarnation, as every placement does.

    It restores the agent (or runs ``__init__``), binds its context, and dispatches the
    outbox messages the last incarnation committed but may not have delivered. A spawn
    passes the ``record`` the registry just stored, which saves the cell a read, or the
    record to store together with the spawn's ``audit`` row and first checkpoint.
    ``stopping`` starts an agent that is being stopped, only so that its ``on_stop`` runs.
    """
    guard = wallet = None
    if settings.enforce_capabilities:
        guard = process_guard(store, settings)
        wallet = Wallet(name, guard)
    context = RuntimeContext(name, settings, self_route=self_route)
    with telemetry.span("arbor.restore", {"arbor.agent": name}):
        cell = AgentCell(
            name,
            agent_class,
            store,
            context,
            init_args=init_args,
            init_kwargs=init_kwargs,
            node_id=node_id,
            durability=durability,  # type: ignore[arg-type]
            checkpoint_keep=settings.checkpoint_keep,
            dedup_window=settings.dedup_window,
            offload_io=offload_io,
            outbox=Outbox(functools.partial(_dispatch, wallet), _delivered),
            guard=guard,
            wallet=wallet,
            # An incarnation of a cluster that lost the lease raises at its start, and a
            # dedicated actor then exits without a restart (see `_retry_or_fail`).
            cluster_id=settings.cluster_id,
            recovery=recovery,
            handler_timeout_s=settings.handler_timeout_s,
            run=run,
            committer=committer,
            deferred_metrics=deferred_metrics,
            record=record,
            audit=audit,
            stopping=stopping,
        )
    context.attach(cell)
    if cell.outbox is not None:
        cell.outbox.flush()
    return cell


def _dispatch(wallet: Wallet | None, target: str, wire: list[Any]) -> Any:
    """Send an outbox message to ``target``; returns the reply's ObjectRef, or None.

    The sender's capability token is attached here rather than kept in the checkpoint.
    """
    from arbor.runtime.ref import find_actor, local_route

    if wallet is not None:
        token = wallet.token_for(f"arbor://agent/{wire[3]}/{target}")
        if token is not None:
            wire = [*wire[:7], {**wire[7], CAPABILITY_HEADER: token}, *wire[8:]]
    local = local_route(target)
    if local is not None:
        # The target runs in this process's host: deliver without Ray.
        return local.send(Envelope.from_wire(tuple(wire)))
    handle = find_actor(target)
    if handle is None:
        reason = _ended(target)
        if reason is None:
            return None
        # The target is stopped or gone for good, so a retry cannot deliver the message.
        logger.error(
            "agent %s: message %s to agent %s is dropped because that agent %s",
            wire[5],
            wire[4],
            target,
            reason,
        )
        dropped: concurrent.futures.Future[None] = concurrent.futures.Future()
        dropped.set_result(None)
        return dropped
    return handle.handle.remote(tuple(wire))


def _ended(target: str) -> str | None:
    """Return why agent ``target`` takes no more messages, or None if it may again.

    Only the registry's reply decides. While the registry cannot be reached, the target
    may still run, so None is returned.
    """
    from arbor.runtime.ref import registry_handle

    try:
        located = ray.get(registry_handle().locate.remote(target), timeout=_LOCATE_TIMEOUT_S)
    except Exception as error:
        logger.debug("agent %s could not be located: %s", target, error)
        return None
    if located is None:
        return "has no record"
    status = located.get("status")
    return f"is {status}" if status in ("stopped", "failed") else None


# Seconds an outbox dispatch waits for the registry to say where its target is.
_LOCATE_TIMEOUT_S = 10.0


def _recovery_reason(name: str) -> str:
    """Return why this incarnation restores a checkpoint, for the agent's `on_recover`."""
    key = kv.rollback_key(name)
    marker = kv.get(key)
    if marker is not None:
        kv.delete(key)
        return "timeout" if marker == b"timeout" else "rollback"
    if _reconstructed():
        return "crash"
    return "recreated"


def _reconstructed() -> bool:
    """Return whether Ray restarted this actor after its process died."""
    with warnings.catch_warnings():
        # Ray's property reads its own deprecated actor_id and warns about it.
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def _delivered(reply: Any) -> bool | None:
    """Check an outbox message's reply: True once handled, False if the target was lost."""
    if isinstance(reply, asyncio.Future | concurrent.futures.Future):
        # A delivery inside this process's host, which cannot lose the message.
        return True if reply.done() else None
    ready, _ = ray.wait([reply], timeout=0)
    if not ready:
        return None
    try:
        ray.get(reply, timeout=0)
    except (RayActorError, ActorUnschedulableError):
        return False
    except Exception:
        # The receiver applied the message and its handler failed; that is delivered.
        return True
    return True


def _exit_fenced(cell: AgentCell) -> None:
    logger.error(
        "agent %s incarnation %d exits because a newer incarnation owns the agent",
        cell.name,
        cell.epoch,
    )
    # Exiting without a reply makes Ray retry in-flight messages on the current
    # incarnation, so no caller sees this zombie's refusal.
    os._exit(1)


_actor_classes: dict[type[Agent], Any] = {}


def actor_class_for(agent_class: type[Agent]) -> Any:
    """Return the Ray actor class for ``agent_class``, named like it for the Ray dashboard."""
    remote_class = _actor_classes.get(agent_class)
    if remote_class is None:
        body = type(
            agent_class.__name__,
            (AgentActor,),
            {"__module__": AgentActor.__module__, "__qualname__": agent_class.__name__},
        )
        remote_class = ray.remote(body)
        _actor_classes[agent_class] = remote_class
    return remote_class


def create_agent_actor(
    name: str,
    agent_class: type[Agent],
    settings: Settings,
    ray_options: dict[str, Any],
    init_args: tuple[Any, ...] | None,
    init_kwargs: dict[str, Any] | None,
    durability: str,
    ray_name: str | None = None,
) -> Any:
    """Create the detached actor that runs agent ``name``; returns its handle at once.

    The actor's Ray name is ``ray_name``, by default the agent's name.

    Raises:
        ValueError: an actor with this Ray name already exists in the ``arbor`` namespace.
    """
    remote_class = actor_class_for(agent_class)
    return remote_class.options(
        name=ray_name or name,
        namespace=NAMESPACE,
        lifetime="detached",
        # Restart forever and resubmit in-flight messages to the new incarnation; the
        # cell's deduplication makes a resubmitted message apply once.
        max_restarts=-1,
        max_task_retries=-1,
        **ray_options,
    ).remote(
        name,
        agent_class,
        settings.model_dump(),
        init_args,
        init_kwargs,
        durability,
    )


# Ray names of warm actors start with this; agent names cannot, since "arbor-" is
# reserved.
WARM_PREFIX = "arbor-warm-"

# Ray names of agents moved off a lost node that they were pinned to.
MOVED_PREFIX = "arbor-moved-"


def create_warm_actor(
    actor_name: str, agent_class: type[Agent], settings: Settings, node_id: str | None = None
) -> Any:
    """Start an empty actor of ``agent_class``'s actor class, for a later spawn to claim.

    It has the options of a default spawn, so only spawns without placement options
    claim one. The Ray dashboard shows the agent class; the actor's Ray name is
    ``actor_name`` rather than the agent's name. ``node_id`` is the node it should run
    on, a soft preference: Ray places it elsewhere if that node is gone.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote_class = actor_class_for(agent_class)
    options: dict[str, Any] = {}
    if node_id is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id, soft=True)
    return remote_class.options(
        name=actor_name,
        namespace=NAMESPACE,
        lifetime="detached",
        max_restarts=-1,
        max_task_retries=-1,
        **options,
    ).remote(None, agent_class, settings.model_dump(), None, None, None)
