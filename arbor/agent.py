"""The `Agent` base class that user agents extend."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable


class AgentContext(Protocol):
    """The runtime interface an agent reaches through ``self.context``.

    The runtime provides the implementation; this protocol fixes its surface.
    """

    @property
    def name(self) -> str:
        """The agent's cluster-wide name."""

    @property
    def incarnation(self) -> int:
        """The epoch of the running incarnation; it grows on every restart."""

    @property
    def capabilities(self) -> list[Any]:
        """Return the live capabilities this agent holds, as `arbor.CapabilityInfo`."""

    def get(self, name: str) -> Any:
        """Return an `AgentRef` to another agent; messages carry this agent as sender."""

    def spawn(
        self,
        agent_class: type[Agent],
        name: str,
        capabilities: list[Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Spawn another agent, granting it narrower copies of capabilities this one holds."""

    def stop(self, name: str, purge: bool = False) -> None:
        """Stop another agent."""

    def delegate(
        self, capability_id: str, to: str, pattern: str | None = None, **terms: Any
    ) -> Any:
        """Give another principal a narrower copy of a capability this agent holds."""

    def revoke(self, capability_id: str) -> list[str]:
        """Revoke a capability this agent holds or delegated, and all delegated from it."""

    def secret(self, path: str) -> Any:
        """Read a secret such as ``db/password``; returns an `arbor.security.secrets.Secret`."""

    async def checkpoint(self) -> int:
        """Commit a checkpoint now, in the middle of a handler; returns its version."""

    def schedule(
        self,
        handler: Any,
        *args: Any,
        delay: float | None = None,
        every: float | None = None,
        **kwargs: Any,
    ) -> str:
        """Start an in-memory timer that sends this agent ``handler``; returns its id."""

    def cancel_timer(self, timer_id: str) -> bool:
        """Cancel a timer; returns whether it was scheduled."""

    def remind(
        self,
        name: str,
        *,
        at: Any = None,
        delay: float | None = None,
        every: float | None = None,
        payload: Any = None,
    ) -> Any:
        """Set a durable reminder, delivered to ``on_reminder(name, payload)``."""

    def reminders(self) -> list[Any]:
        """Return this agent's reminders as `arbor.ReminderInfo`, soonest first."""

    def cancel_reminder(self, name: str) -> bool:
        """Delete one of this agent's reminders; returns whether it existed."""

    def publish(self, topic: str, event: Any) -> int:
        """Publish a JSON event to ``topic``; returns its seq in the topic."""

    def subscribe(self, topic: str, handler: Any, *, max_lag: int | None = None) -> Any:
        """Deliver later events of ``topic`` to ``handler(topic, event)``, durably."""

    def unsubscribe(self, topic: str) -> bool:
        """Stop deliveries of ``topic`` to this agent; returns whether it was subscribed."""


class Agent:
    """Base class of a stateful agent; each public method is a message handler.

    An agent's state is whatever `snapshot` returns: by default its public attributes.
    State must be JSON: dicts with string keys, lists, strings, finite numbers, booleans
    and None. After a crash, Arbor builds the instance without calling ``__init__`` and
    passes the last checkpoint to `restore`. Put set-up that every incarnation needs (open
    clients, caches) in `on_start`, which runs after ``__init__`` or `restore`.

    An agent that sets durable reminders (``self.context.remind``) defines the handler
    ``on_reminder(self, name, payload)``, which receives each firing.

    Example:
        >>> class Counter(arbor.Agent):
        ...     def __init__(self, start: int = 0):
        ...         self.count = start
        ...     def add(self, n: int) -> int:
        ...         self.count += n
        ...         return self.count
        >>> ref = arbor.spawn(Counter, name="c1", start=5)
        >>> ref.ask("add", 3)
        8
    """

    _arbor_context: AgentContext | None = None

    @property
    def context(self) -> AgentContext:
        """The runtime context: own name, incarnation, and a way to reach other agents."""
        if self._arbor_context is None:
            raise RuntimeError(
                f"{type(self).__name__}.context is only available inside a running agent; "
                "create agents with arbor.spawn(), not by calling the class"
            )
        return self._arbor_context

    def snapshot(self) -> dict[str, Any]:
        """Return the state to checkpoint; the default is every public attribute."""
        return {key: value for key, value in vars(self).items() if not key.startswith("_")}

    def restore(self, state: dict[str, Any]) -> None:
        """Load state produced by `snapshot`.

        The default sets each key as an attribute and deletes public attributes that the
        state lacks, so the agent matches the checkpoint exactly, which a rollback needs.
        """
        for key in [key for key in vars(self) if not key.startswith("_") and key not in state]:
            delattr(self, key)
        for key, value in state.items():
            setattr(self, key, value)

    def on_start(self) -> None:
        """Run after ``__init__`` or `restore`, once per incarnation; override for set-up."""

    def on_recover(self, reason: str) -> None:
        """Run after `on_start` when this incarnation restored a checkpoint to recover.

        ``reason`` is ``"crash"`` when Ray restarted the agent's process after it died,
        ``"recreated"`` when the reconciler started a new actor (its node was lost, or the
        Ray cluster was replaced), ``"rollback"`` after `arbor.restore`, and ``"timeout"``
        after a handler ran past its time limit. State changes made here are committed
        with the next message's checkpoint.
        """

    def on_stop(self) -> None:
        """Run once on a graceful `arbor.stop`, before the final checkpoint.

        State changes made here are committed. It must finish within
        ``ARBOR_STOP_TIMEOUT_S`` (30 s); after that the registry kills the agent's process,
        and the agent keeps its last committed checkpoint.
        """


def handler(function: Callable[..., Any] | None = None, *, timeout: float | None = None) -> Any:
    """Mark a method as a message handler with options; ``timeout`` limits its running time.

    Written without parentheses, ``@arbor.handler`` marks the method with no options.

    A handler still running ``timeout`` seconds after it started fails its message with
    `AskTimeout`. The agent's process is restarted from its last checkpoint, so the
    message's partial changes are dropped and the next message runs in a fresh
    incarnation. ``ARBOR_HANDLER_TIMEOUT_S`` sets a default for handlers without one.

    Example:
        >>> class Crawler(arbor.Agent):
        ...     @arbor.handler(timeout=30)
        ...     def fetch(self, url: str) -> str:
        ...         ...
    """
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0
    ):
        from arbor.errors import InvalidArguments

        raise InvalidArguments(f"timeout={timeout!r} is invalid; pass a number of seconds > 0")

    def mark(method: Callable[..., Any]) -> Callable[..., Any]:
        method._arbor_timeout = timeout  # type: ignore[attr-defined]
        return method

    if function is not None:
        if not callable(function):
            from arbor.errors import InvalidArguments

            raise InvalidArguments(
                f"arbor.handler({function!r}) is invalid; pass options by keyword, such as "
                "@arbor.handler(timeout=30)"
            )
        return mark(function)
    return mark


def handler_timeout(agent_class: type[Agent], name: str) -> float | None:
    """Return the timeout that `handler` set on handler ``name``, or None."""
    function = getattr(agent_class, name, None)
    timeout: float | None = getattr(function, "_arbor_timeout", None)
    return timeout


# Methods of the base class that are part of the runtime contract, never handlers.
_RESERVED = frozenset(name for name in vars(Agent) if not name.startswith("_"))


_handler_names: dict[type[Agent], frozenset[str]] = {}


def handler_names(agent_class: type[Agent]) -> frozenset[str]:
    """Return the names of the public methods of ``agent_class`` that are message handlers."""
    cached = _handler_names.get(agent_class)
    if cached is not None:
        return cached
    names = set()
    for name, member in inspect.getmembers(agent_class):
        if name.startswith("_") or name in _RESERVED:
            continue
        if inspect.isfunction(member) or inspect.ismethod(member):
            names.add(name)
    result = frozenset(names)
    _handler_names[agent_class] = result
    return result


def resolve_handler(agent: Agent, name: str) -> Callable[..., Any]:
    """Return the bound handler ``name`` of ``agent``.

    Raises:
        UnknownHandler: ``name`` is private, reserved, or not a method of the agent.
    """
    from arbor.errors import UnknownHandler

    agent_class = type(agent)
    names = handler_names(agent_class)
    if isinstance(name, str) and name in names:
        handler: Callable[..., Any] = getattr(agent, name)
        return handler
    available = ", ".join(sorted(names)) or "(none)"
    if not isinstance(name, str) or name.startswith("_"):
        raise UnknownHandler(
            f"{agent_class.__name__}: {name!r} is private and cannot be called as a message; "
            f"handlers: {available}"
        )
    raise UnknownHandler(f"{agent_class.__name__} has no handler {name!r}; handlers: {available}")


def type_path(agent_class: type) -> str:
    """Return ``module:QualName``, the import path the store keeps for an agent class."""
    return f"{agent_class.__module__}:{agent_class.__qualname__}"


def import_type(path: str) -> type[Agent]:
    """Import an agent class from a ``module:QualName`` path.

    Raises:
        AgentTypeNotImportable: the module or attribute is missing, or it is no Agent.
    """
    import importlib

    from arbor.errors import AgentTypeNotImportable

    module_name, _, qualname = path.partition(":")
    if not module_name or not qualname or "<locals>" in qualname or module_name == "__main__":
        raise AgentTypeNotImportable(
            f"agent type {path!r} cannot be imported by path; define agent classes at the "
            "top level of an importable module to let Arbor recreate them"
        )
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise AgentTypeNotImportable(
            f"agent type {path!r} cannot be imported ({error}); install its module on every "
            "Ray node or add it to the agent's runtime_env"
        ) from error
    if not (isinstance(target, type) and issubclass(target, Agent)):
        raise AgentTypeNotImportable(f"{path!r} is not a subclass of arbor.Agent")
    return target
