"""The `self.context` object an agent uses to reach the runtime."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import ray

from arbor.config import Settings
from arbor.runtime.ref import AgentRef, registry_handle

if TYPE_CHECKING:
    from arbor.agent import Agent
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

    def __init__(self, name: str, settings: Settings | None = None) -> None:
        self._name = name
        self._settings = settings
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
    def capabilities(self) -> list[CapabilityInfo]:
        """Return the live capabilities this agent holds, read from the store."""
        from arbor.registry.security import CapabilityInfo

        cell = self._require_cell()
        if cell.guard is None:
            return []
        records = cell.guard.store.list_capabilities(self._name)
        return [CapabilityInfo.from_record(record) for record in records]

    def get(self, name: str) -> AgentRef:
        """Return a reference to another agent; its messages name this agent as sender."""
        return AgentRef(name, sender=self._name, origin=self._cell)

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

        spec = build_spawn_spec(agent_class, name, (), {**kwargs, "capabilities": capabilities})
        spec.spawner = self._name
        spec.token = self._token_for(f"arbor://agent/spawn/{name}")
        _call(registry_handle().spawn.remote(spec))
        return AgentRef(name, sender=self._name, origin=self._cell)

    def stop(self, name: str, purge: bool = False) -> None:
        """Stop another agent through the registry; needs ``arbor://agent/stop/<name>``."""
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
