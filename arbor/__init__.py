"""Arbor: durable, long-lived agents on Ray.

Example:
    >>> import arbor
    >>> arbor.init()
    >>> ref = arbor.spawn(Counter, name="c1", start=5)
    >>> ref.ask("add", 3)
    8
"""

import os as _os

# A local development cluster has no reason to be reachable from the network. Ray reads
# this variable when it is first imported, so it is set here, before anything imports
# Ray; a process that joins a multi-machine cluster sets RAY_ADDRESS or
# ARBOR_RAY_ADDRESS, or sets the variable to 1 itself.
if not (_os.environ.get("RAY_ADDRESS") or _os.environ.get("ARBOR_RAY_ADDRESS")):
    _os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from arbor.agent import Agent  # noqa: E402
from arbor.client import (  # noqa: E402
    get,
    init,
    list_agents,
    list_checkpoints,
    reconcile,
    restore,
    shutdown,
    spawn,
    stop,
)
from arbor.errors import (  # noqa: E402
    AgentNotFound,
    AgentTypeNotImportable,
    ArborError,
    AskTimeout,
    CapabilityDenied,
    CheckpointConflict,
    CheckpointNotFound,
    ClusterUnavailable,
    HandlerError,
    InvalidAgentName,
    InvalidArguments,
    NameTaken,
    StateNotSerializable,
    StoreUnavailable,
    UnknownHandler,
)
from arbor.registry.info import AgentInfo  # noqa: E402
from arbor.runtime.ref import AgentRef  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentInfo",
    "AgentNotFound",
    "AgentRef",
    "AgentTypeNotImportable",
    "ArborError",
    "AskTimeout",
    "CapabilityDenied",
    "CheckpointConflict",
    "CheckpointNotFound",
    "ClusterUnavailable",
    "HandlerError",
    "InvalidAgentName",
    "InvalidArguments",
    "NameTaken",
    "StateNotSerializable",
    "StoreUnavailable",
    "UnknownHandler",
    "get",
    "init",
    "list_agents",
    "list_checkpoints",
    "reconcile",
    "restore",
    "shutdown",
    "spawn",
    "stop",
]
