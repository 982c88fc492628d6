"""Mailbox depth of agents, read from Ray's task state and from the host actors.

A dedicated agent is a synchronous Ray actor, so its queued messages wait in Ray's task
queue, where the agent's own process cannot count them. Ray's state API can: every queued
``handle`` call is an actor task in a pending state. The state API is served by the Ray
dashboard, so a cluster started without it reports no depth for dedicated agents.

A hosted agent's messages wait in its mailbox inside the host actor, which reports their
number itself. The registry samples both every ``ARBOR_MAILBOX_SAMPLE_INTERVAL_S`` seconds
and sets ``arbor_mailbox_depth`` per agent type and node.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import ray
from ray._private import ray_constants
from ray.experimental import internal_kv

logger = logging.getLogger(__name__)

# Task states that end a task or mean it has left the mailbox.
_NOT_WAITING = ("FINISHED", "FAILED", "RUNNING")
# The Ray method that takes each message (`arbor.runtime.actor.AgentActor.handle`).
_HANDLE_SUFFIX = ".handle"
# The maximum number of unfinished tasks one sample reads; a larger backlog counts as this.
SAMPLE_LIMIT = 10_000
# Seconds the hosts have to report their mailboxes; a host that misses it counts as empty.
HOST_REPORT_TIMEOUT_S = 10.0


def state_api_url() -> str | None:
    """Return the Ray dashboard's HTTP address from the cluster, or None without a dashboard."""
    address = internal_kv._internal_kv_get(
        ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD
    )
    return f"http://{address.decode()}" if address else None


def sample_depths(api_url: str, agent_types: set[str]) -> Counter[tuple[str, str]]:
    """Count queued messages per ``(agent type, node id)`` for the given agent types.

    Raises:
        ray.util.state.exception.RayStateApiException: the state API request failed.
    """
    from ray.util.state import list_tasks

    tasks = list_tasks(
        address=api_url,
        filters=[("type", "=", "ACTOR_TASK"), ("state", "!=", "FINISHED")],
        limit=SAMPLE_LIMIT,
        timeout=10,
        raise_on_missing_output=False,
    )
    depths: Counter[tuple[str, str]] = Counter()
    for task in tasks:
        name = task.name or ""
        if not name.endswith(_HANDLE_SUFFIX) or task.state in _NOT_WAITING:
            continue
        agent_type = name[: -len(_HANDLE_SUFFIX)]
        if agent_type in agent_types:
            depths[(agent_type, task.node_id or "unknown")] += 1
    return depths


def sample_hosted_depths(hosts: list[Any], agent_types: dict[str, str]) -> Counter[tuple[str, str]]:
    """Count hosted agents' waiting messages per ``(agent type, node id)``, asking each host.

    Args:
        hosts: handles of the host actors.
        agent_types: the agent type of each running hosted agent, by agent name. Agents
            not in it (stopped since the host reported) are left out.
    """
    reports = [host.mailbox_depths.remote() for host in hosts]
    ready, late = ray.wait(reports, num_returns=len(reports), timeout=HOST_REPORT_TIMEOUT_S)
    if late:
        logger.info("%d of %d hosts did not report their mailboxes in time", len(late), len(hosts))
    depths: Counter[tuple[str, str]] = Counter()
    for reference in ready:
        try:
            report = ray.get(reference)
        except ray.exceptions.RayError as error:
            # A host that is restarting reports at the next sample.
            logger.info("a host could not report its mailboxes: %s", type(error).__name__)
            continue
        node = report["node_id"] or "unknown"
        for name, depth in report["depths"].items():
            agent_type = agent_types.get(name)
            if agent_type is not None:
                depths[(agent_type, node)] += depth
    return depths
