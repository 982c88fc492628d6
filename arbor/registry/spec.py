"""Spawn requests: agent names, placement options and how they map onto Ray actor options."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import RayActorError

from arbor.agent import Agent, type_path
from arbor.config import Settings
from arbor.errors import ArborError, HandlerError, InvalidAgentName, InvalidArguments
from arbor.names import local_name, namespace_problem
from arbor.persistence import ALLOWED, AuditEntry
from arbor.registry.security import OPERATOR, GrantRequest, grant_requests
from arbor.runtime import telemetry

logger = logging.getLogger(__name__)

# Segments of letters, digits, '.', '_' and '-' joined by '/', so names can form paths
# such as "workers/eu/7" that capability patterns match segment by segment.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
MAX_NAME_LENGTH = 200

# Spawn keywords that configure placement and durability; every other keyword goes to
# the agent's __init__.
PLACEMENT_KEYS = frozenset(
    {
        "num_cpus",
        "num_gpus",
        "memory",
        "resources",
        "runtime_env",
        "node_id",
        "node_affinity",
        "spread",
        "durability",
        "max_pending",
        "placement",
        "passivate_idle_s",
    }
)

# Spawn options that Ray does not see, so a spawn with them can still claim a warm actor.
ARBOR_ONLY_KEYS = frozenset({"durability", "max_pending", "placement", "passivate_idle_s"})

# Placement options that configure the agent's own Ray actor; a hosted agent shares its
# host's process, so it cannot have them.
RAY_ACTOR_KEYS = frozenset(PLACEMENT_KEYS - ARBOR_ONLY_KEYS)

PLACEMENTS = ("dedicated", "hosted")

# Seconds a warm actor stays lent to a client, which claims it without the registry (see
# `arbor.direct_spawn`), before the registry puts it back in its pool. A client claims a
# lent actor only within WARM_LEND_USE_S of its request, so the two never overlap.
WARM_LEND_S = 30.0
WARM_LEND_USE_S = 10.0
# Seconds a request for a loan waits for a ready warm actor, as while the pool refills.
WARM_LEND_WAIT_S = 5.0


@dataclass
class SpawnSpec:
    """Everything the registry needs to create an agent."""

    name: str
    agent_class: type[Agent]
    type_path: str
    init_args: tuple[Any, ...]
    init_kwargs: dict[str, Any]
    options: dict[str, Any]
    spawn_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Capabilities the new agent gets at birth; an agent spawner may grant only narrower
    # copies of what it holds.
    capabilities: list[GrantRequest] = field(default_factory=list)
    # The agent that requests the spawn and the token that allows it; None for the operator.
    spawner: str | None = None
    token: str | None = field(default=None, repr=False)


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid agent name.

    Raises:
        InvalidAgentName: with the rule the name breaks.
    """
    if not isinstance(name, str):
        raise InvalidAgentName(f"agent name must be a string, got {type(name).__name__}")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidAgentName(
            f"agent name {name[:40]!r}... is longer than {MAX_NAME_LENGTH} characters"
        )
    problem = namespace_problem(name)
    if problem is not None:
        raise InvalidAgentName(f"agent name {name!r} is invalid: {problem}")
    local = local_name(name)
    if not _NAME_PATTERN.fullmatch(local) or any(part in (".", "..") for part in local.split("/")):
        raise InvalidAgentName(
            f"agent name {name!r} is invalid; use segments of letters, digits, '.', '_' and "
            "'-' separated by '/', such as 'workers/7', after an optional namespace and "
            "colon, such as 'team-a:workers/7'"
        )
    if local.startswith("arbor-"):
        raise InvalidAgentName(f"agent name {name!r} is invalid; the prefix 'arbor-' is reserved")
    return name


