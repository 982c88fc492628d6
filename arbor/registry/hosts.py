"""The registry's host actors: starting them, placing hosted agents, moving lost agents."""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from typing import Any

import ray
from ray.exceptions import RayActorError

from arbor.config import NAMESPACE, Settings
from arbor.observability import metrics
from arbor.persistence import RUNNING, STARTING, AgentRecord, CheckpointStore
from arbor.runtime import telemetry
from arbor.runtime.host import HOST_PREFIX, create_host_actor

logger = logging.getLogger(__name__)

# A host may run this share more agents than the average before agents move off it.
_REBALANCE_SLACK = 0.2

# The maximum number of agents one reconciler pass moves, so that a pass stays short.
_REBALANCE_BATCH = 100

# Seconds a listing waits for a host to name its passivated agents. A host that is
# restarting replies late, and the listing then shows its agents as active.
_PASSIVATED_TIMEOUT_S = 5.0


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
        self._nodes: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self._discovered = False

    @property
    def names(self) -> list[str]:
        """The Ray names of the hosts this registry has started or found."""
        return list(self._hosts)

    def handles(self) -> list[Any]:
        """Return the handles of the hosts this registry has started or found."""
        return list(self._hosts.values())

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

    async def gone(self, name: str) -> bool:
        """Return whether Ray no longer has host ``name``; a gone host leaves the pool."""
        try:
            await asyncio.to_thread(ray.get_actor, name, NAMESPACE)
        except ValueError:
            self._hosts.pop(name, None)
            self._load.pop(name, None)
            self._nodes.pop(name, None)
            return True
        return False

    async def passivated(self, agents: list[tuple[str, str]]) -> set[str]:
        """Return the names of the agents that their hosts have passivated.

        Args:
            agents: (host, agent name) pairs of running hosted agents.
        """
        by_host: dict[str, list[str]] = collections.defaultdict(list)
        for host, name in agents:
            by_host[host].append(name)

        async def query_host(host: str, names: list[str]) -> list[str]:
            try:
                return await asyncio.wait_for(  # type: ignore[no-any-return]
                    self.handle(host).passivated.remote(names), _PASSIVATED_TIMEOUT_S
                )
            except (ValueError, RayActorError, asyncio.TimeoutError) as error:
                logger.warning(
                    "host %s did not report which of its %d agents are passivated, so they "
                    "are listed as active: %s",
                    host,
                    len(names),
                    type(error).__name__,
                )
                return []

        replies = await asyncio.gather(
            *(query_host(host, names) for host, names in by_host.items())
        )
        return {name for reply in replies for name in reply}

    def forget_agent(self, host: str) -> None:
        """Count one agent less on ``host``, after a stop or a failed spawn."""
        if self._load[host] > 0:
            self._load[host] -= 1

    async def ensure(self) -> list[str]:
        """Start hosts until each alive node with CPUs runs ``ARBOR_HOSTS_PER_NODE`` of them.

        A cluster's first hosts are placed by Ray's SPREAD strategy. Later ones go to the
        nodes that lack hosts, such as a node that joined, with a soft node preference,
        because SPREAD alone may place them on a node that already has its share.

        Returns:
            The names of the hosts started.
        """
        async with self._lock:
            await self._discover()
            nodes = cpu_nodes()
            per_node = self._settings.hosts_per_node
            wanted: list[str | None]
            if not self._hosts:
                wanted = [None] * (per_node * max(len(nodes), 1))
            else:
                placed = collections.Counter((await self._host_nodes()).values())
                wanted = [node for node in nodes for _ in range(max(per_node - placed[node], 0))]
            started = []
            for node in wanted:
                name = await self._start_host(node)
                if name is None:
                    break
                started.append(name)
            return started

    async def _start_host(self, node: str | None) -> str | None:
        name = f"{HOST_PREFIX}{uuid.uuid4().hex[:12]}"
        handle = create_host_actor(name, self._settings, node)
        try:
            report = await asyncio.wait_for(handle.ping.remote(), self._settings.spawn_timeout_s)
        except Exception as error:
            ray.kill(handle, no_restart=True)
            logger.error("host %s did not start: %s", name, error)
            return None
        self._hosts[name] = handle
        self._nodes[name] = report["node_id"]
        logger.info("started host %s on node %s", name, report["node_id"])
        return name

    async def _host_nodes(self) -> dict[str, str]:
        """Return the node of each host that replies; a restarted host may have moved."""
        names = list(self._hosts)
        reports = await asyncio.gather(
            *(asyncio.wait_for(self._hosts[name].ping.remote(), 10.0) for name in names),
            return_exceptions=True,
        )
        for name, report in zip(names, reports, strict=True):
            if isinstance(report, dict):
                self._nodes[name] = report["node_id"]
            else:
                self._nodes.pop(name, None)
        return dict(self._nodes)

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

        Ray restarts a host whose process died under the same name, and the host starts
        its agents itself. Only a host that Ray no longer has (killed, or out of
        restarts) loses its agents to the others.
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
        # A spawn may have chosen a host after the records were read, so a count below the
        # kept one is not lowered. Stops and moves lower the count when they happen.
        recorded = collections.Counter(record.options.get("host") for record in hosted)
        self._load = collections.Counter(
            {host: max(recorded[host], self._load[host]) for host in self._hosts}
        )
        orphans = [
            record
            for record in hosted
            if record.options.get("host") not in self._hosts
            and (record.status == RUNNING or record.checkpoint_version > 0)
        ]
        if not orphans:
            await self._rebalance(hosted)
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

    async def _rebalance(self, hosted: list[AgentRecord]) -> int:
        """Move running agents from the fullest hosts to the emptiest, a batch per pass.

        A host that joined with a new node starts empty, and a node's loss leaves its
        restarted hosts on the surviving nodes, so without moves the load stays uneven.
        Returns the number of agents moved.
        """
        if len(self._hosts) < 2:
            return 0
        by_host: dict[str, list[AgentRecord]] = {name: [] for name in self._hosts}
        for record in hosted:
            if record.status == RUNNING and record.options.get("host") in by_host:
                by_host[record.options["host"]].append(record)
        total = sum(len(records) for records in by_host.values())
        ceiling = total / len(by_host) * (1 + _REBALANCE_SLACK)
        moves: list[tuple[AgentRecord, str, str]] = []
        while len(moves) < _REBALANCE_BATCH:
            fullest = max(by_host, key=lambda name: len(by_host[name]))
            emptiest = min(by_host, key=lambda name: len(by_host[name]))
            # A move must narrow the gap, or agents would only trade places.
            if len(by_host[fullest]) <= ceiling or len(by_host[emptiest]) + 1 >= len(
                by_host[fullest]
            ):
                break
            record = by_host[fullest].pop()
            by_host[emptiest].append(record)
            moves.append((record, fullest, emptiest))
        for record, source, target in moves:
            await self._move(record, source, target)
        if moves:
            logger.info("moved %d agents to balance %d hosts", len(moves), len(by_host))
        return len(moves)

    async def _move(self, record: AgentRecord, source: str, target: str) -> None:
        """Move one agent: record the new host, let the old one commit and drop it, start it.

        The old host replies "moved" to an `AgentRef.ask` that still reaches it, so the
        sender looks the agent up and resends. It forwards other messages. The new
        incarnation's epoch fences the old one, so no order of these steps loses a
        committed update.
        """
        options = {**record.options, "host": target}
        await asyncio.to_thread(self._store.update_options, record.name, options)
        try:
            await asyncio.wait_for(
                self._hosts[source].release.remote(record.name), self._settings.stop_timeout_s
            )
        except Exception as error:
            logger.warning(
                "host %s did not release agent %s (%s); the new host fences it",
                source,
                record.name,
                error,
            )
        await asyncio.wait_for(
            self._hosts[target].adopt.remote([record.name]), self._settings.spawn_timeout_s
        )
        self._load[source] -= 1
        self._load[target] += 1

    async def kill_all(self) -> None:
        """Kill every host of this cluster without a restart, after the cluster lease is lost."""
        await self._discover()
        for handle in self._hosts.values():
            ray.kill(handle, no_restart=True)
        self._hosts.clear()


def cpu_nodes() -> list[str]:
    """Return the ids of the alive Ray nodes that have CPUs, where agents can run."""
    return [
        node["NodeID"]
        for node in ray.nodes()
        if node["Alive"] and node.get("Resources", {}).get("CPU", 0) > 0
    ]
