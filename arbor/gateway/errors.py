"""Error responses of the HTTP API: every failure becomes ``{"error": {code, message, field}}``.

Arbor's exceptions map to 4xx codes here, and `arbor.http_client` maps the codes back to the
same exception classes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from arbor.errors import (
    AgentNotFound,
    AgentTypeNotImportable,
    ArborError,
    AskTimeout,
    CapabilityDenied,
    CheckpointNotFound,
    ClusterUnavailable,
    ConfigError,
    HandlerError,
    InvalidAgentName,
    InvalidApiKey,
    InvalidArguments,
    InvalidAuditQuery,
    InvalidCapability,
    InvalidResource,
    NameTaken,
    StateNotSerializable,
    StoreUnavailable,
    UnknownHandler,
)

logger = logging.getLogger(__name__)

# Exception class -> (HTTP status, error code). The first matching class wins, so
# subclasses come before their bases.
ERROR_CODES: list[tuple[type[BaseException], int, str]] = [
    (InvalidApiKey, 401, "unauthorized"),
    (CapabilityDenied, 403, "capability_denied"),
    (AgentNotFound, 404, "agent_not_found"),
    (CheckpointNotFound, 404, "checkpoint_not_found"),
    (NameTaken, 409, "name_taken"),
    (InvalidAgentName, 400, "invalid_name"),
    (UnknownHandler, 400, "unknown_handler"),
    (InvalidArguments, 400, "invalid_arguments"),
    (InvalidResource, 400, "invalid_resource"),
    (InvalidCapability, 400, "invalid_capability"),
    (InvalidAuditQuery, 400, "invalid_audit_query"),
    (AgentTypeNotImportable, 400, "type_not_importable"),
    (ConfigError, 400, "invalid_configuration"),
    (HandlerError, 422, "handler_error"),
    (StateNotSerializable, 422, "state_not_serializable"),
    (AskTimeout, 504, "timeout"),
    (StoreUnavailable, 503, "store_unavailable"),
    (ClusterUnavailable, 503, "cluster_unavailable"),
]


class ApiError(Exception):
    """An error the gateway itself raises, with its status, code and field."""

    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, **extra: Any
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.extra = extra
        super().__init__(message)


def error_response(
    status: int, code: str, message: str, field: str | None = None, **extra: Any
) -> JSONResponse:
    """Build the JSON error response; ``extra`` adds keys such as ``agent`` or ``uri``."""
    body: dict[str, Any] = {"code": code, "message": message, "field": field}
    body.update({key: value for key, value in extra.items() if value is not None})
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every exception into an error body."""
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(ArborError, _arbor_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)


def arbor_error_response(error: BaseException) -> JSONResponse:
    """Map an Arbor exception to its status, code and message."""
    extra: dict[str, Any] = {}
    if isinstance(error, CapabilityDenied):
        extra = {"uri": error.uri, "principal": error.principal, "missing": error.missing}
    elif isinstance(error, AgentNotFound | NameTaken):
        extra = {"agent": error.name}
    elif isinstance(error, HandlerError):
        extra = {"agent": error.agent, "handler": error.handler, "error_type": error.error_type}
        # The traceback stays in the agent's log; the client gets the exception's message.
        message = f"agent {error.agent!r} handler {error.handler!r} raised {error.error_type}: "
        return error_response(422, "handler_error", message + error.error_message, **extra)
    for error_class, status, code in ERROR_CODES:
        if isinstance(error, error_class):
            return error_response(status, code, _one_line(error), **extra)
    return error_response(400, "arbor_error", _one_line(error))


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return error_response(error.status, error.code, error.message, error.field, **error.extra)


async def _arbor_error(request: Request, error: ArborError) -> JSONResponse:
    return arbor_error_response(error)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    authorization = request.headers.get("authorization", "")
    if request.url.path.startswith("/v1/") and not authorization.lower().startswith("bearer "):
        # FastAPI validates the body before the key dependency runs. A request without a
        # key gets 401 whatever its body, so it learns nothing about the API's checks.
        return arbor_error_response(
            InvalidApiKey(
                "missing API key; send the header 'Authorization: Bearer arbor_<id>_<secret>'"
            )
        )
    problems = error.errors()
    first = problems[0] if problems else {"loc": (), "msg": "invalid request", "type": ""}
    location = [str(part) for part in first.get("loc", ())]
    if first.get("type") == "json_invalid":
        return error_response(
            400, "invalid_json", f"the request body is not valid JSON: {first.get('msg')}", "body"
        )
    # The first element names where the value was: body, query, path or header.
    field = ".".join(location[1:]) or (location[0] if location else None)
    message = f"{field or 'request'}: {first.get('msg', 'invalid value')}"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problems)"
    return error_response(422, "invalid_request", message, field)


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
    code = codes.get(error.status_code, "http_error")
    detail = error.detail if isinstance(error.detail, str) else json.dumps(error.detail)
    if error.status_code == 404:
        detail = f"no route {request.method} {request.url.path}; GET /v1/openapi.json lists them"
    field = "body" if error.status_code == 413 else None
    return error_response(error.status_code, code, detail, field)


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("request %s %s failed", request.method, request.url.path)
    return error_response(
        500, "internal_error", f"the gateway failed: {type(error).__name__}; see its log"
    )


class BodyLimitMiddleware:
    """Reject request bodies over a byte limit with 413, before any handler reads them.

    The limit applies to the declared Content-Length and to the bytes actually received,
    so a chunked body cannot slip past it.
    """

    def __init__(self, app: ASGIApp, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > limit:
                    await _send_too_large(send, limit)
                    return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the route, so the app's handler turns it into a 413.
                    raise StarletteHTTPException(413, _too_large_message(limit))
            return message

        await self.app(scope, counting_receive, send)


def _too_large_message(limit: int) -> str:
    return (
        f"the request body is larger than {limit} bytes; send less or raise "
        "ARBOR_GATEWAY_MAX_BODY_BYTES"
    )


async def _send_too_large(send: Send, limit: int) -> None:
    response = error_response(413, "body_too_large", _too_large_message(limit), "body")
    await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
