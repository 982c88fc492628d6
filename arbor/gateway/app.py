"""The HTTP API: a FastAPI app served by the Ray Serve deployment `Gateway`.

Every route under ``/v1`` authenticates the bearer key and checks the capability its action
needs before it calls the registry or an agent. The URIs checked:

| route | capability |
|---|---|
| spawn | ``arbor://agent/spawn/<name>`` |
| list, inspect | ``arbor://agent/inspect/<name>`` (a list leaves out the rest) |
| stop, restore | ``arbor://agent/stop/<name>`` |
| message | ``arbor://agent/ask/<name>`` or ``arbor://agent/send/<name>`` |
| grant, delegate | ``arbor://capability/grant/<principal>``, ``.../delegate/<principal>`` |
| revoke, list others' capabilities | ``arbor://capability/revoke/<holder>`` |
| audit log | ``arbor://audit/read/log`` |
| start a command | ``arbor://command/run/<command>`` |
| read another key's execution | ``arbor://command/inspect/<command>`` |
"""

# No `from __future__ import annotations` here: Serve's ingress rebuilds the route methods
# outside this module, so FastAPI could not resolve string annotations of request models.

import asyncio
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

import ray
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from ray import serve

from arbor.config import NAMESPACE, REGISTRY_NAME, Settings
from arbor.errors import ArborError, AskTimeout
from arbor.gateway import registration
from arbor.gateway.auth import Authenticator, principal_path
from arbor.gateway.errors import (
    ApiError,
    BodyLimitMiddleware,
    install_error_handlers,
)
from arbor.gateway.executions import start_execution
from arbor.gateway.models import (
    AgentPage,
    AgentView,
    AuditVerifyView,
    AuditView,
    CapabilityView,
    CommandBody,
    DelegateBody,
    ErrorBody,
    ExecutionView,
    GrantBody,
    GrantRequestBody,
    HealthView,
    MessageBody,
    MessageResult,
    ReadyView,
    RestoreBody,
    RevokeResult,
    SpawnBody,
    StopBody,
)
from arbor.names import DEFAULT_NAMESPACE, SEPARATOR, namespace_of, qualify, validate_namespace
from arbor.observability import metrics
from arbor.persistence import open_store
from arbor.persistence.gateway import FINAL_STATUSES, ExecutionRecord
from arbor.registry.security import GrantRequest
from arbor.registry.spec import build_spawn_spec, validate_name
from arbor.runtime import telemetry
from arbor.runtime.ref import AgentRef

logger = logging.getLogger(__name__)

# Seconds between reads of new execution events while a stream is open.
EVENT_POLL_S = 0.2
# Seconds between SSE comment lines on an idle stream, so proxies keep it open.
KEEPALIVE_S = 10.0
# Agent references kept per replica for messages, least recently used dropped first.
MAX_REFS = 4096
# Keyword argument names that AgentRef.ask itself takes, so a handler cannot receive them.
RESERVED_KWARGS = frozenset({"handler", "timeout", "message_id"})

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 413, 422, 503, 504)
}

app = FastAPI(
    title="Arbor",
    version="1",
    openapi_url="/v1/openapi.json",
    docs_url="/v1/docs",
    redoc_url=None,
    responses=_ERRORS,
)
install_error_handlers(app)
_body_limit = {"bytes": 1_048_576}
app.add_middleware(BodyLimitMiddleware, limit=lambda: _body_limit["bytes"])


@app.middleware("http")
async def _observe_request(request: Request, call_next: Any) -> Any:
    """Count and time each request by route and status, in the caller's trace if any."""
    started = time.perf_counter()
    status = 500
    attributes = {"http.request.method": request.method, "url.path": request.url.path}
    try:
        with telemetry.incoming_span("arbor.gateway.request", dict(request.headers), attributes):
            response = await call_next(request)
            status = response.status_code
            return response
    finally:
        route = request.scope.get("route")
        template = getattr(route, "path", None) or "<unmatched>"
        telemetry.record(
            metrics.record_gateway_request,
            template,
            request.method,
            status,
            time.perf_counter() - started,
        )


_bearer = HTTPBearer(auto_error=False, description="An API key from `arbor keys create`.")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
Cursor = Annotated[str | None, Query(max_length=200, description="next_cursor of the last page")]
Namespace = Annotated[
    str | None,
    Query(max_length=63, description="only this namespace's; '*' or absent for every namespace"),
]

