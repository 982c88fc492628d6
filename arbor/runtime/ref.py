"""`AgentRef`, the handle through which clients and agents message an agent by name."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
import uuid
from typing import Any

import ray
from ray.exceptions import ActorUnschedulableError, GetTimeoutError, RayActorError

from arbor.config import NAMESPACE, REGISTRY_NAME, get_settings
from arbor.errors import (
    AgentNotFound,
    AgentOverloaded,
    AskTimeout,
    ClusterLeaseLost,
    ClusterUnavailable,
    HandlerError,
    InvalidArguments,
    UnknownHandler,
)
from arbor.messages import Envelope, Reply, new_message_id
from arbor.runtime import kv
from arbor.runtime.cell import CAPABILITY_HEADER, running_cell
from arbor.runtime.telemetry import outgoing_headers

logger = logging.getLogger(__name__)

# Seconds between lookups while an agent's actor is missing (being recreated by the
# reconciler, or restarting on another node).
_RESOLVE_POLL_S = 0.2

# Errors that mean this actor will not reply again. The agent is then looked up anew,
# because the reconciler replaces an actor that is dead or pinned to a node that is gone.
_ACTOR_LOST = (RayActorError, ActorUnschedulableError)

# Seconds a registry lookup may take before the caller gives up on it.
_REGISTRY_TIMEOUT_S = 30.0


class _BoundMethod:
    """A host actor method with the agent's name bound as its first argument."""

    __slots__ = ("_method", "_name")

    def __init__(self, method: Any, name: str) -> None:
        self._method = method
        self._name = name

    def remote(self, *args: Any) -> Any:
        return self._method.remote(self._name, *args)


# The envelope header that numbers a process's messages to one hosted agent, as
# "<stream>:<n>". A host is an async Ray actor, which may start calls out of submission
# order, so the host puts each agent's messages from one stream back in order by it.
SEQUENCE_HEADER = "arbor-seq"

# The envelope header that marks a message `AgentRef.ask` resends itself. A host that no
# longer runs the agent replies "moved" to such a message instead of forwarding it.
REROUTE_HEADER = "arbor-reroute"

# This process's stream id and, per hosted agent it sends to, the stream its messages are
# numbered in and the next number. A route change starts a new stream at 0, because the
# new host keeps back a message numbered above what it expects for up to SEQUENCE_GAP_S.
_stream = uuid.uuid4().hex[:16]
_sequence_lock = threading.Lock()
_next_sequence: dict[str, tuple[str, int]] = {}
_stream_restarts = itertools.count(1)


class _SequencedDelivery:
    """A host's ``deliver`` method for one agent, which numbers the messages it submits."""

    __slots__ = ("_method", "_name")

    def __init__(self, method: Any, name: str) -> None:
        self._method = method
        self._name = name

    def remote(self, wire: Any, reroute: bool = False) -> Any:
        # The lock spans the submission, so numbers follow this process's submission order.
        with _sequence_lock:
            stream, number = _next_sequence.get(self._name, (_stream, 0))
            _next_sequence[self._name] = (stream, number + 1)
            headers = {**wire[7], SEQUENCE_HEADER: f"{stream}:{number}"}
            if reroute:
                headers[REROUTE_HEADER] = "1"
            return self._method.remote(self._name, (*wire[:7], headers, *wire[8:]))


class HostedRoute:
    """Stands in for a dedicated agent actor's handle when the agent runs in a host actor.

    ``handle``, ``info`` and ``stop`` take the same arguments as the dedicated actor's
    methods, so callers of either placement submit messages the same way.
    """

    def __init__(self, host: Any, name: str, host_name: str = "") -> None:
        self.host = host
        self.name = name
        # The host's Ray name, to drop its cached handle when Ray reports it lost.
        self.host_name = host_name
        self.handle = _SequencedDelivery(host.deliver, name)
        self.info = _BoundMethod(host.agent_info, name)
        self.stop = _BoundMethod(host.stop_agent, name)


