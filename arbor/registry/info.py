"""`AgentInfo`, the public description of one agent."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from arbor.names import namespace_of
from arbor.persistence import AgentRecord


@dataclass(frozen=True)
class AgentInfo:
    """The registry's record of one agent.

    Attributes:
        name: the agent's full name, such as ``team-a:counter`` (no prefix in ``default``).
        type: the agent class as ``module:QualName``.
        status: ``starting``, ``running``, ``stopped`` or ``failed``.
        node_id: Ray node of the latest incarnation.
        incarnation: epoch of the latest incarnation; it grows on every restart.
        checkpoint_version: latest committed checkpoint version.
        created_at: when the agent was first spawned.
        started_at: when the latest incarnation started.
        checkpointed_at: when the latest checkpoint was committed.
        last_error: the last recovery error, if any.
        actor: the Ray actor name that runs the agent: the agent's name, for an agent
            that claimed a warm actor that actor's ``arbor-warm-...`` name, and for a
            hosted agent its host's ``arbor-host-...`` name.
        placement: ``dedicated`` (a Ray actor of its own) or ``hosted``.
        passivated: whether a hosted agent is out of its host's memory after
            ``passivate_idle_s`` without messages. Its status stays ``running``, and its
            next message starts it again from its checkpoint.
    """

    name: str
    type: str
    status: str
    node_id: str | None
    incarnation: int
    checkpoint_version: int
    created_at: datetime | None
    started_at: datetime | None
    checkpointed_at: datetime | None
    last_error: str | None
    actor: str = ""
    placement: str = "dedicated"
    passivated: bool = False

    @property
    def namespace(self) -> str:
        """The namespace the agent lives in, from its full name."""
        return namespace_of(self.name)

    @classmethod
    def from_record(cls, record: AgentRecord) -> AgentInfo:
        """Build the public view of a store record."""
        return cls(
            name=record.name,
            type=record.type_path,
            status=record.status,
            node_id=record.node_id,
            incarnation=record.epoch,
            checkpoint_version=record.checkpoint_version,
            created_at=record.created_at,
            started_at=record.started_at,
            checkpointed_at=record.checkpointed_at,
            last_error=record.last_error,
            actor=actor_name(record),
            placement=placement_of(record),
        )


def actor_name(record: AgentRecord) -> str:
    """Return the Ray actor name of the agent ``record`` describes."""
    host = record.options.get("host")
    if isinstance(host, str):
        return host
    bound = record.options.get("actor")
    return bound if isinstance(bound, str) else record.name


def placement_of(record: AgentRecord) -> str:
    """Return ``hosted`` or ``dedicated`` for the agent ``record`` describes."""
    return "hosted" if record.options.get("placement") == "hosted" else "dedicated"


def agent_route(record: AgentRecord, handle: Any) -> Any:
    """Return what messages to the agent are submitted to, given its Ray actor's handle."""
    from arbor.runtime.ref import route_to

    return route_to(record.name, handle, placement_of(record))
