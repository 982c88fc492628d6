"""The public Python API: connect, spawn, look up, list, stop and restore agents."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import replace
from datetime import datetime
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from arbor import direct_spawn
from arbor.agent import Agent
from arbor.config import NAMESPACE, REGISTRY_NAME, Settings, get_settings, reset_settings
from arbor.errors import (
    AgentNotFound,
    AgentTypeNotImportable,
    ArborError,
    ClusterUnavailable,
    InvalidArguments,
)
from arbor.names import (
    namespace_of,
    qualify,
    qualify_pattern,
    qualify_principal,
    validate_namespace,
)
from arbor.persistence import CheckpointInfo, absolute_database_url, open_store
from arbor.registry.info import AgentInfo
from arbor.registry.reminder_spec import ReminderInfo
from arbor.registry.security import CapabilityInfo
from arbor.registry.spec import build_spawn_spec, validate_name
from arbor.runtime.ref import (
    AgentRef,
    host_handle,
    reset_process_state,
    restart_sequence,
    route_to,
)

logger = logging.getLogger(__name__)

# Seconds to wait for registry calls that touch only the store.
_REGISTRY_TIMEOUT_S = 60.0

# Milliseconds between Ray's checks for calls to resubmit (Ray's default is 1000).
RETRY_TIMER_MS = "100"

# Seconds to wait for a TCP connection to a cluster address before calling it down.
_PROBE_TIMEOUT_S = 3.0

# The namespace given to `init`; None means ``ARBOR_NAMESPACE``.
_namespace: str | None = None

# The value of list_agents(namespace=...) that lists every namespace.
ALL_NAMESPACES = "*"

# The statuses an agent record can have, for list_agents(status=...).
AGENT_STATUSES = ("starting", "running", "stopped", "failed")


def init(
    address: str | None = None,
    *,
    database_url: str | None = None,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
    namespace: str | None = None,
) -> None:
    """Connect to (or start) Ray and make sure the registry runs.

    Args:
        address: Ray cluster address; default ``ARBOR_RAY_ADDRESS``, else the latest
            cluster started on this machine with ``arbor up`` or ``ray start``, else a new
            local cluster listening on 127.0.0.1 only.
        database_url: checkpoint store; default ``ARBOR_DATABASE_URL``.
        num_cpus: CPUs of a new local cluster; passing it always starts a new one.
        object_store_memory: object store bytes of a new local cluster.
        namespace: the namespace that names given to this process's calls are relative
            to; default ``ARBOR_NAMESPACE``, else ``default``. A name such as
            ``team-b:counter`` names another namespace explicitly.

    Raises:
        StoreUnavailable: the database cannot be reached.
        ClusterUnavailable: no Ray cluster runs at ``address``.
        InvalidArguments: the namespace name is invalid.

    Example:
        >>> arbor.init(namespace="team-a")
    """
    global _namespace
    if namespace is not None:
        _namespace = validate_namespace(namespace)
    url = absolute_database_url(database_url or get_settings().database_url)
    os.environ["ARBOR_DATABASE_URL"] = url
    reset_settings()
    settings = get_settings()

    # Fail here with the store's own message rather than inside the registry actor.
    open_store(url, settings).close()

    if not ray.is_initialized():
        _tune_ray_retries()
        target = address or settings.ray_address
        options: dict[str, Any] = {"namespace": NAMESPACE, "logging_level": logging.WARNING}
        if num_cpus is not None or object_store_memory is not None:
            target = target or "local"
        if target in (None, "local"):
            options.update(num_cpus=num_cpus, object_store_memory=object_store_memory)
            options.update(include_dashboard=settings.dashboard, dashboard_host="127.0.0.1")
            _warn_if_network_bound()
        probe_address(target)
        try:
            ray.init(address=target, **options)
        except ConnectionError as error:
            hint = "start one with `arbor up`"
            if os.environ.get("RAY_AUTH_MODE") != "token":
                # Without the token setting, joining a cluster that requires it fails the
                # same way as joining no cluster at all.
                hint = (
                    "if the cluster runs, it may require Ray's token authentication (the "
                    "default for local clusters in Ray 2.60): set RAY_AUTH_MODE=token in this "
                    f"process; otherwise {hint}"
                )
            raise ClusterUnavailable(f"no Ray cluster at {target!r}: {error}; {hint}") from error
    ensure_registry(settings)


def current_namespace() -> str:
    """Return the namespace that names given to this process's calls are relative to.

    Inside an agent's handler it is the agent's own namespace; elsewhere the one given to
    `init`, else ``ARBOR_NAMESPACE``.
    """
    from arbor.runtime.cell import running_cell

    cell = running_cell()
    if cell is not None:
        return namespace_of(cell.name)
    if _namespace is not None:
        return _namespace
    return get_settings().namespace


def full_name(name: str) -> str:
    """Return the full name that ``name`` means in `current_namespace`.

    Example:
        >>> arbor.init(namespace="team-a")
        >>> arbor.full_name("counter"), arbor.full_name("team-b:counter")
        ('team-a:counter', 'team-b:counter')
    """
    return qualify(name, current_namespace())


def ensure_registry(settings: Settings | None = None) -> Any:
    """Return the registry actor, creating it if this cluster has none yet."""
    from arbor.registry.actor import Registry

    settings = settings or get_settings()
    try:
        handle = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
    except ValueError:
        handle = (
            ray.remote(Registry)
            .options(
                name=REGISTRY_NAME,
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                max_restarts=-1,
                max_task_retries=-1,
                max_concurrency=1000,
                num_cpus=0,
            )
            .remote(settings.model_dump())
        )
    info = _call(handle.ping.remote(), timeout=settings.spawn_timeout_s)
    if info["database_url"] != _redacted(settings.database_url):
        logger.warning(
            "the running registry uses %s, not %s; it keeps its store until the cluster stops",
            info["database_url"],
            _redacted(settings.database_url),
        )
    return handle


def spawn(agent_class: type[Agent], name: str, *args: Any, **kwargs: Any) -> AgentRef:
    """Start a new agent as a detached Ray actor and return its reference.

    Args:
        agent_class: a subclass of `arbor.Agent`, importable by module path so the
            reconciler can recreate it.
        name: a name unique in its namespace: segments of letters, digits, ``.``, ``_``,
            ``-`` separated by ``/``, relative to `current_namespace` unless it starts
            with ``<namespace>:``. The reference and every listing carry the full name.
        *args: positional arguments for ``agent_class.__init__``.
        **kwargs: keyword arguments for ``__init__``, except these placement options,
            which go to Ray: ``num_cpus``, ``num_gpus``, ``memory`` (bytes), ``resources``,
            ``runtime_env``, ``spread=True``, ``node_id`` with ``node_affinity`` ``"soft"``
            (default) or ``"hard"``, and ``durability`` (``"durable"``, ``"batched"``
            or ``"periodic"``).
            ``placement="hosted"`` runs the agent in a shared host actor instead of an
            actor of its own (no Ray placement options then), with ``passivate_idle_s``
            to drop it from memory after that many idle seconds.

    Raises:
        NameTaken: an agent with this name exists (stopped agents keep their name).
        InvalidAgentName: the name is malformed.
        InvalidArguments: an option is invalid.
        HandlerError: the agent's ``__init__`` raised.

    Example:
        >>> ref = arbor.spawn(Counter, name="c1", start=5)
    """
    name = qualify(name, current_namespace())
    spec = build_spawn_spec(agent_class, name, args, kwargs)
    # Birth capabilities are relative to the new agent's namespace, where it lives.
    spec.capabilities = [
        replace(request, pattern=qualify_pattern(request.pattern, namespace_of(name)))
        for request in spec.capabilities
    ]
    claimed = direct_spawn.spawn(spec)
    if claimed is not None:
        restart_sequence(name)
        return AgentRef(name, handle=claimed[1])
    registry = _registry()
    timeout = get_settings().spawn_timeout_s + _REGISTRY_TIMEOUT_S
    requested_at = time.monotonic()
    lend = direct_spawn.wants_loan(spec)
    try:
        info: AgentInfo
        info, handle, lent = _call(
            registry.spawn.remote(spec, with_handle=True, lend=lend), timeout=timeout
        )
    except RayTaskError as error:
        # The registry could not unpickle the request: the agent's module is missing in
        # the cluster's workers, or the registry imported it before the class existed.
        for line in str(error).splitlines():
            for marker, problem, fix in _UNPICKLE_PROBLEMS:
                if marker in line:
                    raise AgentTypeNotImportable(
                        f"agent type {spec.type_path} {problem} ({line.strip()}); {fix}"
                    ) from None
        raise
    if lent:
        direct_spawn.keep(spec.type_path, registry, lent, requested_at)
    elif lent is None and lend:
        # No warm actor was ready to lend, so ask for the next one the pool starts.
        direct_spawn.request(spec.type_path, registry)
    # A name spawned again starts a new message stream from this process, so the new
    # incarnation's host does not wait for the numbers sent to the old one.
    restart_sequence(name)
    if info.placement == "hosted":
        return AgentRef(name, handle=route_to(name, host_handle(info.actor), info.placement))
    if info.actor != name:
        if handle is None:
            handle = ray.get_actor(info.actor, namespace=NAMESPACE)
        return AgentRef(name, handle=handle)
    return AgentRef(name)


def get(name: str) -> AgentRef:
    """Return a reference to the agent called ``name``.

    Raises:
        AgentNotFound: no agent has this name, or it is stopped.
    """
    name = full_name(name)
    validate_name(name)
    try:
        return AgentRef(name, handle=ray.get_actor(name, namespace=NAMESPACE))
    except ValueError:
        pass
    located = _call(_registry().locate.remote(name), timeout=_REGISTRY_TIMEOUT_S)
    if located is None:
        raise AgentNotFound(name)
    if located["status"] == "stopped":
        raise AgentNotFound(name, f"it is stopped; arbor.stop({name!r}, purge=True) frees the name")
    if located["actor"] != name:
        try:
            # A spawn that claimed a warm actor, or a hosted agent: that actor has its own
            # Ray name.
            placement = located.get("placement")
            if placement == "hosted":
                handle = host_handle(located["actor"])
            else:
                handle = ray.get_actor(located["actor"], namespace=NAMESPACE)
            return AgentRef(name, handle=route_to(name, handle, placement))
        except ValueError:
            pass
    # Registered and meant to run: the reconciler is bringing its actor back.
    return AgentRef(name)


def list_agents(status: str | None = None, *, namespace: str | None = None) -> list[AgentInfo]:
    """Return the registered agents of a namespace, ordered by full name.

    Args:
        status: only agents with this status; None for all.
        namespace: default `current_namespace`; ``"*"`` lists every namespace.
    """
    if status is not None and status not in AGENT_STATUSES:
        raise InvalidArguments(
            f"status={status!r} is invalid; use one of {', '.join(AGENT_STATUSES)}, or None"
        )
    # The registry's store reads only the namespace's rows, through an index.
    result: list[AgentInfo] = _call(
        _registry().list_agents.remote(status, _namespace_filter(namespace)),
        timeout=_REGISTRY_TIMEOUT_S,
    )
    return result


def stop(name: str, purge: bool = False) -> None:
    """Stop an agent after it commits its state.

    Args:
        name: the agent.
        purge: also delete its checkpoints and free the name.

    Raises:
        AgentNotFound: no agent has this name.
    """
    _call(_registry().stop.remote(full_name(name), purge), timeout=_REGISTRY_TIMEOUT_S)


def restore(name: str, version: int) -> AgentInfo:
    """Roll an agent back to checkpoint ``version`` and restart it on that state.

    The old checkpoint becomes the newest version. The running incarnation is fenced
    with a new epoch and the restarted one takes another, so ``incarnation`` grows by two.

    Raises:
        AgentNotFound: no agent has this name.
        CheckpointNotFound: the version was never written or has been pruned.
    """
    result: AgentInfo = _call(
        _registry().restore.remote(full_name(name), version),
        timeout=get_settings().spawn_timeout_s + _REGISTRY_TIMEOUT_S,
    )
    return result


def list_checkpoints(name: str) -> list[CheckpointInfo]:
    """Return the kept checkpoint versions of an agent, newest first."""
    result: list[CheckpointInfo] = _call(
        _registry().checkpoints.remote(full_name(name)), timeout=_REGISTRY_TIMEOUT_S
    )
    return result


def reconcile() -> list[str]:
    """Run one reconciler pass now; returns the names of the agents it recreated."""
    result: list[str] = _call(_registry().reconcile.remote(), timeout=_REGISTRY_TIMEOUT_S)
    return result


def cluster_lease() -> dict[str, Any]:
    """Return the cluster lease: this cluster's id, the holder's, and whether they match.

    Keys: ``cluster_id``, ``holder``, ``generation``, ``claimed_at`` and ``held``.
    """
    result: dict[str, Any] = _call(_registry().lease.remote(), timeout=_REGISTRY_TIMEOUT_S)
    return result


def claim_cluster_lease() -> dict[str, Any]:
    """Move the agents to the connected cluster by taking the cluster lease for it.

    The cluster that held the lease stops its agent actors at its next reconciler pass,
    and this cluster brings them back from their checkpoints. Use it to roll back to a
    cluster that is still running after a newer one took over.
    """
    result: dict[str, Any] = _call(_registry().claim_lease.remote(), timeout=_REGISTRY_TIMEOUT_S)
    return result


def grant(
    principal: str,
    pattern: str,
    operations: list[str] | None = None,
    *,
    expires_at: datetime | None = None,
    max_uses: int | None = None,
    allowed_callers: list[str] | None = None,
    depth: int = 0,
) -> CapabilityInfo:
    """Grant ``principal`` a capability, on the operator's authority.

    Names in the principal and in an agent, topic or capability pattern are relative to
    `current_namespace`, so a pattern covers that namespace only. A pattern that names
    a namespace, such as ``arbor://agent/ask/team-b:*``, grants access across namespaces.

    Args:
        principal: an agent name, or an API key id.
        pattern: the resources, such as ``arbor://agent/send/workers/*`` (``*`` matches
            one path segment, a final ``**`` any suffix, and an operation ``*`` every
            operation of the kind).
        operations: a subset of the pattern's operations; None means all of them.
        expires_at: a timezone-aware end of validity; default ``ARBOR_CAPABILITY_TTL_S``
            from now.
        max_uses: checks allowed over this capability and all delegated from it.
        allowed_callers: the callers a check must name; None accepts any.
        depth: how many times it may be delegated down a chain; 0 forbids delegation.

    Raises:
        InvalidResource: the pattern does not parse.
        InvalidCapability: another argument is malformed.
    """
    from arbor.registry.security import GrantRequest

    namespace = current_namespace()
    request = GrantRequest.parse(
        {
            "pattern": qualify_pattern(pattern, namespace),
            "operations": operations,
            "expires_at": expires_at,
            "max_uses": max_uses,
            "allowed_callers": allowed_callers,
            "depth": depth,
        }
    )
    result: CapabilityInfo = _call(
        _registry().grant.remote(qualify_principal(principal, namespace), request),
        timeout=_REGISTRY_TIMEOUT_S,
    )
    return result


def revoke(capability_id: str) -> list[str]:
    """Revoke a capability and every capability delegated from it; returns their ids.

    Every process stops honouring them within about ``ARBOR_REVOCATION_POLL_S``.
    """
    result: list[str] = _call(_registry().revoke.remote(capability_id), timeout=_REGISTRY_TIMEOUT_S)
    return result


def capabilities(
    principal: str | None = None, include_revoked: bool = False, *, namespace: str | None = None
) -> list[CapabilityInfo]:
    """Return the capabilities ``principal`` holds.

    Args:
        principal: an agent name or an API key id; None for every principal of the
            namespace.
        include_revoked: also return revoked capabilities.
        namespace: with ``principal=None``, default `current_namespace`; ``"*"`` returns
            every principal's, API keys' included.
    """
    if principal is not None:
        principal = qualify_principal(principal, current_namespace())
    wanted = _namespace_filter(namespace) if principal is None else None
    result: list[CapabilityInfo] = _call(
        _registry().capabilities.remote(principal, include_revoked, wanted),
        timeout=_REGISTRY_TIMEOUT_S,
    )
    return result


def reminders(agent: str | None = None, *, namespace: str | None = None) -> list[ReminderInfo]:
    """Return the durable reminders of ``agent``, soonest first.

    With ``agent=None``, every agent's in ``namespace``: default `current_namespace`,
    ``"*"`` for every namespace.

    Example:
        >>> [(r.name, r.due_at, r.every) for r in arbor.reminders("jobs/coordinator")]
        [('report', datetime.datetime(2030, 1, 1, 9, 0, tzinfo=datetime.timezone.utc), 3600.0)]
    """
    target = None if agent is None else full_name(agent)
    wanted = _namespace_filter(namespace) if agent is None else None
    result: list[ReminderInfo] = _call(
        _registry().reminders.remote(target, namespace=wanted), timeout=_REGISTRY_TIMEOUT_S
    )
    return result


def cancel_reminder(agent: str, name: str) -> bool:
    """Delete reminder ``name`` of ``agent``, on the operator's authority.

    Returns:
        Whether the reminder existed. A delivery the registry already sent still reaches
        the agent.
    """
    result: bool = _call(
        _registry().cancel_reminder.remote(full_name(agent), name), timeout=_REGISTRY_TIMEOUT_S
    )
    return result


def shutdown() -> None:
    """Disconnect from Ray; a local cluster this process started stops with it.

    Agents in a cluster that outlives this process keep running; their state is in the
    store either way.
    """
    if ray.is_initialized():
        ray.shutdown()
    reset_process_state()
    direct_spawn.reset()


def _namespace_filter(namespace: str | None) -> str | None:
    """Return the namespace a listing keeps, or None to keep every namespace."""
    if namespace == ALL_NAMESPACES:
        return None
    if namespace is None:
        return current_namespace()
    return validate_namespace(namespace)


def _registry() -> Any:
    if not ray.is_initialized():
        raise ClusterUnavailable("Arbor is not connected; call arbor.init() first")
    try:
        return ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
    except ValueError:
        return ensure_registry()


# Messages of a failed unpickling in the registry, each with what it means and its fix.
_UNPICKLE_PROBLEMS = (
    (
        "No module named",
        "cannot be imported in the Ray workers",
        "install its module on every node, or add its folder to PYTHONPATH before the "
        "cluster starts (for example before `arbor up`)",
    ),
    (
        "Can't get attribute",
        "is not in the copy of its module that the registry imported",
        "a Ray worker process imports a module once, so a class added or renamed since "
        "then needs a new cluster (`arbor down`, then `arbor up`) or a module of its own",
    ),
)


def _call(object_ref: Any, timeout: float) -> Any:
    """Wait for a registry call and re-raise an Arbor error as itself, not wrapped by Ray."""
    try:
        return ray.get(object_ref, timeout=timeout)
    except RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, ArborError):
            raise cause from None
        raise
    except GetTimeoutError:
        raise ArborError(
            f"the registry did not respond within {timeout} s; check `arbor status`"
        ) from None
    except RayActorError as error:
        raise ArborError(f"the registry actor failed: {error}") from error


def _tune_ray_retries() -> None:
    """Make callers resubmit a message to a restarted actor within about 0.1 s.

    Ray's core worker checks for calls to retry on a timer, 1000 ms by default in Ray
    2.60, which would dominate crash recovery. The setting reaches this process and the
    processes of a local cluster it starts; `arbor up` passes it to ``ray start`` too.
    """
    os.environ.setdefault("RAY_core_worker_internal_heartbeat_ms", RETRY_TIMER_MS)


def probe_address(address: str | None) -> None:
    """Fail fast on a ``host:port`` where no server listens, because ``ray.init`` waits minutes."""
    if address is None or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=_PROBE_TIMEOUT_S):
            pass
    except (OSError, ValueError) as error:
        raise ClusterUnavailable(
            f"no Ray cluster at {address!r} ({error}); start one with `arbor up` or fix "
            "ARBOR_RAY_ADDRESS"
        ) from None


def _warn_if_network_bound() -> None:
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        logger.warning(
            "this local Ray cluster will listen on the machine's network address because "
            "Ray was imported before arbor; import arbor first or set "
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 to keep it on 127.0.0.1"
        )


def _redacted(url: str) -> str:
    from arbor.config import redact_url

    return redact_url(url)
