"""The runtime's metrics, trace spans and log fields, on top of `arbor.observability`.

Every hook is cheap when its part is off: metrics record nothing with
``ARBOR_METRICS=false``, and message spans exist only when an OTLP endpoint is set
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``).

The runtime samples before it requests a span. A message that is not recorded runs in an
`UnsampledSpan`, which carries its trace context with the sampled flag off and costs no
span object, attribute dictionary or export.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
from collections.abc import Mapping
from contextlib import AbstractContextManager
from contextvars import Token
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from arbor.config import Settings
from arbor.messages import Envelope, Reply
from arbor.observability import logs, metrics, tracing
from arbor.observability.spans import UnsampledSpan, is_plain_traceparent

logger = logging.getLogger(__name__)

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

_configured = False
_tracing = False
# The share of traces a process starts that it records; see `_unsampled_span`.
_ratio = 1.0
_lock = threading.Lock()
# Hex digits with bit 0, the W3C "sampled" flag, set.
_SAMPLED_FLAG_DIGITS = frozenset("13579bdf")

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
    """Return the trace context to put into an envelope sent now.

    A process that does not trace (a driver, say) still passes on a trace context that its
    own OpenTelemetry set-up made current, so a client's trace continues into the agents.
    """
    return tracing.inject_context()


def current_trace_id() -> str | None:
    """Return the id of the trace of the request being handled here, for audit rows, or None.

    An unrecorded request has a trace id too, which its log lines carry.
    """
    if not _tracing:
        return None
    ids = tracing.current_trace_ids()
    return ids[0] if ids else None


class CellTelemetry:
    """The metrics, spans and log fields of one agent cell."""

    def __init__(
        self, name: str, agent_type: str, node_id: str | None, deferred: bool = False
    ) -> None:
        self.name = name
        # Whether handling times go through `metrics.message_times`, as in a host, where
        # they are a large part of a message's cost and the process outlives its agents.
        # A dedicated agent's process can be killed right after its last message, so it
        # observes each time at once.
        self.deferred = deferred
        self.agent_type = agent_type
        self.node = node_id or "unknown"
        self._log_fields = logs.AgentLogFields(name, agent_type, None, self.node)
        self._log_scope = logs.AgentLogScope(self._log_fields)
        # The attributes of this agent's checkpoint spans, made once: a span copies them.
        self.checkpoint_attributes = {"arbor.agent": name}

    def message(self, envelope: Envelope, epoch: int) -> AbstractContextManager[None]:
        """Return the scope that runs one message with its log fields and, if traced, its span."""
        fields = self._log_fields
        if fields.incarnation != epoch:
            fields = logs.AgentLogFields(self.name, self.agent_type, epoch, self.node)
            self._log_fields = fields
            self._log_scope = logs.AgentLogScope(fields)
        if not _tracing:
            # One scope serves every message, because a cell runs one message at a time.
            return self._log_scope
        log_scope = logs.AgentLogScope(fields)
        unsampled = _unsampled_span(envelope.headers)
        if unsampled is not None:
            return _MessageScope(log_scope, unsampled)
        attributes = {
            "arbor.agent_type": self.agent_type,
            "arbor.kind": envelope.kind,
            "arbor.agent": self.name,
            "arbor.handler": envelope.handler,
        }
        span = tracing.continue_trace("arbor.message", envelope.headers, attributes)
        return _MessageScope(log_scope, span)

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
        if self.deferred:
            metrics.message_times.add(self.agent_type, handler, status, seconds)
        else:
            record(metrics.record_message, self.agent_type, handler, status, seconds)

    def mark_failed(self, reply: Reply) -> None:
        """Mark the running message's span as failed when its reply carries an error.

        The handler's exception becomes the reply rather than leaving the span's block, so
        the span records it here: an error status and an ``exception`` event with the
        type, message and traceback, as OpenTelemetry's exception convention names them.
        """
        error = reply.error
        if error is None or not _tracing:
            return
        span = trace.get_current_span()
        if not span.is_recording():
            return
        attributes = {"exception.type": error.error_type, "exception.message": error.message}
        if error.traceback:
            attributes["exception.stacktrace"] = error.traceback
        span.add_event("exception", attributes)
        span.set_status(Status(StatusCode.ERROR, f"{error.error_type}: {error.message}"))

    def record_checkpoint(self, nbytes: int, seconds: float, status: str = "ok") -> None:
        """Count one checkpoint write."""
        record(metrics.record_checkpoint, self.agent_type, nbytes, seconds, status)

    def record_restore(self, epoch: int, seconds: float) -> None:
        """Count a new incarnation that restored a checkpoint, and how long that took."""
        if epoch <= 1:
            return
        record(metrics.record_restart, self.agent_type, self.node, "crash")
        record(metrics.record_recovery, self.agent_type, "process", seconds)


def _unsampled_span(headers: Mapping[str, Any]) -> UnsampledSpan | None:
    """Decide whether a request's span is recorded, before any span object exists.

    Returns None when it is, else the `UnsampledSpan` it runs in. A request that carries
    W3C trace context follows the sender's sampled flag. One that starts a trace is
    recorded with probability ``ARBOR_TRACE_SAMPLE_RATIO``. Deciding first means that an
    unrecorded request makes no span object of the SDK or of Arbor.
    """
    traceparent = headers.get("traceparent")
    if traceparent:
        if (
            type(traceparent) is str
            and len(traceparent) == 55
            and traceparent[:3] == "00-"
            and "tracestate" not in headers
        ):
            # The form Arbor sends, whose last field carries the sampled flag in bit 0. A
            # recorded span needs a valid parent now. An unsampled span checks its
            # traceparent when first used, and starts a new trace if that is invalid.
            if traceparent[-1] not in _SAMPLED_FLAG_DIGITS:
                return UnsampledSpan(traceparent)
            if is_plain_traceparent(traceparent):
                return None
        # Other forms (blanks, other versions, a tracestate) go through the propagators.
        parent = trace.get_current_span(tracing.extract_context(headers)).get_span_context()
        if parent.is_valid:
            if parent.trace_flags.sampled:
                return None
            return UnsampledSpan.for_context(parent)
    if random.random() < _ratio:
        return None
    return UnsampledSpan()


def incoming_span(
    name: str, headers: Mapping[str, Any], attributes: dict[str, Any]
) -> AbstractContextManager[Any]:
    """Return the scope that runs a request arriving with ``headers`` in a span of its own.

    The span continues the sender's trace. An unrecorded request records nothing, and the
    requests it makes carry the unsampled flag on, so the whole trace is left out rather
    than sampled again at each hop.
    """
    if not _tracing:
        return _NO_SPAN
    unsampled = _unsampled_span(headers)
    if unsampled is not None:
        return tracing.ActiveSpan(unsampled)
    return tracing.span_from_carrier(name, headers, attributes)


def span(
    name: str, attributes: dict[str, Any] | None = None, *, child_only: bool = False
) -> AbstractContextManager[Any]:
    """Return the scope that runs a step (a spawn, a checkpoint, a restore, a denial) in a span.

    Inside a recorded span it becomes a child. Elsewhere it starts a trace with probability
    ``ARBOR_TRACE_SAMPLE_RATIO``, unless ``child_only`` or the surrounding request is
    unrecorded.
    """
    if not _tracing:
        return _NO_SPAN
    current = trace.get_current_span()
    if current.is_recording():
        return tracing.start_span(name, attributes)
    if child_only or type(current) is UnsampledSpan:
        return _NO_SPAN
    parent = current.get_span_context()
    if parent.is_valid:
        # A trace context someone else made current: follow its decision.
        return tracing.start_span(name, attributes) if parent.trace_flags.sampled else _NO_SPAN
    if random.random() >= _ratio:
        return _NO_SPAN
    return tracing.start_span(name, attributes)


# Returned where nothing is recorded; a nullcontext can be entered any number of times.
_NO_SPAN: AbstractContextManager[None] = contextlib.nullcontext()


class _MessageScope:
    """The log fields of a message around its span, recorded or unsampled, as one scope."""

    __slots__ = ("_log_scope", "_span", "_token")

    def __init__(self, log_scope: logs.AgentLogScope, span: trace.Span) -> None:
        self._log_scope = log_scope
        self._span = span
        self._token: Token[otel_context.Context] | None = None

    def __enter__(self) -> None:
        self._log_scope.__enter__()
        try:
            self._token = otel_context.attach(trace.set_span_in_context(self._span))
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
            if self._token is not None:
                otel_context.detach(self._token)
                self._token = None
            tracing.finish_span(self._span, exc)
        finally:
            self._log_scope.__exit__(None, None, None)


def record(function: Any, *args: Any) -> None:
    """Call a `metrics` function, logging instead of raising if it fails."""
    try:
        function(*args)
    except Exception as error:
        logger.warning("metric %s not recorded: %s", function.__name__, error)