# Agents read from the registry per call while a page of GET /v1/agents fills. The caller
# may inspect only some agents, so a page can take several calls. A batch larger than the
# page keeps those calls few, and each reply stays small.
AGENT_BATCH = 500


def _agent_name(name: str, field: str) -> str:
    """Return the full name of an agent named over HTTP, where names are full names."""
    try:
        return validate_name(qualify(name, DEFAULT_NAMESPACE))
    except ArborError as error:
        raise ApiError(400, "invalid_name", str(error), field) from None


def _listing_namespace(namespace: str | None, field: str) -> str | None:
    """Return the namespace a listing keeps, or None for every namespace."""
    if namespace is None or namespace == "*":
        return None
    try:
        return validate_namespace(namespace)
    except ArborError as error:
        raise ApiError(400, "invalid_namespace", str(error), field) from None


def _principal_path(principal: str, field: str) -> str:
    try:
        return principal_path(principal)
    except ArborError as error:
        raise ApiError(400, "invalid_principal", str(error), field) from None


def _grant_dict(body: GrantBody) -> dict[str, Any]:
    return body.model_dump(exclude_none=True)


def _execution_view(record: ExecutionRecord) -> ExecutionView:
    return ExecutionView(
        id=record.id,
        command=record.command,
        status=record.status,  # type: ignore[arg-type]
        result=record.result,
        error=record.error,
        created_at=record.created_at,
        updated_at=record.updated_at,
        events_url=f"/v1/executions/{record.id}/events",
    )


def _sse(seq: int, kind: str, data: Any) -> str:
    return f"id: {seq}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"


def _jsonable(value: Any, agent: str) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as error:
        raise ApiError(
            422,
            "reply_not_json",
            f"agent {agent!r} replied with a value JSON cannot hold ({error}); return JSON "
            "values from handlers called over HTTP",
            agent=agent,
        ) from None
    return value


# Serve's ingress pickles the app when the class below is decorated, so every module-level
# helper a route uses must be defined above it.


