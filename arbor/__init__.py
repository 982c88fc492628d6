"""Arbor: durable, long-lived agents on Ray.

Example:
    >>> import arbor
    >>> arbor.init()
    >>> ref = arbor.spawn(Counter, name="c1", start=5)
    >>> ref.ask("add", 3)
    8
"""

import os as _os


def _keep_ray_on_loopback() -> None:
    """Make Ray bind to 127.0.0.1 unless the configured cluster is on another host.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is first imported, so this runs
    before anything imports Ray. Without it, Ray on Linux binds to the machine's network
    address and rewrites 127.0.0.1 in addresses to that address.
    """
    address = _os.environ.get("ARBOR_RAY_ADDRESS") or _os.environ.get("RAY_ADDRESS") or ""
    host = address.split("://")[-1].rsplit(":", 1)[0]
    if host in ("", "auto", "local", "127.0.0.1", "localhost", "[::1]", "::1"):
        _os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


_keep_ray_on_loopback()

from arbor.agent import Agent, handler  # noqa: E402
from arbor.client import (  # noqa: E402
    cancel_reminder,
    capabilities,
    claim_cluster_lease,
    cluster_lease,
    current_namespace,
    full_name,
    get,
    grant,
    init,
    list_agents,
    list_checkpoints,
    reconcile,
    reminders,
    restore,
    revoke,
    shutdown,
    spawn,
    stop,
)
from arbor.errors import (  # noqa: E402
    AgentNotFound,
    AgentOverloaded,
    AgentTypeNotImportable,
    ArborError,
    AskTimeout,
    CapabilityDenied,
    CheckpointConflict,
    CheckpointNotFound,
    ClusterLeaseLost,
    ClusterUnavailable,
    HandlerError,
    InvalidAgentName,
    InvalidArguments,
    InvalidCapability,
    InvalidResource,
    InvalidTopicName,
    NameTaken,
    QuotaExceeded,
    StateNotSerializable,
    StoreUnavailable,
    UnknownHandler,
)
from arbor.http_client import connect  # noqa: E402
from arbor.registry.info import AgentInfo  # noqa: E402
from arbor.registry.reminder_spec import ReminderInfo  # noqa: E402
from arbor.registry.security import CapabilityInfo  # noqa: E402
from arbor.registry.topic_spec import SubscriptionInfo, TopicEvent  # noqa: E402
from arbor.runtime.ref import AgentRef  # noqa: E402
from arbor.topic_client import Subscription, publish, subscribe, subscriptions  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentInfo",
    "CapabilityInfo",
    "ReminderInfo",
    "AgentNotFound",
    "AgentOverloaded",
    "AgentRef",
    "AgentTypeNotImportable",
    "ArborError",
    "AskTimeout",
    "CapabilityDenied",
    "CheckpointConflict",
    "CheckpointNotFound",
    "ClusterLeaseLost",
    "ClusterUnavailable",
    "HandlerError",
    "InvalidAgentName",
    "InvalidArguments",
    "InvalidCapability",
    "InvalidResource",
    "InvalidTopicName",
    "NameTaken",
    "QuotaExceeded",
    "StateNotSerializable",
    "StoreUnavailable",
    "UnknownHandler",
    "Subscription",
    "SubscriptionInfo",
    "TopicEvent",
    "publish",
    "subscribe",
    "subscriptions",
    "connect",
    "cancel_reminder",
    "capabilities",
    "current_namespace",
    "full_name",
    "get",
    "grant",
    "handler",
    "init",
    "list_agents",
    "list_checkpoints",
    "reconcile",
    "reminders",
    "claim_cluster_lease",
    "cluster_lease",
    "restore",
    "revoke",
    "shutdown",
    "spawn",
    "stop",
]
