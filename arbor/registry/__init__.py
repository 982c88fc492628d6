"""The registry: agent names and records, spawn and stop, and the reconciler."""

from arbor.registry.info import AgentInfo

__all__ = ["AgentInfo"]
