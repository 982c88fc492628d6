"""The `self.context` object an agent uses to reach the runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import ray

from arbor.runtime.ref import AgentRef, registry_handle

if TYPE_CHECKING:
    from arbor.agent import Agent
    from arbor.runtime.cell import AgentCell

# Seconds an agent waits for the registry to spawn or stop another agent.
_REGISTRY_CALL_TIMEOUT_S = 120.0


class RuntimeContext:
    """Implements `arbor.agent.AgentContext` for an agent running in a cell."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._cell: AgentCell | None = None

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
    def capabilities(self) -> list[str]:
        # Capabilities are not granted yet in this version, so every agent has none.
        return []

    def get(self, name: str) -> AgentRef:
        """Return a reference to another agent; its messages name this agent as sender."""
        return AgentRef(name, sender=self._name, origin=self._cell)

    def spawn(self, agent_class: type[Agent], name: str, **kwargs: Any) -> AgentRef:
        """Spawn another agent through the registry and return its reference."""
        from arbor.registry.spec import build_spawn_spec

        spec = build_spawn_spec(agent_class, name, (), kwargs)
        ray.get(registry_handle().spawn.remote(spec), timeout=_REGISTRY_CALL_TIMEOUT_S)
        return AgentRef(name, sender=self._name)

    def stop(self, name: str, purge: bool = False) -> None:
        """Stop another agent through the registry."""
        ray.get(registry_handle().stop.remote(name, purge), timeout=_REGISTRY_CALL_TIMEOUT_S)

    async def checkpoint(self) -> int:
        """Commit the agent's state now, from inside a handler; returns the version."""
        if self._cell is None:
            raise RuntimeError(f"agent {self._name!r} is still starting; checkpoint after __init__")
        return await self._cell.checkpoint()
