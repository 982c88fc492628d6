"""The runtime's metrics, trace spans and log fields, on top of `arbor.observability`.

Every hook is cheap when its part is off: metrics record nothing with
``ARBOR_METRICS=false``, and message spans exist only when an OTLP endpoint is set
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import random
import threading
from collections.abc import Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

from opentelemetry import trace

from arbor.config import Settings
from arbor.messages import Envelope, Reply
from arbor.observability import logs, metrics, tracing

logger = logging.getLogger(__name__)

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

_configured = False
_tracing = False
# The share of traces a process starts that it records; see `_should_trace`.
_ratio = 1.0
# The W3C traceparent, with the sampled flag off, of an unrecorded message being handled.
_unsampled: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "arbor_unsampled_traceparent", default=None
)
_lock = threading.Lock()

# The handler label of messages whose handler did not resolve, so callers cannot grow
# the label set with made-up names.
UNKNOWN_HANDLER = "<unknown>"


def configure_process(settings: Settings) -> None:
    """Set up logs and, when an OTLP endpoint is set, traces; once per process."""
    global _configured, _tracing, _ratio
    with _lock:
        if _configured:
            return
        _configured = True
        logs.configure_logging(settings)
        if any(os.environ.get(variable) for variable in _ENDPOINT_VARIABLES):
            try:
                # The runtime samples before it creates a span (`_should_trace`), so the
                # provider records every span it is given.
                tracing.configure_tracing(settings.model_copy(update={"trace_sample_ratio": 1.0}))
                _ratio = settings.trace_sample_ratio
                _tracing = True
            except Exception as error:
                logger.error("tracing is off: %s", error)


def tracing_active() -> bool:
    """Return whether this process exports trace spans."""
    return _tracing


def outgoing_headers() -> dict[str, str]:
    """Return the trace context to put into an envelope sent now."""
    if not _tracing:
        return {}
    unsampled = _unsampled.get()
    if unsampled is not None:
        return {"traceparent": unsampled}
    return tracing.inject_context()


def current_trace_id() -> str | None:
    """Return the id of the trace being recorded here, for audit rows, or None."""
    if not _tracing:
        return None
    ids = tracing.current_trace_ids()
    return ids[0] if ids else None


def _unsampled_traceparent() -> str:
    # The ids need to be unique, not secret, so they come from `random` without a system
    # call, as the SDK's own ids do. W3C treats an all-zero id as invalid.
    trace_id = random.getrandbits(128) or 1
    span_id = random.getrandbits(64) or 1
    return f"00-{trace_id:032x}-{span_id:016x}-00"


class CellTelemetry:
    """The metrics, spans and log fields of one agent cell."""

    def __init__(self, name: str, agent_type: str, node_id: str | None) -> None:
        self.name = name
        self.agent_type = agent_type
        self.node = node_id or "unknown"
        self._log_fields = logs.AgentLogFields(name, agent_type, None, self.node)

    def message(self, envelope: Envelope, epoch: int) -> AbstractContextManager[None]:
        """Return the scope that runs one message with its log fields and, if traced, its span."""
        fields = self._log_fields
        if fields.incarnation != epoch:
            fields = logs.AgentLogFields(self.name, self.agent_type, epoch, self.node)
            self._log_fields = fields
        log_scope = logs.AgentLogScope(fields)
        if not _tracing:
            return log_scope
        attributes = {
            "arbor.agent_type": self.agent_type,
            "arbor.kind": envelope.kind,
            "arbor.agent": self.name,
            "arbor.handler": envelope.handler,
        }
        span_scope = incoming_span("arbor.message", envelope.headers, attributes)
        return _MessageScope(log_scope, span_scope)

    def record_message(self, envelope: Envelope, reply: Reply, seconds: float) -> None:
        """Observe one handled message by its outcome."""
        error = reply.error
        if reply.duplicate:
            status = "duplicate"
        elif error is None:
            status = "ok"
        elif error.kind in ("unknown_handler", "invalid_arguments", "denied"):
            status = "rejected"
        else:
            status = "error"
        handler = UNKNOWN_HANDLER if status == "rejected" else envelope.handler
        record(metrics.record_message, self.agent_type, handler, status, seconds)

    def record_checkpoint(self, nbytes: int, seconds: float, status: str = "ok") -> None:
        """Count one checkpoint write."""
        record(metrics.record_checkpoint, self.agent_type, nbytes, seconds, status)

    def record_restore(self, epoch: int, seconds: float) -> None:
        """Count a new incarnation that restored a checkpoint, and how long that took."""
        if epoch <= 1:
            return
        record(metrics.record_restart, self.agent_type, self.node, "crash")
        record(metrics.record_recovery, self.agent_type, "process", seconds)


def _should_trace(headers: Mapping[str, str]) -> bool:
    """Decide whether a message's span is recorded, before any span object exists.

    A message that carries W3C trace context follows the sender's sampled flag; one
    that starts a trace is recorded with probability ``ARBOR_TRACE_SAMPLE_RATIO``.
    Deciding first keeps an unrecorded message at about a microsecond, where an
    unsampled SDK span costs some 30 µs.
    """
    parent = headers.get("traceparent")
    if parent:
        try:
            return bool(int(parent[-2:], 16) & 1)
        except ValueError:
            return random.random() < _ratio
    return random.random() < _ratio


def incoming_span(
    name: str, headers: Mapping[str, str], attributes: dict[str, Any]
) -> AbstractContextManager[Any]:
    """Return the scope that runs a request arriving with ``headers`` in a span of its own.

    The span continues the sender's trace. An unrecorded request records nothing, and the
    requests it makes carry the unsampled flag on, so the whole trace is left out rather
    than sampled again at each hop.
    """
    if not _tracing:
        return _NO_SPAN
    if not _should_trace(headers):
        parent = headers.get("traceparent") or _unsampled_traceparent()
        return _UnsampledScope(parent[:-2] + "00")
    return tracing.span_from_carrier(name, headers, attributes)


def span(
    name: str, attributes: dict[str, Any] | None = None, *, child_only: bool = False
) -> AbstractContextManager[Any]:
    """Return the scope that runs a step (a spawn, a checkpoint, a restore, a denial) in a span.

    Inside a recorded span it becomes a child. Elsewhere it starts a trace with probability
    ``ARBOR_TRACE_SAMPLE_RATIO``, unless ``child_only`` or the surrounding message is
    unrecorded.
    """
    if not _tracing:
        return _NO_SPAN
    current = trace.get_current_span()
    if not current.is_recording() and (
        child_only or _unsampled.get() is not None or random.random() >= _ratio
    ):
        return _NO_SPAN
    return tracing.start_span(name, attributes)


# Returned where nothing is recorded; a nullcontext can be entered any number of times.
_NO_SPAN: AbstractContextManager[None] = contextlib.nullcontext()


class _UnsampledScope:
    """A scope that marks the code inside it as part of an unrecorded trace."""

    __slots__ = ("_traceparent", "_token")

    def __init__(self, traceparent: str) -> None:
        self._traceparent = traceparent
        self._token: contextvars.Token[str | None] | None = None

    def __enter__(self) -> None:
        self._token = _unsampled.set(self._traceparent)

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _unsampled.reset(self._token)
            self._token = None


class _MessageScope:
    """The log fields of a message around its span (or unsampled mark), as one scope."""

    __slots__ = ("_log_scope", "_span_scope")

    def __init__(
        self, log_scope: logs.AgentLogScope, span_scope: AbstractContextManager[Any]
    ) -> None:
        self._log_scope = log_scope
        self._span_scope = span_scope

    def __enter__(self) -> None:
        self._log_scope.__enter__()
        try:
            self._span_scope.__enter__()
        except BaseException:
            self._log_scope.__exit__(None, None, None)
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self._span_scope.__exit__(exc_type, exc, traceback)
        finally:
            self._log_scope.__exit__(None, None, None)


def record(function: Any, *args: Any) -> None:
    """Call a `metrics` function, logging instead of raising if it fails."""
    try:
        function(*args)
    except Exception as error:
        logger.warning("metric %s not recorded: %s", function.__name__, error)
