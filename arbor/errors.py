"""Exceptions raised by Arbor; every message names the agent or setting and the next step."""

from __future__ import annotations


class ArborError(Exception):
    """Base class of every error Arbor raises on purpose."""


class AgentNotFound(ArborError, LookupError):
    """No agent with this name is registered."""

    def __init__(self, name: str, detail: str = "") -> None:
        self.name = name
        self.detail = detail
        message = f"agent {name!r} not found"
        message += (
            f": {detail}"
            if detail
            else "; arbor.list_agents(namespace='*') shows the names in every namespace"
        )
        super().__init__(message)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.name, self.detail))


class NameTaken(ArborError, ValueError):
    """An agent with this name already exists."""

    def __init__(self, name: str, status: str = "running") -> None:
        self.name = name
        self.status = status
        hint = (
            f"call arbor.stop({name!r}, purge=True) to delete its state and free the name"
            if status == "stopped"
            else "choose another name or use arbor.get() to reach the existing agent"
        )
        super().__init__(f"agent name {name!r} is already taken (status {status}); {hint}")

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.name, self.status))


class InvalidAgentName(ArborError, ValueError):
    """An agent name is empty, too long, or uses characters outside the allowed set."""


class InvalidTopicName(ArborError, ValueError):
    """A topic name is empty, too long, or uses characters outside the allowed set."""


class UnknownHandler(ArborError, AttributeError):
    """A message names a handler the agent does not have, or a private method."""


class InvalidArguments(ArborError, TypeError):
    """A message's arguments do not match the handler's signature."""


class HandlerError(ArborError):
    """A handler raised; the agent keeps running and the caller gets this error.

    Attributes:
        agent: name of the agent whose handler raised.
        handler: the handler name.
        error_type: qualified name of the original exception class.
        traceback: the original traceback text, formatted in the agent's process.
    """

    def __init__(
        self, agent: str, handler: str, error_type: str, message: str, traceback: str
    ) -> None:
        self.agent = agent
        self.handler = handler
        self.error_type = error_type
        self.error_message = message
        self.traceback = traceback
        super().__init__(
            f"agent {agent!r} handler {handler!r} raised {error_type}: {message}\n"
            f"--- traceback in the agent ---\n{traceback}"
        )

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (
            type(self),
            (self.agent, self.handler, self.error_type, self.error_message, self.traceback),
        )


class AskTimeout(ArborError, TimeoutError):
    """An ask got no reply within its timeout; the message may still be processed later."""


class AgentOverloaded(ArborError):
    """An agent has as many unfinished messages as its ``max_pending`` allows.

    A hosted agent's host counts the messages from every sender; for a dedicated agent
    each sending process counts its own (``from_this_process``). Retry later with
    backoff, or spread the work over more agents.
    """

    def __init__(self, name: str, limit: int, from_this_process: bool = True) -> None:
        source = " from this process" if from_this_process else ""
        super().__init__(
            f"agent {name!r} already has {limit} unfinished messages{source}, its "
            "max_pending limit; retry later with backoff, or spread the work over more agents"
        )
        self.name = name
        self.limit = limit
        self.from_this_process = from_this_process

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.name, self.limit, self.from_this_process))


class QuotaExceeded(ArborError):
    """A spawn would take a namespace past its cap on running agents.

    ``ARBOR_NAMESPACE_MAX_AGENTS`` sets the cap of single namespaces and
    ``ARBOR_MAX_AGENTS`` that of the others.
    """

    def __init__(
        self,
        name: str,
        limit: int,
        namespace: str = "default",
        running: int | None = None,
        setting: str = "ARBOR_MAX_AGENTS",
    ) -> None:
        count = limit if running is None else running
        super().__init__(
            f"cannot spawn agent {name!r}: namespace {namespace!r} has {count} agents starting "
            f"or running, and its cap is {limit} ({setting}); stop agents you no longer need, "
            "or raise the cap"
        )
        self.name = name
        self.limit = limit
        self.namespace = namespace
        self.running = count
        self.setting = setting

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.name, self.limit, self.namespace, self.running, self.setting))


class StateNotSerializable(ArborError, ValueError):
    """An agent's snapshot contains a value that a JSON checkpoint cannot store."""

    def __init__(self, agent: str, path: str, reason: str) -> None:
        self.agent = agent
        self.path = path
        self.reason = reason
        super().__init__(
            f"agent {agent!r}: cannot checkpoint {path}: {reason}; checkpoints hold JSON only, "
            "so convert the value in snapshot() (and back in restore())"
        )

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.agent, self.path, self.reason))


