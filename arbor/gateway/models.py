"""Request and response bodies of the HTTP API; every request model rejects unknown fields."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from arbor.registry.info import AgentInfo
from arbor.registry.security import CapabilityInfo

# The full agent name rule of `arbor.registry.spec.validate_name` (an optional namespace
# and colon before the name), repeated here so the OpenAPI document shows it.
# validate_name still runs and also rejects '.', '..', 'arbor-' and reserved namespaces.
AGENT_NAME_PATTERN = (
    r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?:)?"
    r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$"
)

AgentName = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=AGENT_NAME_PATTERN)
]
Principal = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")
]
Pattern = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
Operation = Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[a-z]+$")]
HandlerName = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
]
TypeName = Annotated[
    str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    """The error of a failed request, for people and programs."""

    code: str = Field(description="A stable identifier, such as not_found or capability_denied.")
    message: str = Field(description="What failed, on which value, and what to do next.")
    field: str | None = Field(default=None, description="The request field at fault, if any.")


class ErrorBody(BaseModel):
    """The body of every 4xx and 5xx response."""

    error: ErrorDetail


class GrantBody(_Request):
    """A capability to grant or delegate, with optional narrowing terms."""

    pattern: Pattern = Field(description="Resource pattern, such as arbor://agent/ask/workers/*.")
    operations: list[Operation] | None = Field(default=None, max_length=16)
    expires_at: datetime | None = Field(default=None, description="Timezone-aware end of validity.")
    max_uses: int | None = Field(default=None, ge=1, le=2**62)
    allowed_callers: list[Principal] | None = Field(default=None, max_length=64)
    depth: int | None = Field(default=None, ge=0, le=16)


class Placement(_Request):
    """Ray placement of a new agent; see `arbor.spawn`."""

    num_cpus: float | None = Field(default=None, ge=0, le=1024)
    num_gpus: float | None = Field(default=None, ge=0, le=1024)
    memory: int | None = Field(default=None, ge=1, le=2**62, description="Bytes.")
    resources: dict[str, float] | None = None
    node_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{56}$")
    node_affinity: Literal["soft", "hard"] | None = None
    spread: bool | None = None
    durability: Literal["durable", "periodic", "batched"] | None = None
    placement: Literal["dedicated", "hosted"] | None = Field(
        default=None, description="'hosted' runs the agent in a shared host actor."
    )
    passivate_idle_s: float | None = Field(
        default=None,
        ge=0,
        description="Idle seconds before a hosted agent is dropped from memory; 0 never.",
    )


class SpawnBody(_Request):
    """A new agent: its registered type, name, constructor arguments and placement."""

    type: TypeName = Field(description="A registered agent type name (GET /v1/agent-types).")
    name: AgentName
    args: list[Any] = Field(default_factory=list, max_length=256)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    placement: Placement = Field(default_factory=Placement)
    capabilities: list[GrantBody] = Field(
        default_factory=list,
        max_length=64,
        description="Capabilities the agent gets at birth, delegated from the caller's own.",
    )


class StopBody(_Request):
    """Options of a stop."""

    purge: bool = Field(default=False, description="Also delete its checkpoints and free the name.")


class RestoreBody(_Request):
    """The checkpoint version to roll an agent back to."""

    version: int = Field(ge=1, le=2**62)


class MessageBody(_Request):
    """A message to an agent's handler."""

    handler: HandlerName
    args: list[Any] = Field(default_factory=list, max_length=256)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    wait: bool = Field(default=True, description="true: ask and return the reply; false: send.")
    timeout: float | None = Field(
        default=None, gt=0, le=3600, description="Seconds to wait for the reply (ask only)."
    )
    message_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        pattern=r"^[\x21-\x7e]+$",
        description="Idempotency key; a repeat returns the first reply without applying twice.",
    )


class DelegateBody(_Request):
    """A delegation of one of the caller's capabilities to another principal."""

    to_principal: Principal
    pattern: Pattern | None = Field(
        default=None, description="Narrower pattern; default the parent's."
    )
    operations: list[Operation] | None = Field(default=None, max_length=16)
    expires_at: datetime | None = None
    max_uses: int | None = Field(default=None, ge=1, le=2**62)
    allowed_callers: list[Principal] | None = Field(default=None, max_length=64)
    depth: int | None = Field(default=None, ge=0, le=16)


class GrantRequestBody(GrantBody):
    """A capability to grant and the principal that receives it."""

    principal: Principal = Field(description="An agent name, or key:<id> for an API key.")

    @property
    def capability(self) -> GrantBody:
        """The capability terms without the principal."""
        return GrantBody(**self.model_dump(exclude={"principal"}))


class CommandBody(_Request):
    """An asynchronous command to start."""

    command: TypeName = Field(description="A registered command name, such as analysis.")
    params: dict[str, Any] = Field(default_factory=dict)


class AgentView(BaseModel):
    """An agent's record."""

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
    placement: str = "dedicated"
    passivated: bool = False

    @classmethod
    def of(cls, info: AgentInfo) -> AgentView:
        """Build the view of an `AgentInfo`."""
        return cls(
            name=info.name,
            type=info.type,
            status=info.status,
            node_id=info.node_id,
            incarnation=info.incarnation,
            checkpoint_version=info.checkpoint_version,
            created_at=info.created_at,
            started_at=info.started_at,
            checkpointed_at=info.checkpointed_at,
            last_error=info.last_error,
            placement=info.placement,
            passivated=info.passivated,
        )


class AgentPage(BaseModel):
    """One page of agents, ordered by name."""

    agents: list[AgentView]
    next_cursor: str | None = Field(
        description="Pass as cursor for the next page; null at the end."
    )


class MessageResult(BaseModel):
    """The outcome of a message: the reply of an ask, or the id of a send."""

    message_id: str | None = None
    reply: Any = None


class CapabilityView(BaseModel):
    """A capability, without its token text."""

    id: str
    principal: str
    parent_id: str | None
    pattern: str
    operations: list[str]
    granted_by: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, info: CapabilityInfo) -> CapabilityView:
        """Build the view of a `CapabilityInfo`."""
        return cls(
            id=info.id,
            principal=info.principal,
            parent_id=info.parent_id,
            pattern=info.pattern,
            operations=list(info.operations),
            granted_by=info.granted_by,
            created_at=info.created_at,
            expires_at=info.expires_at,
            revoked_at=info.revoked_at,
        )


class RevokeResult(BaseModel):
    """The capabilities a revocation revoked: the named one and its descendants."""

    revoked: list[str]


class AuditView(BaseModel):
    """One audit log row."""

    seq: int
    at: datetime | None
    principal: str
    action: str
    resource: str
    decision: str
    detail: dict[str, Any]
    trace_id: str | None
    hash: str | None


class AuditVerifyView(BaseModel):
    """The outcome of walking the audit hash chain."""

    ok: bool
    checked: int
    bad_seq: int | None
    problem: str | None
    reason: str | None
    head_seq: int | None
    head_hash: str | None


class ExecutionView(BaseModel):
    """An asynchronous command run."""

    id: str
    command: str
    status: Literal["pending", "running", "succeeded", "failed"]
    result: Any = None
    error: str | None = None
    created_at: datetime
    updated_at: datetime
    events_url: str


class HealthView(BaseModel):
    """The gateway process is up."""

    status: Literal["ok"]


class ReadyView(BaseModel):
    """Readiness of the parts the gateway needs."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, str] = Field(description="Each part (registry, database): ok or the error.")