def build_spawn_spec(
    agent_class: type[Agent], name: str, init_args: tuple[Any, ...], kwargs: dict[str, Any]
) -> SpawnSpec:
    """Split spawn keywords into placement options and ``__init__`` arguments, and check both.

    Raises:
        InvalidAgentName: the name is malformed.
        InvalidArguments: the class is no Agent, or an option has a wrong type or value.
    """
    if not (isinstance(agent_class, type) and issubclass(agent_class, Agent)):
        raise InvalidArguments(
            f"spawn expects a subclass of arbor.Agent, got {agent_class!r}; "
            "define the agent as `class MyAgent(arbor.Agent)`"
        )
    validate_name(name)
    path = type_path(agent_class)
    if path.startswith("__main__:") or "<locals>" in path:
        logger.warning(
            "agent %s has type %s, which other processes cannot import; Ray restarts it after "
            "a crash, but the reconciler cannot recreate it. Define the class in a module",
            name,
            path,
        )
    options = {key: kwargs.pop(key) for key in list(kwargs) if key in PLACEMENT_KEYS}
    _check_options(options)
    capabilities = grant_requests(kwargs.pop("capabilities", None))
    _check_init_arguments(agent_class, init_args, kwargs)
    return SpawnSpec(
        name=name,
        agent_class=agent_class,
        type_path=path,
        init_args=tuple(init_args),
        init_kwargs=kwargs,
        options={key: value for key, value in options.items() if value is not None},
        capabilities=capabilities,
    )


def _check_init_arguments(
    agent_class: type[Agent], init_args: tuple[Any, ...], init_kwargs: dict[str, Any]
) -> None:
    """Raise `InvalidArguments` now for arguments that ``__init__`` would reject in the actor."""
    try:
        signature = inspect.signature(agent_class.__init__)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(None, *init_args, **init_kwargs)
    except TypeError as error:
        parameters = str(signature).replace("(self, ", "(").replace("(self)", "()")
        raise InvalidArguments(
            f"{agent_class.__name__}.__init__{parameters}: {error}; placement options are "
            f"{', '.join(sorted(PLACEMENT_KEYS))}"
        ) from None


def _check_options(options: dict[str, Any]) -> None:
    for key in ("num_cpus", "num_gpus"):
        value = options.get(key)
        if value is not None and (
            not isinstance(value, int | float) or isinstance(value, bool) or value < 0
        ):
            raise InvalidArguments(f"{key}={value!r} is invalid; pass a number >= 0")
    memory = options.get("memory")
    if memory is not None and (
        not isinstance(memory, int) or isinstance(memory, bool) or memory <= 0
    ):
        raise InvalidArguments(f"memory={memory!r} is invalid; pass a number of bytes > 0")
    resources = options.get("resources")
    if resources is not None and (
        not isinstance(resources, dict)
        or not all(
            isinstance(k, str) and isinstance(v, int | float) and v >= 0
            for k, v in resources.items()
        )
    ):
        raise InvalidArguments(
            f"resources={resources!r} is invalid; pass a dict of name -> amount >= 0"
        )
    named = sorted({"CPU", "GPU"} & set(resources or {}))
    if named:
        # Ray rejects these names in custom resources, so the spawn fails here and names
        # the options to use instead.
        raise InvalidArguments(
            f"resources={resources!r} is invalid: {', '.join(named)} cannot be a custom "
            "resource; pass num_cpus or num_gpus instead"
        )
    runtime_env = options.get("runtime_env")
    if runtime_env is not None and not isinstance(runtime_env, dict):
        raise InvalidArguments(
            f"runtime_env={runtime_env!r} is invalid; pass a dict as Ray expects"
        )
    node_id = options.get("node_id")
    if node_id is not None and (
        not isinstance(node_id, str) or not re.fullmatch(r"[0-9a-f]{56}", node_id)
    ):
        raise InvalidArguments(
            f"node_id={node_id!r} is invalid; pass a Ray node id (56 hex digits, see ray.nodes())"
        )
    affinity = options.get("node_affinity")
    if affinity is not None:
        if affinity not in ("soft", "hard"):
            raise InvalidArguments(f"node_affinity={affinity!r} is invalid; use 'soft' or 'hard'")
        if node_id is None:
            raise InvalidArguments("node_affinity needs node_id; pass the Ray node id to pin to")
    spread = options.get("spread")
    if spread is not None and not isinstance(spread, bool):
        raise InvalidArguments(f"spread={spread!r} is invalid; pass True or False")
    if spread and node_id is not None:
        raise InvalidArguments("spread=True and node_id cannot be combined; choose one placement")
    max_pending = options.get("max_pending")
    if max_pending is not None and (
        not isinstance(max_pending, int) or isinstance(max_pending, bool) or max_pending < 1
    ):
        raise InvalidArguments(
            f"max_pending={max_pending!r} is invalid; pass the number of unfinished messages "
            "(>= 1): counted per sending process for a dedicated agent, and over every "
            "sender's asks for a hosted one"
        )
    durability = options.get("durability")
    if durability is not None and durability not in ("durable", "periodic", "batched"):
        raise InvalidArguments(
            f"durability={durability!r} is invalid; use 'durable', 'batched' or 'periodic'"
        )
    _check_hosted_options(options)


