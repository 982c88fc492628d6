"""A Python client of the HTTP gateway, with the method names of the in-cluster API.

It needs no Ray: requests go over HTTP(S) with the standard library's urllib. Error
responses are raised as the Arbor exception classes that the in-cluster API raises
(`AgentNotFound`, `CapabilityDenied`, `NameTaken`, ...).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from arbor import errors
from arbor.registry.info import AgentInfo
from arbor.registry.security import CapabilityInfo

logger = logging.getLogger(__name__)

# Seconds a request waits for the gateway's response by default.
DEFAULT_TIMEOUT_S = 90.0

# Seconds `watch` keeps reconnecting after a stream breaks before it gives up, long enough
# for Serve to replace a dead replica.
RECONNECT_WINDOW_S = 60.0

# Event kinds that end an execution's stream.
FINAL_EVENTS = frozenset({"succeeded", "failed"})

# Response error codes and the exception classes they become; the rest are GatewayError.
_ERROR_CLASSES: dict[str, type[errors.ArborError]] = {
    "unauthorized": errors.InvalidApiKey,
    "capability_denied": errors.CapabilityDenied,
    "agent_not_found": errors.AgentNotFound,
    "checkpoint_not_found": errors.CheckpointNotFound,
    "name_taken": errors.NameTaken,
    "invalid_name": errors.InvalidAgentName,
    "invalid_principal": errors.InvalidAgentName,
    "unknown_handler": errors.UnknownHandler,
    "invalid_arguments": errors.InvalidArguments,
    "invalid_request": errors.InvalidArguments,
    "invalid_json": errors.InvalidArguments,
    "unknown_type": errors.InvalidArguments,
    "invalid_resource": errors.InvalidResource,
    "invalid_capability": errors.InvalidCapability,
    "invalid_audit_query": errors.InvalidAuditQuery,
    "handler_error": errors.HandlerError,
    "state_not_serializable": errors.StateNotSerializable,
    "timeout": errors.AskTimeout,
    "store_unavailable": errors.StoreUnavailable,
    "cluster_unavailable": errors.ClusterUnavailable,
    "registry_unavailable": errors.ClusterUnavailable,
}

# Error attributes copied from the response body onto the raised exception.
_ATTRIBUTES = {
    "agent": ("name", "agent"),
    "uri": ("uri",),
    "principal": ("principal",),
    "missing": ("missing",),
    "handler": ("handler",),
    "error_type": ("error_type",),
}

# Placement keywords of `spawn`; the other keywords go to the agent's __init__.
_PLACEMENT = (
    "num_cpus",
    "num_gpus",
    "memory",
    "resources",
    "node_id",
    "node_affinity",
    "spread",
    "durability",
)


@dataclass(frozen=True)
class ServerSentEvent:
    """One event of an execution's stream: ``id`` is its seq, ``event`` its kind."""

    id: int
    event: str
    data: Any


