"""The `self.context` object an agent uses to reach the runtime."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import ray

from arbor.config import Settings, get_settings
from arbor.errors import InvalidArguments, InvalidTopicName
from arbor.names import namespace_of, qualify, qualify_pattern, qualify_principal
from arbor.runtime.ref import AgentRef, registry_handle
from arbor.runtime.timers import Timers

if TYPE_CHECKING:
    from arbor.agent import Agent
    from arbor.registry.reminder_spec import ReminderInfo
    from arbor.registry.security import CapabilityInfo
    from arbor.runtime.cell import AgentCell
    from arbor.security.secrets import Secret, SecretProvider

# Seconds an agent waits for the registry to spawn or stop another agent.
_REGISTRY_CALL_TIMEOUT_S = 120.0

# One secret provider per process, opened at the first secret read.
_provider: SecretProvider | None = None
_provider_lock = threading.Lock()


class RuntimeContext:
    """Implements `arbor.agent.AgentContext` for an agent running in a cell."""

    def __init__(
        self,
        name: str,
        settings: Settings | None = None,
        self_route: Callable[[], Any] | None = None,
    ) -> None:
        self._name = name
        self._settings = settings
        # Returns the handle whose ``handle.remote(wire)`` reaches this agent's mailbox;
        # None means the agent's own dedicated actor.
        self._self_route = self_route
        self._cell: AgentCell | None = None
        self._timers: Timers | None = None

    def attach(self, cell: AgentCell) -> None:
        """Bind the context to the cell that runs the agent, once it exists."""
        self._cell = cell

    @property
    def name(self) -> str:
        return self._name

    @property
    def incarnation(self) -> int:
        return self._cell.epoch if self._cell is not None else 0

    @property
    def capabilities(self) -> list[CapabilityInfo]:
        """Return the live capabilities this agent holds, read from the store."""
        from arbor.registry.security import CapabilityInfo

        cell = self._require_cell()
        if cell.guard is None:
            return []
        records = cell.guard.store.list_capabilities(self._name)
        return [CapabilityInfo.from_record(record) for record in records]

    @property
    def namespace(self) -> str:
        """The namespace of this agent, which the names it passes are relative to."""
        return namespace_of(self._name)

    def get(self, name: str) -> AgentRef:
        """Return a reference to another agent; its messages name this agent as sender.

        ``name`` is relative to this agent's namespace unless it names one, such as
        ``team-b:counter``; reaching another namespace needs a capability that names it.
        """
        return AgentRef(qualify(name, self.namespace), sender=self._name, origin=self._cell)

    def spawn(
        self,
        agent_class: type[Agent],
        name: str,
        capabilities: list[Any] | None = None,
        **kwargs: Any,
    ) -> AgentRef:
        """Spawn another agent through the registry and return its reference.

        Needs ``arbor://agent/spawn/<name>``. Each of ``capabilities`` must be a narrowing
        of one this agent holds with delegation depth left; the new agent gets it.
        """
        from arbor.registry.spec import build_spawn_spec

        name = qualify(name, self.namespace)
        spec = build_spawn_spec(agent_class, name, (), {**kwargs, "capabilities": capabilities})
        # Birth capabilities are relative to the new agent's namespace, where it lives.
        spec.capabilities = [
            replace(request, pattern=qualify_pattern(request.pattern, namespace_of(name)))
            for request in spec.capabilities
        ]
        spec.spawner = self._name
        spec.token = self._token_for(f"arbor://agent/spawn/{name}")
        _call(registry_handle().spawn.remote(spec))
        return AgentRef(name, sender=self._name, origin=self._cell)

    def stop(self, name: str, purge: bool = False) -> None:
        """Stop another agent through the registry; needs ``arbor://agent/stop/<name>``."""
        name = qualify(name, self.namespace)
        token = self._token_for(f"arbor://agent/stop/{name}")
        _call(registry_handle().stop.remote(name, purge, self._name, token))

    def delegate(
        self,
        capability_id: str,
        to: str,
        pattern: str | None = None,
        **terms: Any,
    ) -> CapabilityInfo:
        """Give ``to`` a narrower copy of a capability this agent holds.

        Args:
            capability_id: the id of the capability held (see `capabilities`).
            to: the principal that receives it.
            pattern: a narrower pattern; None keeps the held one.
            **terms: ``operations``, ``expires_at``, ``max_uses``, ``allowed_callers``,
                ``depth``; each may only narrow.

        Raises:
            CapabilityDenied: the capability is not held, revoked, expired, has no depth
                left, or the request widens it.
        """
        from arbor.registry.security import GrantRequest

        request = None
        to = qualify_principal(to, self.namespace)
        if pattern is not None:
            pattern = qualify_pattern(pattern, self.namespace)
        held = pattern or self._pattern_of(capability_id)
        if held is not None and (pattern is not None or terms):
            request = GrantRequest.parse({"pattern": held, **terms})
        result: CapabilityInfo = _call(
            registry_handle().delegate.remote(self._name, capability_id, to, request)
        )
        return result

    def revoke(self, capability_id: str) -> list[str]:
        """Revoke a capability this agent holds or delegated; returns the revoked ids."""
        result: list[str] = _call(registry_handle().revoke.remote(capability_id, self._name))
        return result

    def secret(self, path: str) -> Secret:
        """Read a secret such as ``db/password``; needs ``arbor://secret/read/<path>``.

        Returns:
            A `Secret`, whose repr hides the value; call ``reveal()`` for the text.

        Raises:
            CapabilityDenied: this agent holds no capability to read the path.
            SecretNotFound: no provider has the secret.
        """
        from arbor.security.secrets import provider_from_settings

        global _provider
        uri = f"arbor://secret/read/{path}"
        cell = self._require_cell()
        if cell.guard is not None:
            cell.guard.require(self._token_for(uri), self._name, uri)
        with _provider_lock:
            if _provider is None:
                _provider = provider_from_settings(self._settings)
            provider = _provider
        return provider.read(path)

    def schedule(
        self,
        handler: Any,
        *args: Any,
        delay: float | None = None,
        every: float | None = None,
        **kwargs: Any,
    ) -> str:
        """Send this agent ``handler(*args, **kwargs)`` after ``delay`` s, and/or every ``every`` s.

        A timer lives in memory until it is cancelled, the agent stops, or its process
        ends: a restarted incarnation has no timers until it schedules them again, for
        example in ``on_start``. Each firing is a message through the agent's own actor,
        so it waits its turn behind messages already queued. A periodic timer whose
        previous firing has not been handled yet skips the tick instead of queueing more.

        Args:
            handler: the name of a public handler of this agent, or the bound method.
            *args: positional arguments for the handler.
            delay: seconds until the first firing; default one period.
            every: the period in seconds; None fires once.
            **kwargs: keyword arguments for the handler (``delay`` and ``every`` are taken).

        Returns:
            The timer id, for `cancel_timer`.

        Raises:
            UnknownHandler: the agent has no such public handler.
            InvalidArguments: ``delay`` or ``every`` is negative, not a number, or missing.
        """
        from arbor.agent import resolve_handler
        from arbor.errors import UnknownHandler

        cell = self._require_cell()
        name = handler
        if callable(handler) and not isinstance(handler, str):
            if getattr(handler, "__self__", None) is not cell.agent:
                raise InvalidArguments(
                    f"agent {self._name!r} cannot schedule {handler!r}; pass the name of one "
                    "of its handlers, or a bound method of the agent such as self.tick"
                )
            name = handler.__name__
        try:
            resolve_handler(cell.agent, name)
        except UnknownHandler as error:
            raise UnknownHandler(f"agent {self._name!r} cannot schedule a timer: {error}") from None
        return self._timer_scheduler().schedule(name, args, kwargs, delay, every)

    def cancel_timer(self, timer_id: str) -> bool:
        """Cancel a timer; returns whether it was scheduled.

        A firing already sent to the mailbox still runs.
        """
        if self._timers is None:
            return False
        return self._timers.cancel(timer_id)

    def remind(
        self,
        name: str,
        *,
        at: Any = None,
        delay: float | None = None,
        every: float | None = None,
        payload: Any = None,
    ) -> ReminderInfo:
        """Set a durable reminder, delivered as ``on_reminder(name, payload)`` to this agent.

        The reminder is stored and fired by the registry, so it survives crashes, node
        loss and a new Ray cluster on the same database. Setting a name again replaces the
        reminder. A firing missed while the agent or the cluster was down is delivered
        once on recovery, and a periodic reminder then continues at the next period of its
        original schedule.

        Args:
            name: unique among this agent's reminders.
            at: when to fire: a timezone-aware datetime or Unix seconds.
            delay: seconds from now until it fires; give ``at`` or ``delay``, not both.
            every: the period in seconds, at least ``ARBOR_REMINDER_MIN_PERIOD_S``; without
                ``at`` or ``delay`` the first firing is one period from now.
            payload: a JSON value of at most 64 KiB, passed to ``on_reminder``.

        Raises:
            UnknownHandler: the agent class has no ``on_reminder`` handler.
            InvalidArguments: a time, period, name or payload is invalid.
        """
        from arbor.agent import handler_names
        from arbor.errors import UnknownHandler
        from arbor.registry.reminder_spec import REMINDER_HANDLER, ReminderRequest

        cell = self._require_cell()
        agent_class = type(cell.agent).__name__
        if REMINDER_HANDLER not in handler_names(type(cell.agent)):
            raise UnknownHandler(
                f"agent {self._name!r} cannot set reminder {name!r}: {agent_class} has no "
                f"handler {REMINDER_HANDLER}; define {REMINDER_HANDLER}(self, name, payload) "
                f"on {agent_class} to receive reminders"
            )
        settings = self._settings or get_settings()
        request = ReminderRequest.parse(
            self._name, name, at, delay, every, payload, settings.reminder_min_period_s
        )
        result: ReminderInfo = _call(
            registry_handle().set_reminder.remote(self._name, request, self._name)
        )
        return result

    def reminders(self) -> list[ReminderInfo]:
        """Return this agent's reminders, soonest first."""
        result: list[ReminderInfo] = _call(
            registry_handle().reminders.remote(self._name, self._name)
        )
        return result

    def cancel_reminder(self, name: str) -> bool:
        """Delete one of this agent's reminders; returns whether it existed.

        A delivery that the registry already sent still reaches the agent.
        """
        result: bool = _call(registry_handle().cancel_reminder.remote(self._name, name, self._name))
        return result

    def publish(self, topic: str, event: Any) -> int:
        """Publish a JSON ``event`` to ``topic``; needs ``arbor://topic/publish/<topic>``.

        The event is stored in the topic's log when this returns, and the registry
        delivers it to each subscriber in the order published. Returns its seq.

        Raises:
            CapabilityDenied: this agent has no capability to publish to the topic.
            InvalidTopicName: the topic name is invalid.
            InvalidArguments: the event is not JSON or is larger than 256 KiB.
        """
        from arbor.runtime import topics

        return topics.publish(self._require_cell(), self._topic(topic), event)

    def subscribe(self, topic: str, handler: Any, *, max_lag: int | None = None) -> Any:
        """Deliver each later event of ``topic`` to ``handler(topic, event)`` of this agent.

        The subscription is stored, so it survives restarts of the agent and of the
        cluster; subscribing again changes the handler and keeps the position. Needs
        ``arbor://topic/subscribe/<topic>``. Returns an `arbor.SubscriptionInfo`.

        Args:
            topic: the topic name.
            handler: the name of a public handler, or the bound method.
            max_lag: events this agent may fall behind before the oldest are skipped;
                default ``ARBOR_TOPIC_MAX_LAG``.

        Raises:
            CapabilityDenied: this agent has no capability to subscribe to the topic.
            UnknownHandler: the agent has no such public handler.
            InvalidArguments: the handler cannot take ``(topic, event)``, or ``max_lag``
                is not a positive integer.
        """
        from arbor.runtime import topics

        return topics.subscribe(self._require_cell(), self._topic(topic), handler, max_lag, _call)

    def unsubscribe(self, topic: str) -> bool:
        """Stop deliveries of ``topic`` to this agent; returns whether it was subscribed.

        A delivery that the registry already sent still reaches the agent.
        """
        from arbor.runtime import topics

        return topics.unsubscribe(self._require_cell(), self._topic(topic), _call)

    def _topic(self, topic: str) -> str:
        """Return the full name of a topic named in this agent's namespace."""
        return qualify(topic, self.namespace, InvalidTopicName)

    async def checkpoint(self) -> int:
        """Commit the agent's state now, from inside a handler; returns the version."""
        if self._cell is None:
            raise RuntimeError(f"agent {self._name!r} is still starting; checkpoint after __init__")
        return await self._cell.checkpoint()

    def _require_cell(self) -> AgentCell:
        if self._cell is None:
            raise RuntimeError(
                f"agent {self._name!r} is still starting; use the context after __init__"
            )
        return self._cell

    def _timer_scheduler(self) -> Timers:
        if self._timers is None:
            # The agent's own actor, so a firing queues behind messages already sent to it.
            if self._self_route is not None:
                handle = self._self_route()
            else:
                handle = ray.get_runtime_context().current_actor
            self._timers = Timers(
                self._name,
                send=lambda envelope: handle.handle.remote(envelope.to_wire()),
                is_done=lambda reply: bool(ray.wait([reply], timeout=0)[0]),
                is_alive=self._is_alive,
            )
        return self._timers

    def _is_alive(self) -> bool:
        cell = self._cell
        return cell is None or not (cell.stopped or cell.fenced)

    def _token_for(self, uri: str) -> str | None:
        cell = self._cell
        if cell is None or cell.wallet is None:
            return None
        return cell.wallet.token_for(uri)

    def _pattern_of(self, capability_id: str) -> str | None:
        for info in self.capabilities:
            if info.id == capability_id:
                return info.pattern
        # Not held: the registry denies the delegation and audits it.
        return None


def _call(object_ref: Any) -> Any:
    """Wait for a registry call and raise an Arbor error as itself, not wrapped by Ray."""
    from ray.exceptions import RayTaskError

    from arbor.errors import ArborError

    try:
        return ray.get(object_ref, timeout=_REGISTRY_CALL_TIMEOUT_S)
    except RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, ArborError):
            raise cause from None
        raise