class CheckpointConflict(ArborError):
    """A checkpoint write came from an incarnation whose epoch is no longer current."""

    def __init__(self, agent: str, epoch: int, current_epoch: int | None) -> None:
        self.agent = agent
        self.epoch = epoch
        self.current_epoch = current_epoch
        super().__init__(
            f"agent {agent!r}: checkpoint from epoch {epoch} rejected because epoch "
            f"{current_epoch} is current; a newer incarnation owns this agent, so this one "
            "stops taking messages"
        )

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.agent, self.epoch, self.current_epoch))


class CheckpointNotFound(ArborError, LookupError):
    """A requested checkpoint version does not exist (or was pruned)."""


class StoreUnavailable(ArborError):
    """The checkpoint database could not be reached after all retries."""


class InvalidAuditEntry(ArborError, ValueError):
    """An audit entry has a missing or invalid field, so it cannot be appended."""


class InvalidAuditQuery(ArborError, ValueError):
    """An audit log query has an invalid filter, such as a naive datetime or a zero limit."""


class CapabilityDenied(ArborError, PermissionError):
    """A principal lacks the capability an action needs.

    Attributes:
        principal: the agent name or API key id that made the request.
        uri: the resource URI (or, for a refused delegation, the requested pattern).
        missing: the right that no capability grants, such as ``send`` or ``delegate``.
        reason: why the presented capability does not grant it.
    """

    def __init__(self, principal: str, uri: str, missing: str, reason: str = "") -> None:
        self.principal = principal
        self.uri = uri
        self.missing = missing
        self.reason = reason
        super().__init__(
            f"{principal!r} may not {missing} on {uri}: {reason or 'no capability grants it'}"
        )

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.principal, self.uri, self.missing, self.reason))


class InvalidResource(ArborError, ValueError):
    """A resource URI or pattern breaks the ``arbor://<kind>/<operation>/<path>`` grammar.

    Attributes:
        uri: the rejected text, with control characters escaped.
        rule: the grammar rule it breaks.
    """

    def __init__(self, uri: str, rule: str) -> None:
        self.uri = uri
        self.rule = rule
        super().__init__(f"resource URI {uri!r} is invalid: {rule}")

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.uri, self.rule))


class InvalidCapability(ArborError, ValueError):
    """A capability request has a bad argument, or a token fails verification or parsing."""


class ClusterUnavailable(ArborError):
    """No Ray cluster is running at the configured address."""


class ClusterLeaseLost(ArborError):
    """Another Ray cluster holds the cluster lease, so this one may not run agents.

    A new cluster takes the lease when its registry first starts, as during a RayService
    upgrade. `arbor lease --claim` gives it back to the cluster it is run against.
    """

    def __init__(self, cluster_id: str, holder: str) -> None:
        super().__init__(
            f"Ray cluster {cluster_id} no longer holds the cluster lease: cluster {holder} "
            "runs the agents now. Connect to that cluster, or run `arbor lease --claim` "
            "against this one to move the agents back here"
        )
        self.cluster_id = cluster_id
        self.holder = holder

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.cluster_id, self.holder))


class InvalidApiKey(ArborError, PermissionError):
    """An HTTP request's bearer key is missing, malformed, unknown, revoked or wrong."""


class GatewayError(ArborError):
    """An HTTP gateway error that no more specific Arbor exception describes.

    Attributes:
        status: the HTTP status code.
        code: the error code of the response body, such as ``execution_not_found``.
        field: the request field at fault, or None.
    """

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        self.status = status
        self.code = code
        self.field = field
        super().__init__(message)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.status, self.code, str(self), self.field))


class AgentTypeNotImportable(ArborError):
    """An agent class cannot be imported by path, so it cannot be recreated from the store."""


class SecretError(ArborError):
    """A secret could not be read; messages name the path and provider, never the value."""


class SecretNotFound(SecretError, LookupError):
    """No provider has a secret at this path."""

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"secret {path!r} not found: {detail}")

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.path, self.detail))


class SecretBackendError(SecretError):
    """The secret backend rejected the credentials or could not be reached."""


class InvalidSecretPath(SecretError, ValueError):
    """A secret path is not of the form ``<secret>/<field>`` with plain segments."""


class ConfigError(ArborError):
    """A setting needs something this process lacks, such as an exporter's package."""