def restart_sequence(name: str) -> None:
    """Number this process's next messages to agent ``name`` in a new stream from 0."""
    with _sequence_lock:
        if name in _next_sequence:
            _next_sequence[name] = (f"{_stream}.{next(_stream_restarts)}", 0)


# Handles of host actors by Ray name. Hosts live long and serve many agents, so the
# lookup is done once per process; a handle found dead is dropped by `forget_host`.
_host_handles: dict[str, Any] = {}


def host_handle(host: str) -> Any:
    """Return the handle of host actor ``host``.

    Raises:
        ValueError: no actor has this name.
    """
    handle = _host_handles.get(host)
    if handle is None:
        handle = _host_handles[host] = ray.get_actor(host, namespace=NAMESPACE)
    return handle


def forget_host(host: str) -> None:
    """Drop the cached handle of a host that Ray reported lost."""
    _host_handles.pop(host, None)


def route_to(name: str, actor: Any, placement: str | None) -> Any:
    """Return what messages to agent ``name`` are submitted to, given its Ray actor's handle."""
    if placement == "hosted":
        return HostedRoute(actor, name, _host_name(actor))
    return actor


def _host_name(handle: Any) -> str:
    for host, cached in _host_handles.items():
        if cached is handle:
            return host
    return ""


class LocalRoute:
    """Delivery to an agent in the calling process's host, without Ray; see `arbor.runtime.host`."""

    def ask(self, envelope: Envelope, timeout: float) -> Any:
        raise NotImplementedError

    async def ask_async(self, envelope: Envelope, timeout: float) -> Any:
        raise NotImplementedError

    def send(self, envelope: Envelope) -> Any:
        """Post the message; returns a future that is done once the agent handled it."""
        raise NotImplementedError

    def post_ask(self, envelope: Envelope, timeout: float) -> tuple[Any, Any] | None:
        """Post an ask from the route's own event loop; returns its future and a function.

        None means the caller is elsewhere and uses `ask_async`. The future's result goes
        to `ask_outcome`. Once the future is done, the caller passes it to the function,
        which ends the ask's timeout.
        """
        return None

    def ask_outcome(self, envelope: Envelope, timeout: float, reply: Any) -> Any:
        """Return the reply of an ask posted with `post_ask`."""
        raise NotImplementedError


# Set by a host actor's process: returns the local route to an agent that the host runs,
# or None. Other processes have none and always go through Ray.
_local_router: Any = None

# Marks an argument not passed, where None is a value.
_UNSET: Any = object()


def local_route(name: str) -> LocalRoute | None:
    """Return the in-process route to agent ``name`` when this process's host runs it."""
    if _local_router is None or _pending.limited(name):
        return None
    route: LocalRoute | None = _local_router(name)
    return route


def set_local_router(router: Any) -> None:
    """Install the function that finds agents of this process's host (None removes it)."""
    global _local_router
    _local_router = router