def connect(
    url: str | None = None,
    api_key: str | None = None,
    *,
    verify: bool | str = True,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> GatewayClient:
    """Return a client of the gateway at ``url``.

    Args:
        url: base URL, such as ``https://arbor.example:8000``; default ``ARBOR_URL``, else
            ``http://127.0.0.1:8000``.
        api_key: the ``arbor_<id>_<secret>`` key; default ``ARBOR_API_KEY``.
        verify: True checks the server certificate against the system CAs, a path names a
            CA bundle file, False turns the check off.
        timeout: seconds each request waits for its response.

    Example:
        >>> client = arbor.connect("https://127.0.0.1:8000", api_key=key, verify="ca.pem")
        >>> client.get("c1").ask("add", 3)
        8
    """
    return GatewayClient(
        url or os.environ.get("ARBOR_URL") or "http://127.0.0.1:8000",
        api_key if api_key is not None else os.environ.get("ARBOR_API_KEY"),
        verify=verify,
        timeout=timeout,
    )


class RemoteAgentRef:
    """A reference to an agent through the gateway, like `AgentRef`."""

    def __init__(self, client: GatewayClient, name: str) -> None:
        self._client = client
        self._name = name

    @property
    def name(self) -> str:
        """The agent's cluster-wide name."""
        return self._name

    def ask(
        self,
        handler: str,
        *args: Any,
        timeout: float | None = None,
        message_id: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Send a message and return the handler's reply; raises as `AgentRef.ask` does."""
        body: dict[str, Any] = {"handler": handler, "args": list(args), "kwargs": kwargs}
        if timeout is not None:
            body["timeout"] = timeout
        if message_id is not None:
            body["message_id"] = message_id
        wait = (timeout or 0) + 10.0 if timeout else None
        result = self._client.request(
            "POST", f"/v1/agents/{_quote(self._name)}/messages", body, timeout=wait
        )
        return result["reply"]

    def send(self, handler: str, *args: Any, message_id: str | None = None, **kwargs: Any) -> str:
        """Send a message without waiting for the handler; returns its message id."""
        body: dict[str, Any] = {
            "handler": handler,
            "args": list(args),
            "kwargs": kwargs,
            "wait": False,
        }
        if message_id is not None:
            body["message_id"] = message_id
        result = self._client.request("POST", f"/v1/agents/{_quote(self._name)}/messages", body)
        message: str = result["message_id"]
        return message

    def __repr__(self) -> str:
        return f"RemoteAgentRef({self._name!r})"


class GatewayClient:
    """A connection to one gateway; create it with `arbor.connect`."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        *,
        verify: bool | str = True,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise errors.ConfigError(
                f"gateway URL {url!r} is invalid; use http://host:port or https://host:port"
            )
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._api_key = api_key
        self._context = _ssl_context(verify) if parts.scheme == "https" else None

    def __repr__(self) -> str:
        # The key is a credential, so it stays out of reprs.
        return f"GatewayClient({self.url!r})"

    # --- agents -----------------------------------------------------------------

    def spawn(
        self,
        agent_type: str,
        name: str,
        *args: Any,
        capabilities: list[Any] | None = None,
        **kwargs: Any,
    ) -> RemoteAgentRef:
        """Spawn an agent of a registered type; placement keywords go to Ray as in `arbor.spawn`."""
        placement = {key: kwargs.pop(key) for key in list(kwargs) if key in _PLACEMENT}
        body = {
            "type": agent_type,
            "name": name,
            "args": list(args),
            "kwargs": kwargs,
            "placement": placement,
            "capabilities": [
                {"pattern": item} if isinstance(item, str) else item for item in capabilities or []
            ],
        }
        self.request("POST", "/v1/agents", body)
        return RemoteAgentRef(self, name)

    def get(self, name: str) -> RemoteAgentRef:
        """Return a reference to agent ``name``; a missing agent fails at the first message."""
        return RemoteAgentRef(self, name)

    def info(self, name: str) -> AgentInfo:
        """Return an agent's record."""
        return _agent_info(self.request("GET", f"/v1/agents/{_quote(name)}"))

    def list_agents(
        self, status: str | None = None, prefix: str | None = None, namespace: str | None = None
    ) -> list[AgentInfo]:
        """Return every agent the key may inspect, ordered by name, following all pages.

        ``namespace`` keeps one namespace's agents; None or ``"*"`` keeps every namespace's.
        """
        agents: list[AgentInfo] = []
        cursor = None
        while True:
            query = {
                "status": status,
                "namespace": namespace,
                "prefix": prefix,
                "cursor": cursor,
                "limit": 500,
            }
            page = self.request("GET", "/v1/agents" + _query(query))
            agents.extend(_agent_info(item) for item in page["agents"])
            cursor = page["next_cursor"]
            if cursor is None:
                return agents

    def stop(self, name: str, purge: bool = False) -> None:
        """Stop an agent; ``purge`` also deletes its state and frees the name."""
        self.request("POST", f"/v1/agents/{_quote(name)}/stop", {"purge": purge})

    def restore(self, name: str, version: int) -> AgentInfo:
        """Roll an agent back to checkpoint ``version``."""
        body = {"version": version}
        return _agent_info(self.request("POST", f"/v1/agents/{_quote(name)}/restore", body))

    # --- capabilities -------------------------------------------------------------

    def grant(
        self, principal: str, pattern: str, operations: list[str] | None = None, **terms: Any
    ) -> CapabilityInfo:
        """Grant ``principal`` a capability; ``terms`` as in `arbor.grant`."""
        body = {"principal": principal, "pattern": pattern, "operations": operations, **terms}
        return _capability_info(self.request("POST", "/v1/capabilities", _encode(body)))

    def delegate(
        self, capability_id: str, to_principal: str, pattern: str | None = None, **terms: Any
    ) -> CapabilityInfo:
        """Delegate a narrower copy of one of the key's capabilities to ``to_principal``."""
        body = {"to_principal": to_principal, "pattern": pattern, **terms}
        path = f"/v1/capabilities/{_quote(capability_id)}/delegate"
        return _capability_info(self.request("POST", path, _encode(body)))

    def revoke(self, capability_id: str) -> list[str]:
        """Revoke a capability and everything delegated from it; returns the revoked ids."""
        result = self.request("DELETE", f"/v1/capabilities/{_quote(capability_id)}")
        revoked: list[str] = result["revoked"]
        return revoked

    def capabilities(
        self,
        principal: str | None = None,
        include_revoked: bool = False,
        namespace: str | None = None,
    ) -> list[CapabilityInfo]:
        """Return the key's capabilities, or another principal's it may revoke.

        ``namespace`` keeps those held by one namespace's agents; None or ``"*"`` keeps all.
        """
        query = {
            "principal": principal,
            "include_revoked": str(include_revoked).lower(),
            "namespace": namespace,
        }
        return [
            _capability_info(item)
            for item in self.request("GET", "/v1/capabilities" + _query(query))
        ]

    # --- audit and commands ---------------------------------------------------------

    def audit(self, **filters: Any) -> list[dict[str, Any]]:
        """Return audit entries; ``filters`` are the query parameters of ``GET /v1/audit``."""
        encoded = {
            key: value.isoformat() if isinstance(value, datetime) else value
            for key, value in filters.items()
        }
        result: list[dict[str, Any]] = self.request("GET", "/v1/audit" + _query(encoded))
        return result

    def verify_audit(self) -> dict[str, Any]:
        """Walk the audit hash chain on the server; ``ok`` is False with the first bad seq."""
        result: dict[str, Any] = self.request("GET", "/v1/audit/verify")
        return result

    def start(self, command: str, **params: Any) -> str:
        """Start an asynchronous command; returns its execution id at once."""
        result = self.request("POST", "/v1/commands", {"command": command, "params": params})
        execution_id: str = result["id"]
        return execution_id

    def execution(self, execution_id: str) -> dict[str, Any]:
        """Return an execution's status, result and error."""
        result: dict[str, Any] = self.request("GET", f"/v1/executions/{_quote(execution_id)}")
        return result

    def watch(
        self, execution_id: str, last_event_id: int | None = None
    ) -> Iterator[ServerSentEvent]:
        """Yield an execution's events until its final one (``succeeded`` or ``failed``).

        A broken stream is resumed with ``Last-Event-ID``, so no event is lost or repeated,
        for up to `RECONNECT_WINDOW_S` seconds without progress.
        """
        last = last_event_id or 0
        deadline = time.monotonic() + RECONNECT_WINDOW_S
        delay = 0.2
        while True:
            try:
                for event in self._stream(execution_id, last):
                    last = event.id
                    deadline = time.monotonic() + RECONNECT_WINDOW_S
                    delay = 0.2
                    yield event
                    if event.event in FINAL_EVENTS:
                        return
                reason = "the stream ended before the final event"
            except _RETRYABLE as error:
                reason = f"{type(error).__name__}: {error}"
            except errors.GatewayError as error:
                if error.status not in (502, 503, 504):
                    raise
                reason = str(error)
            if time.monotonic() > deadline:
                raise errors.ClusterUnavailable(
                    f"the event stream of execution {execution_id} broke ({reason}) and did "
                    f"not resume within {RECONNECT_WINDOW_S} s; call watch() again with "
                    f"last_event_id={last}"
                )
            logger.info(
                "event stream of %s broke (%s); resuming after event %d", execution_id, reason, last
            )
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def healthz(self) -> dict[str, Any]:
        """Return ``GET /healthz``."""
        result: dict[str, Any] = self.request("GET", "/healthz")
        return result

    # --- transport ---------------------------------------------------------------

    def request(
        self, method: str, path: str, body: Any = None, timeout: float | None = None
    ) -> Any:
        """Send one request and return the decoded JSON body.

        Raises:
            ArborError: a subclass that matches the error code of a 4xx or 5xx response.
            ClusterUnavailable: no gateway responds at the URL.
        """
        with self._open(method, path, body, {}, timeout) as response:
            data = response.read()
        return json.loads(data) if data else None

    def _stream(self, execution_id: str, after: int) -> Iterator[ServerSentEvent]:
        headers = {"Accept": "text/event-stream"}
        if after:
            headers["Last-Event-ID"] = str(after)
        path = f"/v1/executions/{_quote(execution_id)}/events"
        with self._open("GET", path, None, headers, None) as response:
            yield from _parse_events(response)

    def _open(
        self,
        method: str,
        path: str,
        body: Any,
        headers: dict[str, str],
        timeout: float | None,
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self._api_key:
            request.add_header("Authorization", f"Bearer {self._api_key}")
        for name, value in headers.items():
            request.add_header(name, value)
        try:
            return urllib.request.urlopen(
                request, timeout=timeout or self.timeout, context=self._context
            )
        except urllib.error.HTTPError as error:
            raise _error_from(error) from None
        except urllib.error.URLError as error:
            raise errors.ClusterUnavailable(
                f"no Arbor gateway responds at {self.url} ({error.reason}); check the URL and "
                "that `arbor up` runs"
            ) from None
        except (http.client.HTTPException, ConnectionError) as error:
            # For example plain HTTP sent to an HTTPS port, where the server closes the connection.
            raise errors.ClusterUnavailable(
                f"the gateway at {self.url} closed the connection ({type(error).__name__}: "
                f"{error}); check the URL's scheme (http or https) and port"
            ) from None


_RETRYABLE = (
    errors.ClusterUnavailable,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
    OSError,
)


def _parse_events(lines: Any) -> Iterator[ServerSentEvent]:
    """Parse ``text/event-stream`` lines into events; comment lines are skipped."""
    event_id, kind, data = None, "message", []
    for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data and event_id is not None:
                yield ServerSentEvent(int(event_id), kind, json.loads("\n".join(data)))
            event_id, kind, data = None, "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "id":
            event_id = value
        elif field == "event":
            kind = value
        elif field == "data":
            data.append(value)


def _error_from(error: urllib.error.HTTPError) -> errors.ArborError:
    try:
        detail = json.loads(error.read())["error"]
        code, message = str(detail["code"]), str(detail["message"])
    except (ValueError, KeyError, TypeError):
        return errors.GatewayError(error.code, "http_error", f"HTTP {error.code}: {error.reason}")
    error_class = _ERROR_CLASSES.get(code)
    if error_class is None:
        return errors.GatewayError(error.code, code, message, detail.get("field"))
    # Build the exception without its __init__, whose arguments the body may not carry,
    # and keep the server's message.
    raised = error_class.__new__(error_class)
    Exception.__init__(raised, message)
    raised.status = error.code  # type: ignore[attr-defined]
    raised.code = code  # type: ignore[attr-defined]
    raised.field = detail.get("field")  # type: ignore[attr-defined]
    for key, names in _ATTRIBUTES.items():
        if key in detail:
            for name in names:
                setattr(raised, name, detail[key])
    if isinstance(raised, errors.HandlerError):
        raised.error_message = message
        raised.traceback = ""
    return raised


def _ssl_context(verify: bool | str) -> ssl.SSLContext:
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    return ssl.create_default_context()


def _quote(value: str) -> str:
    # Agent names keep their '/' separators; the gateway routes on the whole path.
    return urllib.parse.quote(value, safe="/")


def _query(values: dict[str, Any]) -> str:
    present = {key: value for key, value in values.items() if value is not None}
    return "?" + urllib.parse.urlencode(present) if present else ""


def _encode(body: dict[str, Any]) -> dict[str, Any]:
    return {
        key: value.isoformat() if isinstance(value, datetime) else value
        for key, value in body.items()
        if value is not None
    }


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _agent_info(item: dict[str, Any]) -> AgentInfo:
    return AgentInfo(
        name=item["name"],
        type=item["type"],
        status=item["status"],
        node_id=item["node_id"],
        incarnation=item["incarnation"],
        checkpoint_version=item["checkpoint_version"],
        created_at=_time(item["created_at"]),
        started_at=_time(item["started_at"]),
        checkpointed_at=_time(item["checkpointed_at"]),
        last_error=item["last_error"],
        placement=item.get("placement", "dedicated"),
        passivated=item.get("passivated", False),
    )


def _capability_info(item: dict[str, Any]) -> CapabilityInfo:
    created_at = _time(item["created_at"])
    expires_at = _time(item["expires_at"])
    assert created_at is not None and expires_at is not None
    return CapabilityInfo(
        id=item["id"],
        principal=item["principal"],
        parent_id=item["parent_id"],
        pattern=item["pattern"],
        operations=tuple(item["operations"]),
        granted_by=item["granted_by"],
        created_at=created_at,
        expires_at=expires_at,
        revoked_at=_time(item["revoked_at"]),
    )
