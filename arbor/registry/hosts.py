"""The registry's host actors: starting them, placing hosted agents, moving lost agents."""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from typing import Any

import ray

from arbor.config import NAMESPACE, Settings
from arbor.observability import metrics
from arbor.persistence import RUNNING, STARTING, AgentRecord, CheckpointStore
from arbor.runtime import telemetry
from arbor.runtime.host import HOST_PREFIX, create_host_actor

logger = logging.getLogger(__name__)


class HostPool:
    """The host actors of this cluster and the number of agents each runs.

    The counts are rebuilt from the store at every reconciler pass and kept up to date
    between passes by the registry's spawns and stops.
    """

    def __init__(self, settings: Settings, store: CheckpointStore) -> None:
        self._settings = settings
        self._store = store
        self._hosts: dict[str, Any] = {}
        self._load: collections.Counter[str] = collections.Counter()
        self._lock = asyncio.Lock()
        self._discovered = False

    @property
    def names(self) -> list[str]:
        """The Ray names of the hosts this registry knows."""
        return list(self._hosts)

    def handle(self, name: str) -> Any:
        """Return the handle of host ``name``.

        Raises:
            ValueError: no host actor has this name.
        """
        handle = self._hosts.get(name)
        if handle is None:
            handle = ray.get_actor(name, namespace=NAMESPACE)
        return handle

    async def choose(self) -> str:
        """Return the name of the host with the fewest agents, starting hosts if none run."""
        if not self._hosts:
            await self.ensure()
        name = min(self._hosts, key=lambda host: (self._load[host], host))
        self._load[name] += 1
        return name

    def forget_agent(self, host: str) -> None:
        """Count one agent less on ``host``, after a stop or a failed spawn."""
        if self._load[host] > 0:
            self._load[host] -= 1

    async def ensure(self) -> list[str]:
        """Start hosts until each alive node with CPUs has ``ARBOR_HOSTS_PER_NODE`` of them.

        Ray's SPREAD strategy places them, so a node that joins gets the next new hosts.

        Returns:
            The names of the hosts started.
        """
        async with self._lock:
            await self._discover()
            nodes = [
                node
                for node in ray.nodes()
                if node["Alive"] and node.get("Resources", {}).get("CPU", 0) > 0
            ]
            target = self._settings.hosts_per_node * max(len(nodes), 1)
            started = []
            while len(self._hosts) < target:
                name = f"{HOST_PREFIX}{uuid.uuid4().hex[:12]}"
                handle = create_host_actor(name, self._settings)
                try:
                    await asyncio.wait_for(handle.ping.remote(), self._settings.spawn_timeout_s)
                except Exception as error:
                    ray.kill(handle, no_restart=True)
                    logger.error("host %s did not start: %s", name, error)
                    break
                self._hosts[name] = handle
                started.append(name)
                logger.info("started host %s (%d of %d)", name, len(self._hosts), target)
            return started

    async def _discover(self) -> None:
        """Find the hosts that an earlier registry incarnation started; they are detached."""
        if self._discovered:
            return
        self._discovered = True
        entries = await asyncio.to_thread(ray.util.list_named_actors, True)
        for entry in entries:
            name = entry["name"]
            if entry["namespace"] == NAMESPACE and name.startswith(HOST_PREFIX):
                try:
                    self._hosts[name] = ray.get_actor(name, namespace=NAMESPACE)
                except ValueError:
                    continue

    async def reconcile(self, records: list[AgentRecord]) -> list[str]:
        """Move the agents of hosts that are gone for good to live hosts; returns their names.

        A host whose process died is restarted by Ray under the same name and starts its
        agents itself; only a host that Ray no longer has (killed, or out of restarts)
        loses its agents to the others.
        """
        hosted = [
            record
            for record in records
            if record.options.get("placement") == "hosted" and record.status in (RUNNING, STARTING)
        ]
        if not hosted and not self._hosts:
            return []
        await self.ensure()
        gone = set()
        for name in list(self._hosts):
            try:
                await asyncio.to_thread(ray.get_actor, name, NAMESPACE)
            except ValueError:
                gone.add(name)
                del self._hosts[name]
        self._load = collections.Counter(record.options.get("host") for record in hosted)
        orphans = [
            record
            for record in hosted
            if record.options.get("host") not in self._hosts
            and (record.status == RUNNING or record.checkpoint_version > 0)
        ]
        if not orphans:
            return []
        if gone:
            logger.warning("hosts %s are gone; moving their agents", sorted(gone))
        await self.ensure()
        moved: dict[str, list[str]] = collections.defaultdict(list)
        for record in orphans:
            host = await self.choose()
            options = {**record.options, "host": host}
            await asyncio.to_thread(self._store.update_options, record.name, options)
            moved[host].append(record.name)
        for host, names in moved.items():
            adopted = await asyncio.wait_for(
                self._hosts[host].adopt.remote(names), self._settings.spawn_timeout_s
            )
            telemetry.record(metrics.record_reconciler_action, "recreate")
            logger.info("host %s took over %d of %d agents", host, adopted, len(names))
        return [record.name for record in orphans]

    async def kill_all(self) -> None:
        """Kill every host of this cluster without a restart, after the cluster lease is lost."""
        await self._discover()
        for handle in self._hosts.values():
            ray.kill(handle, no_restart=True)
        self._hosts.clear()