class AgentRef:
    """A reference to an agent by name; cheap to create, safe to pass between processes.

    Example:
        >>> ref = arbor.get("c1")
        >>> ref.ask("add", 3)
        8
    """

    def __init__(
        self, name: str, sender: str | None = None, handle: Any = None, origin: Any = None
    ) -> None:
        self._name = name
        self._sender = sender
        self._handle = handle
        # The sending agent's cell, inside an agent: it names the messages and keeps
        # sends in its outbox. Not pickled, so a reference passed on starts plain.
        self._origin = origin
        # True once an actor of the agent was lost: later lookups ask the registry first.
        self._relocating = False

    @property
    def name(self) -> str:
        """The agent's full name, such as ``team-a:counter`` (no prefix in ``default``)."""
        return self._name

    def ask(
        self,
        handler: str,
        *args: Any,
        timeout: float | None = None,
        message_id: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Send a message and wait for the handler's return value.

        Args:
            handler: name of a public method of the agent.
            *args: positional arguments for the handler.
            timeout: seconds to wait; defaults to ``ARBOR_ASK_TIMEOUT_S``.
            message_id: idempotency key; reusing one returns the first reply without
                applying the message again.
            **kwargs: keyword arguments for the handler.

        Raises:
            HandlerError: the handler raised; the agent keeps running.
            UnknownHandler: no public handler has that name.
            InvalidArguments: the arguments do not fit the handler's signature.
            AskTimeout: no reply within ``timeout``.
            AgentNotFound: the agent does not exist or was stopped.
        """
        _check_timeout(timeout)
        envelope = self._envelope("ask", handler, args, kwargs, message_id)
        seconds = timeout if timeout is not None else _default_timeout()
        local = self._local()
        if local is not None:
            return self._unwrap(handler, local.ask(envelope, seconds))
        deadline = time.monotonic() + seconds
        rerouted = False
        while True:
            actor = self._resolve(deadline)
            object_ref = self._submit(actor, envelope, reroute=not rerouted)
            try:
                reply = ray.get(object_ref, timeout=max(deadline - time.monotonic(), 0.0))
            except GetTimeoutError:
                raise AskTimeout(
                    self._timeout_message(handler, timeout, envelope.message_id)
                ) from None
            except _ACTOR_LOST as error:
                self._lost_actor(error)
                continue
            if _moved(reply) and not rerouted:
                self._moved_agent(reply)
                rerouted = True
                continue
            return self._unwrap(handler, reply)

    async def ask_async(
        self,
        handler: str,
        *args: Any,
        timeout: float | None = None,
        message_id: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Awaitable `ask`, for async handlers and other asyncio code."""
        if timeout is None:
            seconds = _default_timeout()
        else:
            _check_timeout(timeout)
            seconds = timeout
        origin = self._sending_origin()
        envelope = self._envelope("ask", handler, args, kwargs, message_id, origin)
        local = self._local(origin)
        if local is not None:
            posted = local.post_ask(envelope, seconds)
            if posted is not None:
                # On the host's own loop, await the message's future here, which saves a
                # coroutine per ask on the busiest path between agents.
                future, unwatch = posted
                try:
                    reply = await future
                finally:
                    unwatch(future)
                return self._unwrap(handler, local.ask_outcome(envelope, seconds, reply))
            return self._unwrap(handler, await local.ask_async(envelope, seconds))
        deadline = time.monotonic() + seconds
        rerouted = False
        while True:
            actor = self._handle
            if actor is None:
                # A lookup waits for the GCS and the registry. A thread keeps the caller's
                # event loop free meanwhile, which matters in a host shared by many agents.
                actor = await asyncio.to_thread(self._resolve_for_submit, deadline)
            object_ref = self._submit(actor, envelope, reroute=not rerouted)
            try:
                reply = await asyncio.wait_for(
                    object_ref, timeout=max(deadline - time.monotonic(), 0.0)
                )
            except asyncio.TimeoutError:
                raise AskTimeout(
                    self._timeout_message(handler, timeout, envelope.message_id)
                ) from None
            except _ACTOR_LOST as error:
                self._lost_actor(error)
                await asyncio.sleep(_RESOLVE_POLL_S)
                continue
            if _moved(reply) and not rerouted:
                self._moved_agent(reply)
                rerouted = True
                continue
            return self._unwrap(handler, reply)

    def send(self, handler: str, *args: Any, message_id: str | None = None, **kwargs: Any) -> str:
        """Send a message without waiting; returns its message id.

        Ray resubmits the message if the agent's process crashes before applying it, while
        this caller's process lives, and the agent applies a message id at most once
        within its ``ARBOR_DEDUP_WINDOW``.
        """
        envelope = self._envelope("send", handler, args, kwargs, message_id)
        # NOTE: a send through a route cached before a hosted agent moved goes to the old
        # host, which forwards it (one extra hop) until an ask of this reference or a lost
        # actor makes it look the agent up again.
        origin = self._sending_origin()
        if origin is not None and origin.stage_send(self._name, envelope):
            return envelope.message_id
        local = self._local()
        if local is not None:
            local.send(envelope)
            return envelope.message_id
        actor = self._resolve(time.monotonic() + _default_timeout())
        self._submit(actor, envelope)
        return envelope.message_id

    def _local(self, origin: Any = _UNSET) -> LocalRoute | None:
        """Return the in-process route when the sender and the agent share a host.

        Agents with a ``max_pending`` limit always go through Ray, where the limit counts
        the unfinished messages. ``origin`` is the `_sending_origin` when known.
        """
        if _local_router is None:
            return None
        if origin is _UNSET:
            origin = self._sending_origin()
        if origin is None:
            return None
        return local_route(self._name)

    def _submit(self, actor: Any, envelope: Envelope, reroute: bool = False) -> Any:
        """Submit the message, or raise `AgentOverloaded` when the agent's limit is reached.

        With ``reroute``, a host that no longer runs the agent replies "moved" rather than
        forwarding the message, and the caller resends it to the agent's current host.
        """
        limit = _pending.admit(self._name)
        object_ref = None
        try:
            if reroute and isinstance(actor, HostedRoute):
                object_ref = actor.handle.remote(envelope.to_wire(), True)
            else:
                object_ref = actor.handle.remote(envelope.to_wire())
        finally:
            if limit is not None:
                _pending.track(self._name, object_ref)
        return object_ref

    def info(self, timeout: float = 30.0) -> dict[str, Any]:
        """Return the running incarnation's process id, node, epoch and checkpoint version."""
        deadline = time.monotonic() + timeout
        while True:
            actor = self._resolve(deadline)
            try:
                result: dict[str, Any] = ray.get(
                    actor.info.remote(), timeout=max(deadline - time.monotonic(), 0.0)
                )
                return result
            except GetTimeoutError:
                raise AskTimeout(
                    f"agent {self._name!r} did not report its info in {timeout} s"
                ) from None
            except _ACTOR_LOST as error:
                self._lost_actor(error)

    def __reduce__(self) -> tuple[Any, ...]:
        return (AgentRef, (self._name, self._sender))

    def __repr__(self) -> str:
        return f"AgentRef({self._name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AgentRef) and other._name == self._name

    def __hash__(self) -> int:
        return hash(("AgentRef", self._name))

    def _envelope(
        self,
        kind: Any,
        handler: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        message_id: str | None,
        origin: Any = _UNSET,
    ) -> Envelope:
        if origin is _UNSET:
            origin = self._sending_origin()
        sender = origin.name if origin is not None else self._sender
        if message_id is None:
            message_id = origin.next_message_id() if origin is not None else new_message_id()
        elif type(message_id) is not str or not message_id:
            raise InvalidArguments(
                f"message_id={message_id!r} is invalid; pass a non-empty string, or None for "
                "a new id"
            )
        envelope = Envelope(handler, args, kwargs, kind, message_id, sender)
        trace_headers = outgoing_headers()
        if trace_headers:
            envelope.headers.update(trace_headers)
        if origin is not None:
            token = origin.credential(kind, self._name)
            if token is not None:
                envelope.headers[CAPABILITY_HEADER] = token
        return envelope

    def _sending_origin(self) -> Any:
        """Return the agent this reference sends as: its own origin, else the running one.

        A reference made or received inside a handler sends as the running agent.
        """
        return self._origin if self._origin is not None else running_cell()

    def _resolve(self, deadline: float) -> Any:
        """Return the agent's actor handle, waiting while a recreation is under way.

        Raises:
            ClusterUnavailable: this process is not connected to Ray, as after
                `arbor.shutdown`. Ray would otherwise start a new local cluster.
        """
        if not ray.is_initialized():
            raise ClusterUnavailable(
                f"Arbor is not connected, so agent {self._name!r} cannot be reached; call "
                "arbor.init() first"
            )
        if self._handle is not None:
            return self._handle
        while True:
            # After a lost actor the registry decides: an agent moved off a lost node runs
            # under another Ray name, while the old actor may keep the agent's name.
            if not self._relocating:
                try:
                    self._handle = ray.get_actor(self._name, namespace=NAMESPACE)
                    return self._handle
                except ValueError:
                    pass
            located = locate(self._name)
            if located is None:
                raise AgentNotFound(self._name)
            if "lease_holder" in located:
                raise ClusterLeaseLost(located["cluster_id"], located["lease_holder"])
            status, actor = located["status"], located["actor"]
            if (self._relocating or actor != self._name) and status in ("running", "starting"):
                # The agent runs in a warm, moved or host actor, which has a Ray name of its
                # own, or its old actor was lost and the registry names the current one.
                try:
                    if located.get("placement") == "hosted":
                        handle = host_handle(actor)
                    else:
                        handle = ray.get_actor(actor, namespace=NAMESPACE)
                    self._handle = route_to(self._name, handle, located.get("placement"))
                    return self._handle
                except ValueError:
                    pass
            if status == "stopped":
                raise AgentNotFound(
                    self._name,
                    f"it is stopped; spawn it again after arbor.stop({self._name!r}, purge=True)",
                )
            if status == "failed":
                raise AgentNotFound(
                    self._name, "its recreation failed; arbor.list_agents() shows the error"
                )
            if time.monotonic() >= deadline:
                raise AskTimeout(
                    f"agent {self._name!r} is registered but has no running actor yet; the "
                    "reconciler recreates it, so retry shortly or check `arbor status`"
                )
            time.sleep(_RESOLVE_POLL_S)

    def _resolve_for_submit(self, deadline: float) -> Any:
        """Resolve the actor and read the agent's mailbox limit, both of which may block."""
        actor = self._resolve(deadline)
        _pending.limited(self._name)
        return actor

    def _lost_actor(self, error: Exception) -> None:
        logger.info(
            "agent %s actor is gone (%s); looking it up again", self._name, type(error).__name__
        )
        if isinstance(self._handle, HostedRoute):
            forget_host(self._handle.host_name)
            restart_sequence(self._name)
        self._handle = None
        self._relocating = True

    def _moved_agent(self, reply: Reply) -> None:
        """Drop the cached route of an agent whose old host replied that it moved.

        The caller resends the same envelope once, to the host the registry names now; the
        message id makes the agent apply it at most once. The old host did not run it.
        """
        reason = reply.error.message if reply.error is not None else "moved"
        logger.info("agent %s: %s; looking it up again", self._name, reason)
        restart_sequence(self._name)
        self._handle = None
        self._relocating = True

    def _unwrap(self, handler: str, reply: Any) -> Any:
        if not isinstance(reply, Reply):
            return reply
        error = reply.error
        if error is None:
            return reply.value
        if reply.exception is not None:
            raise reply.exception
        if error.kind == "unknown_handler":
            raise UnknownHandler(error.message)
        if error.kind == "invalid_arguments":
            raise InvalidArguments(f"agent {self._name!r} handler {handler!r}: {error.message}")
        if error.kind == "timeout":
            raise AskTimeout(error.message)
        if error.kind == "stopped":
            self._handle = None
            raise AgentNotFound(self._name, error.message)
        raise HandlerError(self._name, handler, error.error_type, error.message, error.traceback)

    def _timeout_message(self, handler: str, timeout: float | None, message_id: str) -> str:
        seconds = timeout if timeout is not None else _default_timeout()
        return (
            f"agent {self._name!r} handler {handler!r} did not reply within {seconds} s; the "
            f"message may still be applied, so retry with message_id={message_id!r} to apply "
            "it at most once"
        )


class _PendingMessages:
    """The unfinished messages this process sent to agents that have a ``max_pending`` limit.

    Ray queues an actor's calls inside its process, where neither the agent nor other
    senders can count them, so each sending process counts its own messages.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._limits: dict[str, int | None] = {}
        self._refs: dict[str, list[Any]] = {}
        # Places taken by threads that passed `admit` and have not submitted yet.
        self._reserved: dict[str, int] = {}

    def admit(self, name: str) -> int | None:
        """Reserve a place and return the agent's limit, or None when it has none.

        Raises:
            AgentOverloaded: the limit is reached; nothing is reserved.
        """
        limit = self._limit(name)
        if limit is None:
            return None
        with self._lock:
            refs = self._refs.get(name, [])
            reserved = self._reserved.get(name, 0)
            if len(refs) + reserved >= limit:
                _, refs = ray.wait(refs, num_returns=len(refs), timeout=0)
                self._refs[name] = refs
            if len(refs) + reserved >= limit:
                raise AgentOverloaded(name, limit)
            self._reserved[name] = reserved + 1
        return limit

    def track(self, name: str, object_ref: Any | None) -> None:
        """Turn a reservation into the submitted message's reference, or free it on None."""
        with self._lock:
            self._reserved[name] -= 1
            if object_ref is not None:
                self._refs.setdefault(name, []).append(object_ref)

    def limited(self, name: str) -> bool:
        """Return whether messages to agent ``name`` have a ``max_pending`` limit."""
        return self._limit(name) is not None

    def _limit(self, name: str) -> int | None:
        if name not in self._limits:
            # Read once per agent and process: the limit is fixed at spawn.
            value = kv.get(kv.max_pending_key(name)) if ray.is_initialized() else None
            self._limits[name] = int(value) if value else None
        return self._limits[name]


_pending = _PendingMessages()


def reset_process_state() -> None:
    """Drop this process's mailbox counts and message numbering when it leaves a Ray session."""
    global _pending, _stream
    _pending = _PendingMessages()
    _host_handles.clear()
    with _sequence_lock:
        _stream = uuid.uuid4().hex[:16]
        _next_sequence.clear()


def _moved(reply: Any) -> bool:
    return isinstance(reply, Reply) and reply.error is not None and reply.error.kind == "moved"


def _check_timeout(timeout: float | None) -> None:
    if timeout is None:
        return
    # A bool is an int to Python, and infinity would overflow Ray's wait.
    number = isinstance(timeout, int | float) and not isinstance(timeout, bool)
    if not number or not 0 < timeout < math.inf:
        raise InvalidArguments(
            f"timeout={timeout!r} is invalid; pass a finite number of seconds > 0, or None "
            "for ARBOR_ASK_TIMEOUT_S"
        )


def _default_timeout() -> float:
    return get_settings().ask_timeout_s


def registry_handle() -> Any:
    """Return the registry actor's handle.

    Raises:
        ValueError: no registry is running in this Ray cluster.
    """
    return ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)


def locate(name: str) -> dict[str, str] | None:
    """Ask the registry for an agent's status and Ray actor name; None if it has no record."""
    try:
        registry = registry_handle()
    except ValueError:
        return None
    located: dict[str, str] | None = ray.get(
        registry.locate.remote(name), timeout=_REGISTRY_TIMEOUT_S
    )
    return located


def find_actor(name: str) -> Any:
    """Return the handle of the actor that runs agent ``name``, or None if none runs it."""
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        pass
    located = locate(name)
    if located is None or located["actor"] == name:
        return None
    placement = located.get("placement")
    try:
        if placement == "hosted":
            handle = host_handle(located["actor"])
        else:
            handle = ray.get_actor(located["actor"], namespace=NAMESPACE)
    except ValueError:
        return None
    return route_to(name, handle, placement)
