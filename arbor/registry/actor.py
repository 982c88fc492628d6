"""The ``arbor-registry`` actor: agent names and records, spawning, stopping and reconciling."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import time
import uuid
from typing import Any

import ray
from ray.exceptions import ActorUnschedulableError, RayActorError

from arbor.agent import import_type
from arbor.config import NAMESPACE, Settings
from arbor.errors import (
    AgentNotFound,
    AgentTypeNotImportable,
    ArborError,
    CheckpointNotFound,
    ClusterLeaseLost,
    InvalidArguments,
    QuotaExceeded,
)
from arbor.names import namespace_of
from arbor.observability import mailbox, metrics
from arbor.persistence import (
    ALLOWED,
    FAILED,
    RUNNING,
    STARTING,
    STOPPED,
    AgentRecord,
    AuditEntry,
    CheckpointInfo,
    open_store,
)
from arbor.registry.hosts import HostPool, cpu_nodes
from arbor.registry.info import AgentInfo, actor_name, placement_of
from arbor.registry.locks import NameLocks
from arbor.registry.reminder_spec import ReminderInfo, ReminderRequest
from arbor.registry.reminders import ReminderService
from arbor.registry.security import OPERATOR, CapabilityInfo, CapabilityService, GrantRequest
from arbor.registry.spec import (
    ARBOR_ONLY_KEYS,
    PLACEMENT_KEYS,
    RAY_ACTOR_KEYS,
    WARM_LEND_WAIT_S,
    SpawnSpec,
    is_hosted,
    ray_actor_options,
    spawn_audit,
    spawn_error,
    start_error,
)
from arbor.registry.topics import TopicService
from arbor.registry.warm import WarmActor, WarmPool
from arbor.runtime import kv, telemetry
from arbor.runtime.actor import (
    MOVED_PREFIX,
    WARM_PREFIX,
    create_agent_actor,
    create_warm_actor,
)
from arbor.runtime.host import HOST_PREFIX

logger = logging.getLogger(__name__)

# Why the reconciler creates an agent's actor again: Ray has no actor of that name, or
# the actor is pinned to a node that is gone.
_MISSING = "missing"
_MOVE = "move"

# Seconds a warm pool refill waits after the spawn that started it, so that the spawn's
# reply leaves first. Creating a named actor blocks this event loop until the GCS has
# registered the name, and the actor's new worker process then keeps a CPU core busy.
_REFILL_DELAY_S = 0.05
# Ready warm actors a loan's reply names as spares. A client claims a spare when its
# loan is spent and the next has not arrived, as for a spawn right after another.
_SPARES = 1
# Warm actors a registry spawn tries before it starts cold, when clients claimed the
# ones it took first.
_WARM_RETRIES = 3


class Registry:
    """Owns agent names and records; its state lives in the store, so a restart loses nothing.

    A background reconciler compares the agents that the store marks as running with the actors
    Ray has, and recreates missing ones from their last checkpoint.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        cluster_id, first_start = _cluster_identity()
        # The agent actors this registry starts get the cluster id with their settings.
        self._settings = Settings(**{**settings, "cluster_id": cluster_id})
        telemetry.configure_process(self._settings)
        self._store = open_store(self._settings.database_url, self._settings)
        self._cluster_id = cluster_id
        self._lease = self._store.cluster_lease()
        if first_start or self._lease is None:
            # A new cluster takes over the agents, as during a RayService upgrade.
            self._lease = self._store.claim_cluster_lease(cluster_id)
            logger.info(
                "Ray cluster %s took the cluster lease (generation %d)",
                cluster_id,
                self._lease.generation,
            )
        self._stood_down = False
        self._security = CapabilityService(
            self._store, self._settings, _signing_key(self._settings)
        )
        self._inflight: set[str] = set()
        # Held by a stop and by the reconciler's recreation of the same agent.
        self._names = NameLocks()
        # One lock per namespace around counting its agents and inserting a new one.
        self._quota_locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(
            asyncio.Lock
        )
        self._reconcile_lock = asyncio.Lock()
        self._passes = 0
        self._warm = WarmPool(self._settings)
        # The agent class of each type path the pool has started actors for.
        self._warm_classes: dict[str, type[Any]] = {}
        self._refilling: set[str] = set()
        self._hosts = HostPool(self._settings, self._store)
        self._reconciler = asyncio.get_running_loop().create_task(self._reconcile_forever())
        self._mailbox_sampler = asyncio.get_running_loop().create_task(
            self._sample_mailboxes_forever()
        )
        self._reminders = ReminderService(self._store, self._settings, self._holds_lease)
        self._reminder_loop = asyncio.get_running_loop().create_task(self._reminders.run_forever())
        self._topics = TopicService(
            self._store, self._settings, self._security.guard, self._holds_lease
        )
        self._topic_loop = asyncio.get_running_loop().create_task(self._topics.run_forever())
        logger.info("registry started (pid %d)", os.getpid())

    async def ping(self) -> dict[str, Any]:
        """Return the registry's process id, store URL and reconciler pass count."""
        from arbor.config import redact_url

        return {
            "pid": os.getpid(),
            "database_url": redact_url(self._settings.database_url),
            "reconciler_passes": self._passes,
            "cluster_id": self._cluster_id,
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    async def lease(self) -> dict[str, Any]:
        """Return the cluster lease as the store has it and whether this cluster holds it."""
        lease = await asyncio.to_thread(self._store.cluster_lease)
        if lease is not None:
            self._lease = lease
        return _lease_info(self._cluster_id, lease)

    async def claim_lease(self) -> dict[str, Any]:
        """Take the cluster lease for this cluster, so that its registry runs the agents.

        The cluster that held it stops its agents at its next reconciler pass, and this
        one's reconciler brings them back here from their checkpoints.
        """
        async with self._reconcile_lock:
            self._lease = await asyncio.to_thread(self._store.claim_cluster_lease, self._cluster_id)
            self._stood_down = False
        logger.warning(
            "Ray cluster %s claimed the cluster lease (generation %d)",
            self._cluster_id,
            self._lease.generation,
        )
        await self.reconcile()
        return _lease_info(self._cluster_id, self._lease)

    async def spawn(
        self, spec: SpawnSpec, with_handle: bool = False, lend: bool = False
    ) -> AgentInfo | tuple[AgentInfo, Any, dict[str, Any] | bool | None]:
        """Reserve the name, create the agent's actor and wait until it has restored.

        A retried request with the same ``spawn_id`` finishes the first one instead of
        failing with `NameTaken`. With ``with_handle`` the result is ``(info, handle,
        lent)``. ``handle`` is the warm actor that now runs the agent, or None, and saves
        the caller a lookup of that actor by its Ray name. With ``lend``, ``lent`` is a
        warm actor of the same type lent to the caller for its next spawn (see
        `_lend_warm`), None when none was ready, or False when this registry lends none.
        Without ``lend`` it is None.
        """
        self._require_lease()
        with telemetry.span(
            "arbor.spawn", {"arbor.agent": spec.name, "arbor.type": spec.type_path}
        ):
            info, handle = await self._spawn(spec)
        if not with_handle:
            return info
        if not lend:
            return info, handle, None
        return info, handle, self._lend_warm(spec.type_path) if self._lends() else False

    async def claimed_directly(self, spec: SpawnSpec, actor: str, info: AgentInfo | None) -> None:
        """Record a spawn that a client made in the warm actor ``actor``, lent or a spare.

        ``info`` is None when the claim failed: the actor is then killed, and the record
        of ``spec``, if its first commit stored one, is deleted. Either way the pool
        refills.
        """
        lent = self._warm.claimed(actor)
        if info is None:
            handle = lent.handle if lent is not None else None
            if handle is None:
                with contextlib.suppress(ValueError):
                    handle = ray.get_actor(actor, namespace=NAMESPACE)
            if handle is not None:
                ray.kill(handle, no_restart=True)
            await asyncio.to_thread(self._delete_spawned, spec)
            self._refill_later(spec)
            return
        logger.info(
            "spawned agent %s of type %s in lent warm actor %s", spec.name, spec.type_path, actor
        )
        telemetry.record(metrics.record_audit_row, "spawn", "allow")
        telemetry.record(
            metrics.record_spawn, _type_name(spec.type_path), info.node_id or "unknown"
        )
        _publish_mailbox_limit(spec.name, spec.options)
        self._warm.note_spawn(spec.type_path)
        self._refill_later(spec)

    async def return_loan(self, actor: str) -> None:
        """Take back the lent warm actor ``actor``, which its borrower does not need."""
        self._warm.return_loan(actor)

    async def lend(self, type_path: str) -> dict[str, Any] | None:
        """Lend a warm actor of ``type_path`` to the caller, as `_lend_warm` does.

        While the pool refills, this waits up to WARM_LEND_WAIT_S for a second ready
        actor, so that the reply also names a spare. The caller does not wait for the
        reply: its next spawn uses the loan if the reply is there.
        """
        deadline = time.monotonic() + WARM_LEND_WAIT_S
        while self._lends() and time.monotonic() < deadline:
            ready = self._warm.ready(type_path)
            if ready >= 1 + _SPARES or (ready and type_path not in self._refilling):
                break
            await asyncio.sleep(0.05)
        return self._lend_warm(type_path)

    def _lends(self) -> bool:
        """Return whether this registry lends warm actors at all; see `_lend_warm`."""
        settings = self._settings
        return (
            settings.warm_pool_size > 0
            and settings.max_agents == 0
            and settings.default_placement != "hosted"
        )

    def _lend_warm(self, type_path: str) -> dict[str, Any] | None:
        """Lend a ready warm actor of ``type_path`` to the caller, or return None.

        The caller's next spawn of that type claims the actor directly, which saves the
        two Ray calls through the registry, then calls `claimed_directly`. The actor
        comes back to the pool after WARM_LEND_S unless claimed. Nothing is lent when a
        cap on agents covers every namespace, since only the registry counts them, or
        when spawns default to hosted placement.
        """
        if not self._lends():
            return None
        actor = self._warm.lend(type_path)
        if actor is None:
            return None
        return {
            "actor": actor.name,
            "handle": actor.handle,
            "spares": [
                {"actor": spare.name, "handle": spare.handle}
                for spare in self._warm.name_spares(type_path, _SPARES)
            ],
            "durability": self._settings.durability,
            "capped": sorted(
                namespace for namespace, cap in self._settings.namespace_max_agents.items() if cap
            ),
        }

    async def _spawn(self, spec: SpawnSpec) -> tuple[AgentInfo, Any]:
        """Run `_spawn_once`, again while a client claims the warm actor it took first."""
        for _ in range(_WARM_RETRIES):
            try:
                return await self._spawn_once(spec)
            except _WarmTaken as taken:
                # Nothing of this attempt is stored. The next takes another warm actor or
                # starts cold.
                logger.info(
                    "warm actor %s started agent %s for a client first; agent %s takes another",
                    taken.actor,
                    taken.runs,
                    spec.name,
                )
        return await self._spawn_once(spec, warm=False)

    async def _spawn_once(self, spec: SpawnSpec, warm: bool = True) -> tuple[AgentInfo, Any]:
        if (
            self._settings.default_placement == "hosted"
            and "placement" not in spec.options
            and not any(key in RAY_ACTOR_KEYS for key in spec.options)
        ):
            spec.options = {**spec.options, "placement": "hosted"}
        if "passivate_idle_s" in spec.options and not is_hosted(spec.options):
            raise InvalidArguments(
                f"passivate_idle_s applies to hosted agents only, and this cluster's "
                f"ARBOR_DEFAULT_PLACEMENT is {self._settings.default_placement!r}; add "
                "placement='hosted' to the spawn"
            )
        if spec.spawner is not None and self._settings.enforce_capabilities:
            await asyncio.to_thread(
                self._security.guard.require,
                spec.token,
                spec.spawner,
                f"arbor://agent/spawn/{spec.name}",
            )
        self._inflight.add(spec.name)
        granted = False
        try:
            slot = self._take_warm(spec) if warm else None
            options = spec.options if slot is None else {**spec.options, "actor": slot.name}
            if is_hosted(spec.options):
                options = {**spec.options, "host": await self._hosts.choose()}
            record = AgentRecord(
                name=spec.name,
                type_path=spec.type_path,
                status=STARTING,
                spawn_id=spec.spawn_id,
                options=options,
            )
            if (slot is not None or is_hosted(options)) and not spec.capabilities:
                # One commit: the agent's first commit stores its record, the audit row
                # of the spawn and the first checkpoint together. A spawn with birth
                # capabilities commits its record first, since the grants need it.
                report = await self._start_first_in_live_host(spec, record, slot)
                if report is not None:
                    return await self._spawned(spec, report), None if slot is None else slot.handle
                # An agent of this name exists: the steps below finish a retried spawn
                # or raise NameTaken.
                if slot is not None:
                    self._warm.put_back(spec.type_path, slot)
                    slot = None
                    record.options = spec.options
            try:
                # Counting and inserting under one lock per namespace, so that spawns
                # racing for the last places neither pass the cap nor fail each other.
                async with self._quota_locks[namespace_of(spec.name)]:
                    await self._check_quota(spec)
                    stored = await asyncio.to_thread(self._create_agent, spec, record)
            except BaseException:
                if slot is not None:
                    self._warm.put_back(spec.type_path, slot)
                raise
            if slot is not None and stored.options.get("actor") != slot.name:
                # A retried spawn whose first attempt is recorded; finish that one instead.
                self._warm.put_back(spec.type_path, slot)
                slot = None
            _publish_mailbox_limit(spec.name, spec.options)
            try:
                if spec.capabilities:
                    granted = await asyncio.to_thread(self._grant_at_birth, spec)
            except BaseException:
                # No actor runs yet: free the name and keep the warm actor for later.
                await asyncio.to_thread(self._security.revoke_principal, spec.name)
                await asyncio.to_thread(self._store.delete_agent, spec.name)
                if slot is not None:
                    self._warm.put_back(spec.type_path, slot)
                raise
            if stored.options.get("host"):
                report = await self._activate_hosted(spec, stored)
                return await self._spawned(spec, report), None
            if slot is not None or stored.options.get("actor"):
                claimed, report = await self._claim(spec, stored, slot)
                return await self._spawned(spec, report), claimed
            try:
                handle = self._create_or_get(spec)
            except Exception as error:
                # Ray rejected the actor options (a malformed runtime_env, for example);
                # free the name, since no actor will ever claim it.
                logger.warning("agent %s could not be created: %s", spec.name, error)
                await asyncio.to_thread(self._store.delete_agent, spec.name)
                raise ArborError(
                    f"agent {spec.name!r} could not be created: {type(error).__name__}: "
                    f"{error}; check the placement options {spec.options}"
                ) from None
            try:
                # Without retries: an __init__ that raises ends the actor for good, and a
                # retried call only makes Ray log "infinite retries remaining".
                await asyncio.wait_for(
                    handle.info.options(max_task_retries=0).remote(),
                    self._settings.spawn_timeout_s,
                )
            except RayActorError as error:
                await asyncio.to_thread(self._store.delete_agent, spec.name)
                # The new incarnation may have found that another cluster took the lease.
                lease = await asyncio.to_thread(self._store.cluster_lease)
                if lease is not None and lease.holder != self._cluster_id:
                    self._lease = lease
                    raise ClusterLeaseLost(self._cluster_id, lease.holder) from None
                raise spawn_error(spec.name, error) from None
            except ActorUnschedulableError as error:
                await asyncio.to_thread(self._store.delete_agent, spec.name)
                raise ArborError(
                    f"agent {spec.name!r} cannot be placed: {_one_line(error)}; check node_id "
                    f"and node_affinity in {spec.options}"
                ) from None
            except asyncio.TimeoutError:
                ray.kill(handle, no_restart=True)
                await asyncio.to_thread(self._store.delete_agent, spec.name)
                raise ArborError(
                    f"agent {spec.name!r} did not start within "
                    f"{self._settings.spawn_timeout_s} s; check that the cluster has the "
                    f"resources it asks for ({spec.options or 'defaults'}) or raise "
                    "ARBOR_SPAWN_TIMEOUT_S"
                ) from None
        except BaseException:
            if granted:
                # The name is free again, so its birth capabilities must not outlive it.
                await asyncio.to_thread(self._security.revoke_principal, spec.name)
            raise
        finally:
            self._inflight.discard(spec.name)
        return await self._spawned(spec), None

    async def _check_quota(self, spec: SpawnSpec) -> None:
        """Raise `QuotaExceeded` when the new agent's namespace has no room left.

        A retried spawn whose record exists already has its place. The caller must hold
        the namespace's quota lock.
        """
        namespace = namespace_of(spec.name)
        limit = self._settings.agent_cap(namespace)
        if limit == 0:
            return
        existing = await asyncio.to_thread(self._store.get_agent, spec.name)
        if existing is not None and existing.spawn_id == spec.spawn_id:
            return
        count = await asyncio.to_thread(self._store.count_agents, (RUNNING, STARTING), namespace)
        if count >= limit:
            setting = (
                "ARBOR_NAMESPACE_MAX_AGENTS"
                if namespace in self._settings.namespace_max_agents
                else "ARBOR_MAX_AGENTS"
            )
            raise QuotaExceeded(spec.name, limit, namespace, count, setting)

    def _create_agent(self, spec: SpawnSpec, record: AgentRecord) -> AgentRecord:
        """Store the new agent's record together with the audit row of its spawn.

        The row records the allowed request when the name is reserved, so it stays when
        the agent then fails to start. A retried spawn whose record exists adds no row.
        """
        stored, audited = self._store.create_agent_audited(record, spawn_audit(spec))
        if audited is not None:
            telemetry.record(metrics.record_audit_row, "spawn", "allow")
        return stored

    async def _start_first_in_live_host(
        self, spec: SpawnSpec, record: AgentRecord, slot: WarmActor | None
    ) -> dict[str, Any] | None:
        """Run `_start_first`, and once more in another host if the chosen one is gone.

        A host killed since the last reconciler pass is still in the pool, so a spawn may
        choose it. Nothing of such a spawn is stored, so it can start over.
        """
        try:
            return await self._start_first(spec, record, slot)
        except _HostGone as gone:
            record.options = {**record.options, "host": await self._hosts.choose()}
            logger.warning(
                "host %s is gone; agent %s starts in host %s instead",
                gone,
                spec.name,
                record.options["host"],
            )
        try:
            return await self._start_first(spec, record, slot)
        except _HostGone as gone:
            raise ArborError(
                f"agent {spec.name!r} failed to start because the hosts chosen for it are "
                f"gone (the last was {gone}); spawn it again"
            ) from None

    async def _start_first(
        self, spec: SpawnSpec, record: AgentRecord, slot: WarmActor | None
    ) -> dict[str, Any] | None:
        """Start the agent in its host or warm actor, whose first commit stores its record.

        One transaction then stores the record, the spawn's audit row and the first
        checkpoint. The other path commits the record before the agent starts.

        Returns:
            The reply of the host's `activate` or the warm actor's `claim`. None means
            that an agent of that name exists: nothing was written, and the warm actor
            is still ready.
        """
        namespace = namespace_of(spec.name)
        # Under an agent cap, the count and the commit that adds the agent hold the
        # namespace's lock, so that racing spawns cannot pass the cap together.
        capped = self._settings.agent_cap(namespace) != 0
        audit = spawn_audit(spec)
        try:
            async with self._quota_locks[namespace] if capped else contextlib.nullcontext():
                await self._check_quota(spec)
                if slot is None:
                    report = await self._activate_hosted(spec, record, audit)
                else:
                    _, report = await self._claim(spec, record, slot, audit)
        except QuotaExceeded:
            if slot is None:
                self._hosts.forget_agent(record.options["host"])
            else:
                self._warm.put_back(spec.type_path, slot)
            raise
        if report.get("taken"):
            if slot is None:
                self._hosts.forget_agent(record.options["host"])
            return None
        telemetry.record(metrics.record_audit_row, "spawn", "allow")
        _publish_mailbox_limit(spec.name, spec.options)
        return report

    async def _spawned(self, spec: SpawnSpec, report: dict[str, Any] | None = None) -> AgentInfo:
        """Finish a spawn; ``report`` is the reply of the host or warm actor that started it."""
        logger.info("spawned agent %s of type %s", spec.name, spec.type_path)
        # A spawn's first commit returns the record, which saves reading it back.
        started = report.get("record") if report is not None else None
        info = AgentInfo.from_record(started) if started is not None else await self.info(spec.name)
        telemetry.record(
            metrics.record_spawn, _type_name(spec.type_path), info.node_id or "unknown"
        )
        self._refill_later(spec)
        return info

    def _grant_at_birth(self, spec: SpawnSpec) -> bool:
        """Grant the spawn's capabilities once; returns whether this call granted any."""
        if not spec.capabilities or self._store.list_capabilities(spec.name):
            return False
        for request in spec.capabilities:
            if spec.spawner is None:
                self._security.grant(spec.name, request)
            else:
                self._security.delegate_covering(spec.spawner, spec.name, request)
        return True

    async def grant(
        self, principal: str, request: GrantRequest, granted_by: str = OPERATOR
    ) -> CapabilityInfo:
        """Issue a capability to ``principal`` on the operator's authority.

        ``granted_by`` is recorded as the grantor: an API key that the gateway checked for
        ``arbor://capability/grant/<principal>``, or the operator.
        """
        return await asyncio.to_thread(self._security.grant, principal, request, granted_by)

    async def delegate(
        self, holder: str, parent_id: str, to_principal: str, request: GrantRequest | None
    ) -> CapabilityInfo:
        """Derive a narrower capability from one that ``holder`` has, for ``to_principal``."""
        return await asyncio.to_thread(
            self._security.delegate, holder, parent_id, to_principal, request
        )

    async def revoke(
        self, capability_id: str, by: str = OPERATOR, checked: bool = False
    ) -> list[str]:
        """Revoke a capability and all delegated from it; returns the revoked ids.

        ``checked`` is True when the gateway has already checked that ``by`` holds
        ``arbor://capability/revoke/<holder>``.
        """
        return await asyncio.to_thread(self._security.revoke, capability_id, by, checked)

    async def capabilities(
        self,
        principal: str | None = None,
        include_revoked: bool = False,
        namespace: str | None = None,
    ) -> list[CapabilityInfo]:
        """Return the capabilities of ``principal`` (or all), oldest first.

        ``namespace`` keeps those held by that namespace's principals, which leaves out
        API keys; None keeps every principal's.
        """
        return await asyncio.to_thread(self._security.list, principal, include_revoked, namespace)

    async def _claim(
        self,
        spec: SpawnSpec,
        record: AgentRecord,
        slot: WarmActor | None,
        audit: AuditEntry | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        """Start the agent inside the warm actor its record names.

        With ``audit``, the record is not stored yet and the warm actor stores it.

        Returns:
            The warm actor's handle and the reply of its `claim`.
        """
        name = actor_name(record)
        handle = slot.handle if slot is not None else ray.get_actor(name, namespace=NAMESPACE)
        durability = spec.options.get("durability", self._settings.durability)
        try:
            report = await asyncio.wait_for(
                handle.claim.remote(
                    spec.name, spec.init_args, spec.init_kwargs, durability, record, audit
                ),
                self._settings.spawn_timeout_s,
            )
        except Exception as error:
            # The warm actor is half made: drop it and free the name, as a failed cold spawn does.
            ray.kill(handle, no_restart=True)
            await asyncio.to_thread(self._delete_spawned, spec)
            raise start_error(spec.name, error, f"warm actor {name}", self._settings) from None
        if report.get("runs") is not None:
            # A client claimed this actor directly, as a spare or after its loan ended,
            # and it keeps that agent.
            await asyncio.to_thread(self._delete_spawned, spec)
            raise _WarmTaken(name, report["runs"])
        return handle, report

    def _delete_spawned(self, spec: SpawnSpec) -> None:
        """Delete the record that ``spec`` stored, and leave the agent of another spawn alone."""
        # NOTE: the read and the delete are separate transactions. A purge and a new spawn
        # of the same name between them would lose the new record; nothing prevents that.
        record = self._store.get_agent(spec.name)
        if record is not None and record.spawn_id == spec.spawn_id:
            self._store.delete_agent(spec.name)

    async def _activate_hosted(
        self, spec: SpawnSpec, record: AgentRecord, audit: AuditEntry | None = None
    ) -> dict[str, Any]:
        """Start the agent in the host its record names, and return the host's reply.

        With ``audit``, the record is not stored yet and the host stores it.
        """
        host = record.options["host"]
        try:
            handle = self._hosts.handle(host)
            report: dict[str, Any] = await asyncio.wait_for(
                handle.activate.remote(record, spec.init_args, spec.init_kwargs, audit),
                self._settings.spawn_timeout_s,
            )
        except Exception as error:
            # The host keeps running its other agents; only this name is freed.
            self._hosts.forget_agent(host)
            await asyncio.to_thread(self._delete_spawned, spec)
            # Only a spawn that stores its record in the host can start over elsewhere.
            retry = audit is not None and isinstance(error, RayActorError)
            if retry and await self._hosts.gone(host):
                raise _HostGone(host) from None
            raise start_error(spec.name, error, f"host {host}", self._settings) from None
        return report

    def _take_warm(self, spec: SpawnSpec) -> WarmActor | None:
        """Return a ready warm actor for ``spec``, or None when it needs a cold start."""
        if is_hosted(spec.options):
            return None
        if any(key not in ARBOR_ONLY_KEYS for key in spec.options if key in PLACEMENT_KEYS):
            return None
        self._warm.note_spawn(spec.type_path)
        return self._warm.take(spec.type_path)

    def _refill_later(self, spec: SpawnSpec) -> None:
        size = self._settings.warm_pool_size
        if size == 0 or spec.type_path in self._refilling or is_hosted(spec.options):
            return
        if any(key not in ARBOR_ONLY_KEYS for key in spec.options if key in PLACEMENT_KEYS):
            return
        self._refilling.add(spec.type_path)
        asyncio.get_running_loop().create_task(self._refill(spec.type_path, spec.agent_class))

    async def _refill(self, type_path: str, agent_class: type[Any]) -> None:
        """Start warm actors one at a time until each node with CPUs has its share."""
        self._warm_classes[type_path] = agent_class
        self._warm.register(type_path)
        try:
            await asyncio.sleep(_REFILL_DELAY_S)
            while True:
                missing = self._warm.missing(type_path, await asyncio.to_thread(cpu_nodes))
                if not missing:
                    return
                name = f"{WARM_PREFIX}{uuid.uuid4().hex[:16]}"
                handle = create_warm_actor(name, agent_class, self._settings, missing[0])
                try:
                    await asyncio.wait_for(
                        handle.info.options(max_task_retries=0).remote(),
                        self._settings.spawn_timeout_s,
                    )
                except Exception as error:
                    ray.kill(handle, no_restart=True)
                    logger.warning(
                        "warm actor for %s did not start on node %s (%s); spawns of it start cold",
                        type_path,
                        missing[0],
                        _one_line(error),
                    )
                    return
                self._warm.add(type_path, WarmActor(name, handle, missing[0]))
        finally:
            self._refilling.discard(type_path)

    async def _resize_warm(self) -> None:
        """Kill the ready warm actors past each pool's target or on a node that is gone.

        Then refill the pools below their target, as after a node joined.
        """
        nodes = await asyncio.to_thread(cpu_nodes)
        for type_path in self._warm.type_paths():
            for actor in self._warm.surplus(type_path, nodes):
                logger.info("removing warm actor %s of %s from the pool", actor.name, type_path)
                with contextlib.suppress(Exception):
                    ray.kill(actor.handle, no_restart=True)
            agent_class = self._warm_classes.get(type_path)
            refill = agent_class is not None and type_path not in self._refilling
            if refill and self._warm.missing(type_path, nodes):
                self._refilling.add(type_path)
                asyncio.get_running_loop().create_task(self._refill(type_path, agent_class))

    async def set_reminder(
        self, agent: str, request: ReminderRequest, by: str | None = None
    ) -> ReminderInfo:
        """Store a durable reminder for ``agent``; ``by`` is the agent itself or None."""
        return await self._reminders.set_reminder(agent, request, by)

    async def reminders(
        self, agent: str | None = None, by: str | None = None, namespace: str | None = None
    ) -> list[ReminderInfo]:
        """Return the reminders of ``agent`` (every agent's when None), soonest first.

        ``namespace`` keeps the reminders of that namespace's agents; None keeps all.

        Raises:
            AgentNotFound: ``agent`` names no registered agent.
        """
        if agent is not None:
            await self.info(agent)
        return await self._reminders.list_reminders(agent, by, namespace)

    async def cancel_reminder(self, agent: str, name: str, by: str | None = None) -> bool:
        """Delete a reminder; returns whether it existed.

        Raises:
            AgentNotFound: ``agent`` names no registered agent.
        """
        await self.info(agent)
        return await self._reminders.cancel_reminder(agent, name, by)

    async def topic(self, request: str, *args: Any) -> Any:
        """Serve one topic request, such as ``subscribe`` or ``poll`` (see `TopicService`)."""
        return await self._topics.request(request, *args)

    async def hosts(self) -> list[dict[str, Any]]:
        """Return each host's name, process, node and agent counts."""
        reports = []
        for name in self._hosts.names:
            try:
                reports.append(await asyncio.wait_for(self._hosts.handle(name).ping.remote(), 10.0))
            except (ValueError, RayActorError, asyncio.TimeoutError) as error:
                reports.append({"name": name, "error": type(error).__name__})
        return reports

    async def warm_pool(self) -> dict[str, int]:
        """Return the number of ready warm actors per agent type, lent ones included."""
        return self._warm.counts()

    async def warm_actors(self) -> list[dict[str, Any]]:
        """Describe each ready or lent warm actor: type path, Ray name, node and whether lent."""
        return self._warm.actors()

    async def locate(self, name: str) -> dict[str, str] | None:
        """Return the agent's status and Ray actor name, or None if no agent has the name.

        In a cluster without the cluster lease the result also names this cluster and the
        lease holder, because the agent runs in the holder's cluster.
        """
        record = await asyncio.to_thread(self._store.get_agent, name)
        if record is None:
            return None
        located = {"status": record.status, "actor": actor_name(record)}
        if placement_of(record) == "hosted":
            located["placement"] = "hosted"
        if not self._holds_lease():
            assert self._lease is not None
            located.update(cluster_id=self._cluster_id, lease_holder=self._lease.holder)
        return located

    async def stop(
        self, name: str, purge: bool = False, by: str | None = None, token: str | None = None
    ) -> None:
        """Stop an agent after it commits its state; ``purge`` also deletes the state.

        ``by`` names the agent that requests the stop, which must present ``token``
        granting ``arbor://agent/stop/<name>``; None is the operator.
        """
        if by is not None and self._settings.enforce_capabilities:
            await asyncio.to_thread(
                self._security.guard.require, token, by, f"arbor://agent/stop/{name}"
            )
        async with self._names.hold(name):
            await self._stop(name, purge, by)

    async def _stop(self, name: str, purge: bool, by: str | None) -> None:
        record = await asyncio.to_thread(self._store.get_agent, name)
        if record is None:
            raise AgentNotFound(name)
        await asyncio.to_thread(self._store.set_status, name, STOPPED)
        kv.delete(kv.max_pending_key(name))
        actor = actor_name(record)
        try:
            handle = ray.get_actor(actor, namespace=NAMESPACE)
        except ValueError:
            handle = None
        if handle is not None and placement_of(record) == "hosted":
            await self._stop_hosted(record, handle)
        elif handle is not None:
            try:
                await asyncio.wait_for(handle.stop.remote(), self._settings.stop_timeout_s)
            except asyncio.TimeoutError:
                logger.warning(
                    "agent %s did not finish on_stop and its final checkpoint within "
                    "ARBOR_STOP_TIMEOUT_S (%s s); killing it, so it keeps its last checkpoint",
                    name,
                    self._settings.stop_timeout_s,
                )
            except RayActorError as error:
                logger.warning("agent %s did not stop cleanly (%s); killing it", name, error)
            ray.kill(handle, no_restart=True)
            # A spawn under the same name right after a purge must not find this actor.
            await self._wait_name_free(actor)
        await asyncio.to_thread(self._security.revoke_principal, name, by or OPERATOR)
        await self._reminders.forget_agent(name)
        await self._topics.forget_agent(name)
        if purge:
            await asyncio.to_thread(self._store.delete_agent, name)
        await asyncio.to_thread(
            self._security.audit,
            by or OPERATOR,
            "stop",
            f"arbor://agent/stop/{name}",
            ALLOWED,
            purge=purge,
        )
        telemetry.record(
            metrics.record_stop,
            _type_name(record.type_path),
            record.node_id or "unknown",
            "purged" if purge else "requested",
        )
        logger.info("stopped agent %s%s", name, " and purged its state" if purge else "")

    async def _stop_hosted(self, record: AgentRecord, host: Any) -> None:
        """Stop a hosted agent inside its host, which keeps running its other agents.

        The host fences the agent itself when ``on_stop`` outlasts ``ARBOR_STOP_TIMEOUT_S``,
        so this waits a little longer than that.
        """
        try:
            await asyncio.wait_for(
                host.stop_agent.remote(record.name), self._settings.stop_timeout_s + 10
            )
        except (asyncio.TimeoutError, RayActorError) as error:
            # Fenced, so an incarnation still running cannot commit after the stop.
            await asyncio.to_thread(self._store.fence, record.name)
            logger.warning(
                "hosted agent %s did not stop cleanly (%s); it was fenced off",
                record.name,
                type(error).__name__,
            )
        self._hosts.forget_agent(actor_name(record))

    async def restore(self, name: str, version: int) -> AgentInfo:
        """Make checkpoint ``version`` the agent's latest state and restart it on that state."""
        self._require_lease()
        record = await asyncio.to_thread(self._store.get_agent, name)
        if record is None:
            raise AgentNotFound(name)
        if record.status == STOPPED:
            raise AgentNotFound(
                name,
                "it is stopped, and a stopped agent does not run again; read its state with "
                "arbor.list_checkpoints, or purge it and spawn it anew",
            )
        checkpoint = await asyncio.to_thread(self._store.load_checkpoint, name, version)
        if checkpoint is None:
            available = await asyncio.to_thread(self._store.list_checkpoints, name)
            raise CheckpointNotFound(
                f"agent {name!r} has no checkpoint version {version}; kept versions: "
                f"{[info.version for info in available]} (ARBOR_CHECKPOINT_KEEP sets how many "
                "are kept)"
            )
        # Fencing first means the running incarnation can no longer commit over the
        # restored state; the restart below then loads it.
        epoch = await asyncio.to_thread(self._store.fence, name)
        await asyncio.to_thread(
            self._store.write_checkpoint,
            name,
            epoch,
            json.dumps(checkpoint.state),
            checkpoint.processed,
            self._settings.checkpoint_keep,
        )
        if record.status == RUNNING:
            try:
                handle = ray.get_actor(actor_name(record), namespace=NAMESPACE)
            except ValueError:
                handle = None
            if handle is not None and placement_of(record) == "hosted":
                await asyncio.wait_for(handle.reload.remote(name), self._settings.spawn_timeout_s)
            elif handle is not None:
                # The restarted incarnation reads this to call on_recover("rollback").
                kv.put(kv.rollback_key(name), b"rollback")
                ray.kill(handle, no_restart=False)
                await self._wait_for_incarnation(name, handle, newer_than=epoch)
        logger.info("agent %s restored to checkpoint version %d", name, version)
        return await self.info(name)

    async def info(self, name: str) -> AgentInfo:
        """Return the agent's record.

        Raises:
            AgentNotFound: no agent has this name.
        """
        record = await asyncio.to_thread(self._store.get_agent, name)
        if record is None:
            raise AgentNotFound(name)
        return AgentInfo.from_record(record)

    async def status(self, name: str) -> str | None:
        """Return the agent's status, or None if no agent has this name."""
        record = await asyncio.to_thread(self._store.get_agent, name)
        return record.status if record else None

    async def list_agents(
        self,
        status: str | None = None,
        namespace: str | None = None,
        prefix: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[AgentInfo]:
        """Return the agents that match every given filter, ordered by name.

        The store applies the filters, so only the matching records are read and sent.

        Args:
            status: only agents with this status.
            namespace: only agents of this namespace; None for every namespace.
            prefix: only agents whose full name starts with this text.
            after: only agents whose name sorts after this one; the last name of a page.
            limit: at most this many agents.
        """
        records = await asyncio.to_thread(
            self._store.list_agents, status, namespace, prefix=prefix, after=after, limit=limit
        )
        infos = [AgentInfo.from_record(record) for record in records]
        passivated = await self._hosts.passivated(
            [
                (info.actor, info.name)
                for info in infos
                if info.placement == "hosted" and info.status == RUNNING
            ]
        )
        return [
            dataclasses.replace(info, passivated=True) if info.name in passivated else info
            for info in infos
        ]

    async def checkpoints(self, name: str) -> list[CheckpointInfo]:
        """Return the kept checkpoint versions of an agent, newest first."""
        if await asyncio.to_thread(self._store.get_agent, name) is None:
            raise AgentNotFound(name)
        return await asyncio.to_thread(self._store.list_checkpoints, name)

    async def reconcile(self) -> list[str]:
        """Run one reconciler pass now; returns the names of the agents it recreated.

        A cluster that lost the cluster lease recreates nothing; its first pass after the
        loss stops the agent actors it still runs.
        """
        async with self._reconcile_lock:
            lease = await asyncio.to_thread(self._store.cluster_lease)
            if lease is not None:
                self._lease = lease
            if not self._holds_lease():
                if not self._stood_down:
                    await self._stand_down()
                self._passes += 1
                return []
            records = await asyncio.to_thread(self._store.list_agents)
            alive_nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
            recreated = []
            for record in records:
                if placement_of(record) == "hosted":
                    continue
                needed = await self._needs_recreation(record, alive_nodes)
                if needed and await self._recreate(record, alive_nodes, moving=needed == _MOVE):
                    recreated.append(record.name)
            recreated += await self._hosts.reconcile(
                [record for record in records if not self._changing(record.name)]
            )
            await self._resize_warm()
            self._passes += 1
            self._report_gauges(records, alive_nodes)
            return recreated

    def _changing(self, name: str) -> bool:
        """Return whether a spawn or a stop of agent ``name`` is under way."""
        return name in self._inflight or self._names.busy(name)

    def _holds_lease(self) -> bool:
        return self._lease is None or self._lease.holder == self._cluster_id

    def _require_lease(self) -> None:
        if not self._holds_lease():
            assert self._lease is not None
            raise ClusterLeaseLost(self._cluster_id, self._lease.holder)

    async def _stand_down(self) -> None:
        """Stop this cluster's agent and warm actors after another cluster took the lease.

        Their agents come back in the holder's cluster, from the same checkpoints; killing
        the actors here keeps two incarnations from taking turns fencing each other.
        """
        assert self._lease is not None
        logger.warning(
            "Ray cluster %s lost the cluster lease to cluster %s (generation %d); stopping "
            "its agent actors here, and recreating none",
            self._cluster_id,
            self._lease.holder,
            self._lease.generation,
        )
        records = await asyncio.to_thread(self._store.list_agents)
        names = {actor_name(record) for record in records}
        named = await asyncio.to_thread(ray.util.list_named_actors, True)
        for entry in named:
            name = entry["name"]
            if entry["namespace"] != NAMESPACE:
                continue
            if name in names or name.startswith((WARM_PREFIX, HOST_PREFIX)):
                with contextlib.suppress(ValueError):
                    ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        self._warm.clear()
        self._stood_down = True

    async def _needs_recreation(self, record: AgentRecord, alive_nodes: set[str]) -> str | None:
        """Return why the agent's actor must be created again, or None if it need not be.

        `_MISSING`: Ray has no actor of that name. `_MOVE`: the actor is pinned with hard
        affinity to a node that is gone, so Ray can never schedule it again.
        """
        if record.status not in (RUNNING, STARTING) or self._changing(record.name):
            return None
        if record.status == STARTING and record.updated_at is not None:
            age = time.time() - record.updated_at.timestamp()
            if age < self._settings.reconcile_grace_s:
                return None
        actor = actor_name(record)
        try:
            handle = await asyncio.to_thread(ray.get_actor, actor, NAMESPACE)
        except ValueError:
            return _MISSING
        options = record.options
        pinned_node = options.get("node_id")
        if options.get("node_affinity") == "hard" and pinned_node not in alive_nodes:
            logger.warning(
                "agent %s is pinned to node %s, which is gone; recreating it on another node",
                record.name,
                pinned_node,
            )
            try:
                ray.kill(handle, no_restart=True)
            except Exception as error:
                # Ray 2.60 sometimes fails to kill an actor whose node is gone and keeps its
                # name taken, so the replacement takes a Ray name of its own.
                logger.warning(
                    "could not kill actor %s of agent %s on lost node %s: %s",
                    actor,
                    record.name,
                    pinned_node,
                    _one_line(error),
                )
            return _MOVE
        return None

    async def _recreate(
        self, record: AgentRecord, alive_nodes: set[str], moving: bool = False
    ) -> bool:
        """Create the agent's actor again from its checkpoint; returns whether it did.

        The pass read ``record`` before it got here, so the agent is read again under its
        name's lock: one stopped, purged or spawned anew since then is left alone.
        """
        if self._changing(record.name):
            return False
        async with self._names.hold(record.name):
            current = await asyncio.to_thread(self._store.get_agent, record.name)
            if (
                current is None
                or current.spawn_id != record.spawn_id
                or current.status not in (RUNNING, STARTING)
                or record.name in self._inflight
            ):
                return False
            return await self._recreate_current(current, alive_nodes, moving)

    async def _recreate_current(
        self, record: AgentRecord, alive_nodes: set[str], moving: bool
    ) -> bool:
        """Create the actor of an agent whose record was just read.

        A moving agent (its hard-pinned node is gone) loses the pin and gets a fresh Ray
        actor name, since the old actor may keep its name after the failed node.
        """
        try:
            agent_class = import_type(record.type_path)
        except AgentTypeNotImportable as error:
            await self._fail(record.name, str(error))
            return False
        if record.checkpoint_version == 0:
            await self._fail(
                record.name,
                "the spawn did not finish and no checkpoint exists; stop the agent with "
                "purge=True and spawn it again",
            )
            return False
        options = record.options
        ray_name = record.name
        moved = str(options.get("actor", "")).startswith(MOVED_PREFIX)
        if moving or moved:
            # The new Ray name is stored before the actor exists, so a registry restart in
            # between still finds the agent's actor by it.
            ray_name = f"{MOVED_PREFIX}{uuid.uuid4().hex[:16]}"
            unpinned = ("node_id", "node_affinity", "actor")
            options = {key: value for key, value in options.items() if key not in unpinned}
            options["actor"] = ray_name
            await asyncio.to_thread(self._store.update_options, record.name, options)
        elif "actor" in options:
            # The warm actor that ran it is gone; the agent comes back under its own name.
            options = {key: value for key, value in options.items() if key != "actor"}
            await asyncio.to_thread(self._store.update_options, record.name, options)
        node_alive = options.get("node_id") in alive_nodes if options.get("node_id") else True
        # A new Ray cluster's key-value store lacks the limits the old one held.
        _publish_mailbox_limit(record.name, options)
        try:
            create_agent_actor(
                record.name,
                agent_class,
                self._settings,
                ray_actor_options(options, node_alive=node_alive),
                None,
                None,
                options.get("durability", self._settings.durability),
                ray_name=ray_name,
            )
        except ValueError:
            # Another pass or a spawn created it since the check; nothing to do.
            return False
        telemetry.record(metrics.record_reconciler_action, "recreate")
        logger.info(
            "reconciler recreated agent %s from checkpoint version %d",
            record.name,
            record.checkpoint_version,
        )
        return True

    def _report_gauges(self, records: list[AgentRecord], alive_nodes: set[str]) -> None:
        """Set the active-agent gauges and the node counts from one reconciler pass."""
        counts: dict[tuple[str, str], int] = {}
        for record in records:
            key = (_type_name(record.type_path), record.node_id or "unknown")
            counts.setdefault(key, 0)
            if record.status == RUNNING:
                counts[key] += 1
        for (agent_type, node), count in counts.items():
            telemetry.record(metrics.set_active_agents, agent_type, node, count)
        dead = sum(1 for node in ray.nodes() if not node["Alive"])
        telemetry.record(metrics.set_nodes, len(alive_nodes), dead)

    async def _fail(self, name: str, reason: str) -> None:
        logger.error("agent %s cannot be recreated: %s", name, reason)
        await asyncio.to_thread(self._store.set_status, name, FAILED, reason)

    async def _reconcile_forever(self) -> None:
        try:
            await self._remove_stray_warm_actors()
        except Exception:
            logger.exception("could not remove warm actors left by an earlier registry")
        while True:
            try:
                await self.reconcile()
            except Exception:
                logger.exception(
                    "reconciler pass failed; retrying in %.1f s",
                    self._settings.reconcile_interval_s,
                )
            await asyncio.sleep(self._settings.reconcile_interval_s)

    async def _sample_mailboxes_forever(self) -> None:
        """Set the mailbox depth gauges from Ray's task state and the hosts at an interval."""
        interval = self._settings.mailbox_sample_interval_s
        if interval == 0 or not self._settings.metrics:
            return
        reported: set[tuple[str, str]] = set()
        failing = False
        while True:
            await asyncio.sleep(interval)
            try:
                reported = await asyncio.to_thread(self._sample_mailboxes, reported)
                failing = False
            except Exception as error:
                # Logged once per outage: the dashboard may be restarting or overloaded.
                if not failing:
                    logger.warning(
                        "could not read mailbox depths: %s; retrying every %.0f s",
                        _one_line(error),
                        interval,
                    )
                failing = True

    def _sample_mailboxes(self, reported: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """Set the gauge for each agent type and node; returns the keys that were non-zero.

        Keys that were non-zero at the last sample and have nothing queued now are set to 0.
        Dedicated agents count only with the Ray dashboard, which serves the state API.
        """
        records = self._store.list_agents(RUNNING)
        depths: collections.Counter[tuple[str, str]] = collections.Counter()
        api_url = mailbox.state_api_url()
        if api_url is not None:
            agent_types = {_type_name(record.type_path) for record in records}
            depths.update(mailbox.sample_depths(api_url, agent_types))
        hosted = {
            record.name: _type_name(record.type_path)
            for record in records
            if placement_of(record) == "hosted"
        }
        hosts = self._hosts.handles()
        if hosted and hosts:
            depths.update(mailbox.sample_hosted_depths(hosts, hosted))
        for agent_type, node in reported | set(depths):
            telemetry.record(
                metrics.set_mailbox_depth, agent_type, node, depths.get((agent_type, node), 0)
            )
        return set(depths)

    async def _remove_stray_warm_actors(self) -> None:
        """Kill the unclaimed warm actors of an earlier registry incarnation.

        Their list lived in that incarnation's memory, so no spawn would ever claim them.
        """
        names = await asyncio.to_thread(ray.util.list_named_actors, True)
        warm = {
            entry["name"]
            for entry in names
            if entry["namespace"] == NAMESPACE and entry["name"].startswith(WARM_PREFIX)
        }
        if not warm:
            return
        records = await asyncio.to_thread(self._store.list_agents)
        for name in warm - {actor_name(record) for record in records}:
            try:
                ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
                logger.info("removed unclaimed warm actor %s", name)
            except ValueError:
                pass

    def _create_or_get(self, spec: SpawnSpec) -> Any:
        try:
            return create_agent_actor(
                spec.name,
                spec.agent_class,
                self._settings,
                ray_actor_options(spec.options),
                spec.init_args,
                spec.init_kwargs,
                spec.options.get("durability", self._settings.durability),
            )
        except ValueError as error:
            # A retried spawn after a registry restart: the first attempt's actor exists.
            # Any other ValueError is Ray's own complaint about the options, kept as is.
            try:
                return ray.get_actor(spec.name, namespace=NAMESPACE)
            except ValueError:
                raise error from None

    async def _wait_for_incarnation(self, name: str, handle: Any, newer_than: int) -> None:
        """Wait until an incarnation newer than ``newer_than`` replies to `info`.

        The killed incarnation may still reply for a moment after `ray.kill`, so one reply
        does not prove the restart.
        """
        deadline = time.monotonic() + self._settings.spawn_timeout_s
        while time.monotonic() < deadline:
            try:
                info = await asyncio.wait_for(
                    handle.info.remote(), max(deadline - time.monotonic(), 0.1)
                )
            except (RayActorError, asyncio.TimeoutError) as error:
                logger.warning("agent %s has not come back after restore yet: %s", name, error)
                await asyncio.sleep(0.1)
                continue
            if info["incarnation"] > newer_than:
                return
            await asyncio.sleep(0.05)
        logger.warning(
            "agent %s did not restart within %s s after restore",
            name,
            self._settings.spawn_timeout_s,
        )

    async def _wait_name_free(self, name: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                await asyncio.to_thread(ray.get_actor, name, NAMESPACE)
            except ValueError:
                return
            await asyncio.sleep(0.1)


def _cluster_identity() -> tuple[str, bool]:
    """Return this Ray cluster's id and whether this call created it.

    The id lives in the cluster's GCS, so a restarted registry keeps it and a new Ray
    cluster gets a new one.
    """
    candidate = uuid.uuid4().hex[:12]
    if not kv.put(kv.CLUSTER_ID, candidate.encode(), overwrite=False):
        return candidate, True
    stored = kv.get(kv.CLUSTER_ID)
    assert stored is not None
    return stored.decode(), False


class _HostGone(Exception):
    """The host chosen for a spawn is gone for good; nothing of the spawn was stored."""


class _WarmTaken(Exception):
    """A client claimed the warm actor of a spawn first; nothing of the spawn is stored."""

    def __init__(self, actor: str, runs: str) -> None:
        super().__init__(actor, runs)
        self.actor = actor
        self.runs = runs


def _publish_mailbox_limit(name: str, options: dict[str, Any]) -> None:
    """Make the agent's ``max_pending`` limit readable by every process of the cluster."""
    limit = options.get("max_pending")
    if limit is not None:
        kv.put(kv.max_pending_key(name), str(limit).encode())


def _lease_info(cluster_id: str, lease: Any) -> dict[str, Any]:
    return {
        "cluster_id": cluster_id,
        "holder": lease.holder if lease else None,
        "generation": lease.generation if lease else 0,
        "claimed_at": lease.claimed_at.isoformat() if lease else None,
        "held": lease is None or lease.holder == cluster_id,
    }


def _type_name(type_path: str) -> str:
    """Return the class name of ``module:QualName``, the bounded agent type label."""
    return type_path.rsplit(":", 1)[-1]


def _signing_key(settings: Settings) -> bytes | None:
    """Read the cluster signing key from the secret provider, when one is configured."""
    if not settings.signing_key_secret:
        return None
    from arbor.security.secrets import provider_from_settings, signing_key

    provider = provider_from_settings(settings)
    try:
        return signing_key(settings, provider)
    finally:
        provider.close()


def _one_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__
