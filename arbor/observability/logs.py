"""Log lines as JSON (or text) with agent and trace fields, and a filter for repeated errors.

`configure_logging` puts one handler on the root logger, so every ``logging.getLogger``
logger in the process writes through it. Each record gets the fields of the agent whose
code is running (set by the runtime with `agent_log_context`) and the ids of the current
OpenTelemetry span.

A JSON line:

    {"timestamp": "2025-01-31T12:00:00.123Z", "level": "INFO", "logger": "arbor.runtime",
     "message": "agent restored", "agent_id": "c1", "agent_type": "Counter",
     "incarnation": 3, "node_id": "a93e...", "trace_id": "4bf9...", "span_id": "00f0..."}

The agent and trace keys are always present and null when unknown. The key ``exception``
is added when the record carries one, and ``repeated`` when `RepeatedLogFilter` dropped
repeats before it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TextIO

from opentelemetry import trace

from arbor.config import Settings, get_settings

# Seconds during which repeats of one warning or error are counted instead of written.
DEFAULT_REPEAT_INTERVAL_S = 60.0

# Distinct (logger, level, template) keys the repeat filter tracks. It drops the oldest
# past this, so a process logging many different messages keeps bounded memory.
MAX_REPEAT_KEYS = 1024


@dataclass(frozen=True)
class AgentLogFields:
    """The agent fields that log records carry while the agent's code runs."""

    agent_id: str | None = None
    agent_type: str | None = None
    incarnation: int | None = None
    node_id: str | None = None


_NO_AGENT = AgentLogFields()
_agent_fields: contextvars.ContextVar[AgentLogFields] = contextvars.ContextVar(
    "arbor_agent_log_fields", default=_NO_AGENT
)


def agent_log_context(
    *,
    agent_id: str | None = None,
    agent_type: str | None = None,
    incarnation: int | None = None,
    node_id: str | None = None,
) -> AgentLogScope:
    """Set the agent fields of log records emitted inside the block.

    The fields live in a context variable, so each asyncio task and thread has its own
    and several agents can share one process. Ray runs each actor call in a new context,
    so the runtime wraps each handler call, not only the actor's start.

    Example:

        with agent_log_context(agent_id="c1", agent_type="Counter", incarnation=2):
            logger.info("restored checkpoint %d", version)
    """
    return AgentLogScope(AgentLogFields(agent_id, agent_type, incarnation, node_id))


class AgentLogScope:
    """A ``with`` block whose log records carry ``fields``, which it yields.

    The runtime keeps one `AgentLogFields` per incarnation and enters a new scope for
    each message, which costs a context variable set and reset.
    """

    __slots__ = ("fields", "_token")

    def __init__(self, fields: AgentLogFields) -> None:
        self.fields = fields
        self._token: contextvars.Token[AgentLogFields] | None = None

    def __enter__(self) -> AgentLogFields:
        self._token = _agent_fields.set(self.fields)
        return self.fields

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _agent_fields.reset(self._token)
            self._token = None


def current_agent_log_fields() -> AgentLogFields:
    """Return the agent fields set by the innermost `agent_log_context`, or all None."""
    return _agent_fields.get()


