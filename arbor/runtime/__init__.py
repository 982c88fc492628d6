"""Agent actors: the cell that runs an agent, its Ray actor, and references to agents."""

from arbor.runtime.ref import AgentRef

__all__ = ["AgentRef"]