@serve.deployment(name="Gateway")
@serve.ingress(app)
class Gateway:
    """One replica of the HTTP front door."""

    def __init__(
        self,
        settings: dict[str, Any],
        agent_types: dict[str, str],
        commands: dict[str, str],
    ) -> None:
        from arbor.runtime.guard import process_guard

        self.settings = Settings(**settings)
        telemetry.configure_process(self.settings)
        _body_limit["bytes"] = self.settings.gateway_max_body_bytes
        self.store = open_store(self.settings.database_url, self.settings)
        self.guard = process_guard(self.store, self.settings)
        self.auth = Authenticator(self.store, self.guard)
        self.agent_types = agent_types
        self.commands = commands
        self._refs: OrderedDict[tuple[str, str], AgentRef] = OrderedDict()
        logger.info(
            "gateway replica started (pid %d) with agent types %s and commands %s",
            os.getpid(),
            sorted(agent_types),
            sorted(commands),
        )

    # --- operations ---------------------------------------------------------------

    @app.get("/healthz", response_model=HealthView, tags=["operations"])
    async def healthz(self) -> HealthView:
        """Report that the gateway process is up."""
        return HealthView(status="ok")

    @app.get(
        "/readyz",
        response_model=ReadyView,
        responses={503: {"model": ReadyView}},
        tags=["operations"],
    )
    async def readyz(self) -> Any:
        """Check that the registry and the database respond; 503 names the failing part."""
        checks = {"registry": "ok", "database": "ok"}
        try:
            registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
            await asyncio.wait_for(registry.ping.remote(), 5.0)
        except Exception as error:
            checks["registry"] = f"unreachable: {type(error).__name__}: {error}"[:500]
        try:
            await asyncio.wait_for(asyncio.to_thread(self.store.get_agent, "readyz"), 10.0)
        except Exception as error:
            checks["database"] = f"unreachable: {type(error).__name__}: {error}"[:500]
        ready = all(value == "ok" for value in checks.values())
        view = ReadyView(status="ready" if ready else "not_ready", checks=checks)
        return JSONResponse(view.model_dump(), status_code=200 if ready else 503)

    # --- agents -------------------------------------------------------------------

    @app.get("/v1/agent-types", response_model=list[str], tags=["agents"])
    async def list_agent_types(self, bearer: Bearer) -> list[str]:
        """List the agent type names that POST /v1/agents accepts."""
        await self._principal(bearer)
        return sorted(self.agent_types)

    @app.post("/v1/agents", status_code=201, response_model=AgentView, tags=["agents"])
    async def spawn(self, body: SpawnBody, bearer: Bearer) -> AgentView:
        """Spawn an agent of a registered type; its capabilities come from the caller's."""
        principal = await self._principal(bearer)
        name = _agent_name(body.name, "name")
        token = await self._require(principal, f"arbor://agent/spawn/{name}")
        path = self.agent_types.get(body.type)
        if path is None:
            raise ApiError(
                400,
                "unknown_type",
                f"agent type {body.type!r} is not registered; registered types: "
                f"{sorted(self.agent_types)}",
                "type",
            )
        agent_class = registration.load_type(path)
        keywords = {
            **body.kwargs,
            **body.placement.model_dump(exclude_none=True),
            "capabilities": [_grant_dict(item) for item in body.capabilities],
        }
        spec = build_spawn_spec(agent_class, name, tuple(body.args), keywords)
        spec.spawner = principal
        spec.token = token
        timeout = self.settings.spawn_timeout_s + self.settings.gateway_request_timeout_s
        info = await self._registry_call("spawn", (spec,), timeout, name)
        return AgentView.of(info)

    @app.get("/v1/agents", response_model=AgentPage, tags=["agents"])
    async def list_agents(
        self,
        bearer: Bearer,
        status: Annotated[str | None, Query(pattern="^(starting|running|stopped|failed)$")] = None,
        namespace: Namespace = None,
        prefix: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        cursor: Cursor = None,
    ) -> AgentPage:
        """List the agents the caller may inspect, ordered by name, one page at a time."""
        principal = await self._principal(bearer)
        selected = _listing_namespace(namespace, "namespace")
        if selected is None and prefix is not None and SEPARATOR in prefix:
            # Every name that starts with the prefix is in its namespace, and the store
            # reads one namespace through an index.
            selected = namespace_of(prefix)

        batch = max(limit + 1, AGENT_BATCH)
        visible: list[AgentView] = []
        after = cursor
        while len(visible) <= limit:
            infos = await self._registry_call(
                "list_agents",
                (status, selected, prefix, after, batch),
                self.settings.gateway_request_timeout_s,
            )
            for info in infos:
                if self.auth.may(principal, f"arbor://agent/inspect/{info.name}"):
                    visible.append(AgentView.of(info))
                    if len(visible) > limit:
                        break
            if len(infos) < batch:
                break
            after = infos[-1].name

        more = len(visible) > limit
        page = visible[:limit]
        return AgentPage(agents=page, next_cursor=page[-1].name if more else None)

    @app.get("/v1/agents/{name:path}", response_model=AgentView, tags=["agents"])
    async def inspect(self, name: str, bearer: Bearer) -> AgentView:
        """Return an agent's status, node, incarnation, checkpoint version and last error."""
        principal = await self._principal(bearer)
        name = _agent_name(name, "name")
        await self._require(principal, f"arbor://agent/inspect/{name}")
        info = await self._registry_call(
            "info", (name,), self.settings.gateway_request_timeout_s, name
        )
        return AgentView.of(info)

    @app.post("/v1/agents/{name:path}/stop", response_model=AgentView, tags=["agents"])
    async def stop(self, name: str, bearer: Bearer, body: StopBody | None = None) -> AgentView:
        """Stop an agent after it commits its state; ``purge`` also deletes the state."""
        principal = await self._principal(bearer)
        name = _agent_name(name, "name")
        token = await self._require(principal, f"arbor://agent/stop/{name}")
        purge = body.purge if body is not None else False
        timeout = self.settings.gateway_request_timeout_s + 30.0
        info = await self._registry_call("info", (name,), timeout, name)
        await self._registry_call("stop", (name, purge, principal, token), timeout, name)
        if purge:
            # The record is gone, so the reply is the last record with its final status.
            return AgentView.of(info).model_copy(update={"status": "stopped"})
        stopped = await self._registry_call("info", (name,), timeout, name)
        return AgentView.of(stopped)

    @app.post("/v1/agents/{name:path}/restore", response_model=AgentView, tags=["agents"])
    async def restore(self, name: str, body: RestoreBody, bearer: Bearer) -> AgentView:
        """Roll an agent back to a checkpoint version; needs the stop capability."""
        principal = await self._principal(bearer)
        name = _agent_name(name, "name")
        await self._require(principal, f"arbor://agent/stop/{name}")
        timeout = self.settings.spawn_timeout_s + self.settings.gateway_request_timeout_s
        info = await self._registry_call("restore", (name, body.version), timeout, name)
        return AgentView.of(info)

    @app.post(
        "/v1/agents/{name:path}/messages",
        response_model=MessageResult,
        responses={202: {"model": MessageResult}},
        tags=["agents"],
    )
    async def message(self, name: str, body: MessageBody, bearer: Bearer) -> Any:
        """Ask (``wait``: reply in the body) or send (202 with the message id) to an agent."""
        principal = await self._principal(bearer)
        name = _agent_name(name, "name")
        kind = "ask" if body.wait else "send"
        await self._require(principal, f"arbor://agent/{kind}/{name}")

        reserved = RESERVED_KWARGS.intersection(body.kwargs)
        if reserved:
            raise ApiError(
                400,
                "invalid_arguments",
                f"kwargs may not use the names {sorted(reserved)}; pass them positionally",
                "kwargs",
            )

        ref = self._ref(principal, name)
        if not body.wait:
            message_id = await asyncio.to_thread(
                ref.send, body.handler, *body.args, message_id=body.message_id, **body.kwargs
            )
            return JSONResponse({"message_id": message_id, "reply": None}, status_code=202)

        timeout = body.timeout or self.settings.gateway_request_timeout_s
        try:
            reply = await ref.ask_async(
                body.handler,
                *body.args,
                timeout=timeout,
                message_id=body.message_id,
                **body.kwargs,
            )
        except AskTimeout as error:
            raise ApiError(504, "timeout", str(error), agent=name) from None
        return MessageResult(message_id=body.message_id, reply=_jsonable(reply, name))

    # --- capabilities -------------------------------------------------------------

    @app.post(
        "/v1/capabilities", status_code=201, response_model=CapabilityView, tags=["capabilities"]
    )
    async def grant(self, body: GrantRequestBody, bearer: Bearer) -> CapabilityView:
        """Grant ``principal`` a capability, recorded as granted by the caller's key."""
        principal = await self._principal(bearer)
        target = _principal_path(body.principal, "principal")
        await self._require(principal, f"arbor://capability/grant/{target}")
        request = GrantRequest.parse(_grant_dict(body.capability))
        info = await self._registry_call(
            "grant", (body.principal, request, principal), self.settings.gateway_request_timeout_s
        )
        return CapabilityView.of(info)

    @app.get("/v1/capabilities", response_model=list[CapabilityView], tags=["capabilities"])
    async def list_capabilities(
        self,
        bearer: Bearer,
        principal: Annotated[str | None, Query(max_length=200)] = None,
        include_revoked: bool = False,
        namespace: Namespace = None,
    ) -> list[CapabilityView]:
        """List the caller's capabilities, or those of principals it may revoke from.

        ``namespace`` keeps those held by that namespace's agents, which leaves out keys.
        """
        caller = await self._principal(bearer)
        if principal is not None and principal != caller:
            await self._require(
                caller, f"arbor://capability/revoke/{_principal_path(principal, 'principal')}"
            )
        selected = _listing_namespace(namespace, "namespace")
        infos = await self._registry_call(
            "capabilities",
            (principal, include_revoked, selected),
            self.settings.gateway_request_timeout_s,
        )
        visible = []
        for info in infos:
            if info.principal == caller or principal is not None:
                visible.append(CapabilityView.of(info))
                continue
            try:
                path = principal_path(info.principal)
            except ArborError:
                continue
            if self.auth.may(caller, f"arbor://capability/revoke/{path}"):
                visible.append(CapabilityView.of(info))
        return visible

    @app.post(
        "/v1/capabilities/{capability_id}/delegate",
        status_code=201,
        response_model=CapabilityView,
        tags=["capabilities"],
    )
    async def delegate(
        self, capability_id: str, body: DelegateBody, bearer: Bearer
    ) -> CapabilityView:
        """Delegate a narrower copy of one of the caller's capabilities to another principal."""
        principal = await self._principal(bearer)
        target = _principal_path(body.to_principal, "to_principal")
        await self._require(principal, f"arbor://capability/delegate/{target}")
        terms = body.model_dump(exclude={"to_principal"}, exclude_none=True)
        request = None
        if terms and "pattern" not in terms:
            # Narrowing terms without a pattern keep the parent's pattern. A missing parent
            # leaves the request empty, and the registry denies the delegation.
            parent = await asyncio.to_thread(self.store.get_capability, capability_id)
            if parent is not None:
                terms["pattern"] = parent.pattern
        if "pattern" in terms:
            request = GrantRequest.parse(terms)
        info = await self._registry_call(
            "delegate",
            (principal, capability_id, body.to_principal, request),
            self.settings.gateway_request_timeout_s,
        )
        return CapabilityView.of(info)

    @app.delete(
        "/v1/capabilities/{capability_id}", response_model=RevokeResult, tags=["capabilities"]
    )
    async def revoke(self, capability_id: str, bearer: Bearer) -> RevokeResult:
        """Revoke a capability and everything delegated from it."""
        principal = await self._principal(bearer)
        record = await asyncio.to_thread(self.store.get_capability, capability_id)
        if record is None:
            raise ApiError(
                404,
                "capability_not_found",
                f"capability {capability_id[:64]!r} not found; GET /v1/capabilities lists ids",
                "capability_id",
            )
        await self._require(
            principal, f"arbor://capability/revoke/{principal_path(record.principal)}"
        )
        revoked = await self._registry_call(
            "revoke", (capability_id, principal, True), self.settings.gateway_request_timeout_s
        )
        return RevokeResult(revoked=revoked)

    # --- audit --------------------------------------------------------------------

    @app.get("/v1/audit", response_model=list[AuditView], tags=["audit"])
    async def audit(
        self,
        bearer: Bearer,
        principal: Annotated[str | None, Query(max_length=4096)] = None,
        action: Annotated[str | None, Query(max_length=4096)] = None,
        resource_prefix: Annotated[str | None, Query(max_length=4096)] = None,
        decision: Annotated[str | None, Query(pattern="^(allowed|denied)$")] = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
        after_seq: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    ) -> list[AuditView]:
        """List audit log entries that match every filter, oldest first."""
        caller = await self._principal(bearer)
        await self._require(caller, "arbor://audit/read/log")
        entries = await asyncio.to_thread(
            self.store.list_audit,
            principal=principal,
            action=action,
            resource_prefix=resource_prefix,
            since=since,
            until=until,
            decision=decision,
            limit=limit,
            after_seq=after_seq,
        )
        return [
            AuditView(
                seq=entry.seq or 0,
                at=entry.at,
                principal=entry.principal,
                action=entry.action,
                resource=entry.resource,
                decision=entry.decision,
                detail=entry.detail,
                trace_id=entry.trace_id,
                hash=entry.hash,
            )
            for entry in entries
        ]

    @app.get("/v1/audit/verify", response_model=AuditVerifyView, tags=["audit"])
    async def audit_verify(self, bearer: Bearer) -> AuditVerifyView:
        """Walk the audit hash chain; ``ok`` is false with the first bad row's seq."""
        caller = await self._principal(bearer)
        await self._require(caller, "arbor://audit/read/log")
        result = await asyncio.to_thread(self.store.verify_audit)
        return AuditVerifyView(**result.__dict__)

    # --- commands -----------------------------------------------------------------

    @app.get("/v1/commands", response_model=list[str], tags=["commands"])
    async def list_commands(self, bearer: Bearer) -> list[str]:
        """List the command names that POST /v1/commands accepts."""
        await self._principal(bearer)
        return sorted(self.commands)

    @app.post("/v1/commands", status_code=202, response_model=ExecutionView, tags=["commands"])
    async def start_command(self, body: CommandBody, bearer: Bearer) -> ExecutionView:
        """Start a command and return its execution id at once (202)."""
        principal = await self._principal(bearer)
        path = self.commands.get(body.command)
        if path is None:
            raise ApiError(
                404,
                "unknown_command",
                f"command {body.command!r} is not registered; registered commands: "
                f"{sorted(self.commands)}",
                "command",
            )
        await self._require(principal, f"arbor://command/run/{body.command}")
        params = self._validated_params(path, body.params)
        record = await asyncio.to_thread(
            start_execution, self.store, self.settings, body.command, path, params, principal
        )
        return _execution_view(record)

    @app.get("/v1/executions/{execution_id}", response_model=ExecutionView, tags=["commands"])
    async def execution(self, execution_id: str, bearer: Bearer) -> ExecutionView:
        """Return an execution's status, and its result or error once it has ended."""
        principal = await self._principal(bearer)
        record = await self._execution(principal, execution_id)
        return _execution_view(record)

    @app.get(
        "/v1/executions/{execution_id}/events",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
        tags=["commands"],
    )
    async def events(
        self,
        execution_id: str,
        bearer: Bearer,
        last_event_id: Annotated[
            str | None, Header(alias="Last-Event-ID", max_length=20, pattern=r"^[0-9]+$")
        ] = None,
    ) -> StreamingResponse:
        """Stream the execution's events as Server-Sent Events, from after Last-Event-ID.

        The stream ends after the final event (``succeeded`` or ``failed``). Events are read
        from the store, so a stream resumed on another replica continues where it stopped.
        """
        principal = await self._principal(bearer)
        await self._execution(principal, execution_id)
        after = int(last_event_id) if last_event_id else 0
        return StreamingResponse(
            self._event_stream(execution_id, after),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    # --- helpers ------------------------------------------------------------------

    async def _principal(self, bearer: HTTPAuthorizationCredentials | None) -> str:
        header = f"{bearer.scheme} {bearer.credentials}" if bearer is not None else None
        # The cached paths do no I/O; the others read the store in a worker thread.
        principal = self.auth.authenticate_cached(header)
        if principal is not None:
            return principal
        return await asyncio.to_thread(self.auth.authenticate, header)

    async def _require(self, principal: str, uri: str) -> str:
        token = self.auth.require_cached(principal, uri)
        if token is not None:
            return token
        return await asyncio.to_thread(self.auth.require, principal, uri)

    async def _registry_call(
        self, method: str, args: tuple[Any, ...], timeout: float, agent: str | None = None
    ) -> Any:
        """Call a registry method; its Arbor errors are re-raised as themselves."""
        try:
            registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
        except ValueError:
            raise ApiError(
                503, "registry_unavailable", "the registry is not running; start it with `arbor up`"
            ) from None
        try:
            return await asyncio.wait_for(getattr(registry, method).remote(*args), timeout)
        except asyncio.TimeoutError:
            subject = f"agent {agent!r}" if agent else "the registry"
            raise ApiError(
                504,
                "timeout",
                f"{method} on {subject} did not finish within {timeout:.0f} s; retry later "
                "or check `arbor status`",
                agent=agent,
            ) from None
        except ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, ArborError):
                raise cause from None
            raise

    def _ref(self, principal: str, name: str) -> AgentRef:
        key = (principal, name)
        ref = self._refs.get(key)
        if ref is None:
            ref = AgentRef(name, origin=self.auth.origin(principal))
            self._refs[key] = ref
            while len(self._refs) > MAX_REFS:
                self._refs.popitem(last=False)
        else:
            self._refs.move_to_end(key)
        return ref

    def _validated_params(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        model = getattr(registration.load_function(path), "params_model", None)
        if model is None:
            return params
        roots = [root for root in self.settings.gateway_analysis_roots.split(os.pathsep) if root]
        try:
            validated = model.model_validate(params, context={"analysis_roots": roots})
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(["params", *(str(part) for part in first["loc"])])
            raise ApiError(422, "invalid_request", f"{field}: {first['msg']}", field) from None
        result: dict[str, Any] = validated.model_dump(mode="json")
        return result

    async def _execution(self, principal: str, execution_id: str) -> ExecutionRecord:
        record = await asyncio.to_thread(self.store.get_execution, execution_id)
        if record is None:
            raise ApiError(
                404,
                "execution_not_found",
                f"execution {execution_id[:64]!r} not found; POST /v1/commands returns the id",
                "execution_id",
            )
        if record.principal != principal:
            await self._require(principal, f"arbor://command/inspect/{record.command}")
        return record

    async def _event_stream(self, execution_id: str, after: int) -> AsyncIterator[str]:
        idle = 0.0
        while True:
            events = await asyncio.to_thread(
                self.store.list_execution_events, execution_id, after, 500
            )
            for event in events:
                after = event.seq
                yield _sse(event.seq, event.kind, event.data)
                if event.kind in FINAL_STATUSES:
                    return
            if events:
                idle = 0.0
                continue
            record = await asyncio.to_thread(self.store.get_execution, execution_id)
            if record is None or record.status in FINAL_STATUSES:
                # Final status without a final event: the last read raced the runner's
                # two writes, so read once more before closing.
                rest = await asyncio.to_thread(
                    self.store.list_execution_events, execution_id, after, 500
                )
                for event in rest:
                    yield _sse(event.seq, event.kind, event.data)
                return
            await asyncio.sleep(EVENT_POLL_S)
            idle += EVENT_POLL_S
            if idle >= KEEPALIVE_S:
                idle = 0.0
                yield ": keep-alive\n\n"