class ContextFilter(logging.Filter):
    """Add the agent fields and the current span's trace and span ids to each record.

    It runs in the thread that logs, so the fields are those of the code that logged even
    when a later handler formats the record elsewhere.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _agent_fields.get()
        record.agent_id = fields.agent_id
        record.agent_type = fields.agent_type
        record.incarnation = fields.incarnation
        record.node_id = fields.node_id

        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            record.trace_id = format(span_context.trace_id, "032x")
            record.span_id = format(span_context.span_id, "016x")
        else:
            record.trace_id = None
            record.span_id = None
        return True


class RepeatedLogFilter(logging.Filter):
    """Collapse repeats of one warning or error to one line per interval, with a count.

    Records with the same logger, level and message template (the format string before
    its arguments are filled in) are repeats. The first passes. Repeats within
    ``interval_s`` after it are dropped and counted, and the first repeat after the
    interval passes with ``record.repeated`` set to the number dropped, which the
    formatters write out. Records below ``min_level`` always pass.

    NOTE: a count is written only when the message occurs again after its interval, so
    the repeats of a burst that stops are never reported.
    """

    def __init__(
        self,
        interval_s: float = DEFAULT_REPEAT_INTERVAL_S,
        min_level: int = logging.WARNING,
        clock: Any = time.monotonic,
    ) -> None:
        super().__init__()
        if interval_s <= 0:
            raise ValueError(f"interval_s={interval_s!r} is invalid; pass a positive number")
        self.interval_s = interval_s
        self.min_level = min_level
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [time the last written record passed, repeats dropped since then]
        self._state: OrderedDict[tuple[str, int, str], list[float]] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()

        with self._lock:
            state = self._state.get(key)
            if state is None:
                self._state[key] = [now, 0]
                if len(self._state) > MAX_REPEAT_KEYS:
                    self._state.popitem(last=False)
                return True

            self._state.move_to_end(key)
            passed_at, dropped = state
            if now - passed_at < self.interval_s:
                state[1] = dropped + 1
                return False
            state[0] = now
            state[1] = 0

        if dropped:
            record.repeated = int(dropped)
        return True


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": _iso_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "agent_id": getattr(record, "agent_id", None),
            "agent_type": getattr(record, "agent_type", None),
            "incarnation": getattr(record, "incarnation", None),
            "node_id": getattr(record, "node_id", None),
            "trace_id": getattr(record, "trace_id", None),
            "span_id": getattr(record, "span_id", None),
        }
        repeated = getattr(record, "repeated", None)
        if repeated:
            line["repeated"] = repeated
        exception = self._exception_text(record)
        if exception:
            line["exception"] = exception
        return json.dumps(line, default=str, ensure_ascii=False)

    def _exception_text(self, record: logging.LogRecord) -> str | None:
        text = ""
        if record.exc_info:
            text = self.formatException(record.exc_info)
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}" if text else record.stack_info
        return text or None


class TextFormatter(logging.Formatter):
    """Format a record as a plain line, with the agent and trace fields that are set."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(arbor_fields)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        for key in ("agent_id", "agent_type", "incarnation", "node_id", "trace_id", "span_id"):
            value = getattr(record, key, None)
            if value is not None:
                parts.append(f"{key}={value}")
        record.arbor_fields = f" [{' '.join(parts)}]" if parts else ""

        text = super().format(record)
        repeated = getattr(record, "repeated", None)
        if repeated:
            first_line, newline, rest = text.partition("\n")
            text = f"{first_line} (repeated {repeated} more times){newline}{rest}"
        return text


class _ArborHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stream handler `configure_logging` installs, marked so a later call replaces it."""


def configure_logging(
    settings: Settings | None = None,
    *,
    stream: TextIO | None = None,
    repeat_interval_s: float = DEFAULT_REPEAT_INTERVAL_S,
) -> logging.Handler:
    """Write the process's logs in Arbor's format, at the configured level.

    Sets the root logger's level to ``ARBOR_LOG_LEVEL`` and installs one handler in the
    ``ARBOR_LOG_FORMAT`` (``json`` or ``text``) with `ContextFilter` and
    `RepeatedLogFilter`. A second call replaces the handler of the first; handlers that
    others installed stay.

    Args:
        settings: Arbor settings; the process-wide ones when None.
        stream: where lines go; standard error when None.
        repeat_interval_s: seconds during which repeats of a warning or error are counted
            instead of written.

    Returns:
        The installed handler.
    """
    settings = settings or get_settings()
    root = logging.getLogger()

    for handler in list(root.handlers):
        if isinstance(handler, _ArborHandler):
            root.removeHandler(handler)
            handler.close()

    handler = _ArborHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    handler.addFilter(RepeatedLogFilter(interval_s=repeat_interval_s))
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    return handler


def _iso_timestamp(created: float) -> str:
    moment = datetime.fromtimestamp(created, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