def _check_hosted_options(options: dict[str, Any]) -> None:
    placement = options.get("placement")
    if placement is not None and placement not in PLACEMENTS:
        raise InvalidArguments(
            f"placement={placement!r} is invalid; use 'dedicated' (one Ray actor per agent) "
            "or 'hosted' (many agents in one host actor)"
        )
    idle = options.get("passivate_idle_s")
    if idle is not None:
        if (
            not isinstance(idle, int | float)
            or isinstance(idle, bool)
            or not math.isfinite(idle)
            or idle < 0
        ):
            raise InvalidArguments(
                f"passivate_idle_s={idle!r} is invalid; pass a finite number of seconds >= 0 "
                "(0 never passivates)"
            )
        # Without placement or Ray options, the registry applies its own
        # ARBOR_DEFAULT_PLACEMENT and checks there that the agent is hosted.
        dedicated = placement == "dedicated" or any(key in RAY_ACTOR_KEYS for key in options)
        if dedicated and placement != "hosted":
            raise InvalidArguments(
                "passivate_idle_s applies to hosted agents only; add placement='hosted'"
            )
    if placement == "hosted":
        ray_keys = sorted(key for key in options if key in RAY_ACTOR_KEYS)
        if ray_keys:
            raise InvalidArguments(
                f"placement='hosted' cannot be combined with {', '.join(ray_keys)}: hosted "
                "agents share their host's process; spawn with placement='dedicated' for "
                "Ray actor options"
            )


def is_hosted(options: dict[str, Any]) -> bool:
    """Return whether spawn ``options`` place the agent in a host actor."""
    return options.get("placement") == "hosted"


def ray_actor_options(options: dict[str, Any], *, node_alive: bool = True) -> dict[str, Any]:
    """Map Arbor placement options one to one onto Ray actor options.

    Args:
        options: validated placement options.
        node_alive: False when the pinned node is gone; hard affinity then becomes soft,
            so the agent can come back elsewhere instead of never being scheduled.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray_options: dict[str, Any] = {}
    for key in ("num_cpus", "num_gpus", "memory", "resources", "runtime_env"):
        if options.get(key) is not None:
            ray_options[key] = options[key]
    if options.get("spread"):
        ray_options["scheduling_strategy"] = "SPREAD"
    node_id = options.get("node_id")
    if node_id is not None:
        soft = options.get("node_affinity", "soft") == "soft" or not node_alive
        ray_options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
            node_id=node_id, soft=soft
        )
    return ray_options


def spawn_audit(spec: SpawnSpec) -> AuditEntry:
    """Return the audit row of an allowed spawn."""
    return AuditEntry(
        principal=spec.spawner or OPERATOR,
        action="spawn",
        resource=f"arbor://agent/spawn/{spec.name}",
        decision=ALLOWED,
        detail={"type": spec.type_path},
        trace_id=telemetry.current_trace_id(),
    )


def start_error(name: str, error: Exception, where: str, settings: Settings) -> Exception:
    """Return the error a spawn raises when the actor that was to run the agent failed it."""
    if isinstance(error, asyncio.TimeoutError):
        return ArborError(
            f"agent {name!r} did not start in {where} within {settings.spawn_timeout_s} s; "
            "raise ARBOR_SPAWN_TIMEOUT_S"
        )
    cause = getattr(error, "cause", None)
    if isinstance(cause, ArborError):
        return cause
    if isinstance(cause, BaseException):
        return HandlerError(
            name,
            "__init__",
            f"{type(cause).__module__}.{type(cause).__qualname__}",
            str(cause),
            _plain(str(error)),
        )
    if isinstance(error, ArborError):
        return error
    return spawn_error(name, error)  # type: ignore[arg-type]


def spawn_error(name: str, error: RayActorError) -> HandlerError:
    text = _plain(str(error))
    summary = text.strip().splitlines()[-1] if text.strip() else type(error).__name__
    return HandlerError(name, "__init__", type(error).__name__, summary, text)


# Terminal colour codes, which Ray puts in the tracebacks of its task errors.
_COLOUR_CODE = re.compile(r"\x1b\[[0-9;]*m")


def _plain(text: str) -> str:
    """Return ``text`` without terminal colour codes, for messages that logs and people read."""
    return _COLOUR_CODE.sub("", text)
