"""Arbor's own spans, recorded without the SDK's span objects on the message path.

The SDK's `Tracer.start_span` and `Span.end` (``opentelemetry-sdk`` 1.45) took 12 to 16 µs
per span on the 2-core benchmark machine: a sampler call, a lock, a `BoundedAttributes`
with its own lock and a check of every attribute, two bounded lists, span processor
calls at the start and at the end, and a copy of the span as a `ReadableSpan` at the end.
A traced request makes four spans (a message and its checkpoint in each of two agents),
all on the critical path of the handler.

`SpanFactory.start` returns a `RecordedSpan` instead, for about 2.5 µs from start to end.
It implements the whole OpenTelemetry API `Span` (attributes, events, links, status,
exceptions), so code inside a handler that calls ``trace.get_current_span()`` sees an
ordinary recording span, and the SDK's tracer makes the spans of instrumented libraries
its children. When it ends it builds the SDK's `ReadableSpan` and hands it to the
provider's span processors, so batching, the ``OTEL_BSP_*`` settings, OTLP export and the
in-memory test exporter see the same span the SDK would have produced: same ids, flags,
parent, trace state, resource, instrumentation scope, attributes and limits.

The factory is used only where that holds, and the SDK's tracer is used otherwise:

- the tracer is an enabled SDK tracer (not ``OTEL_SDK_DISABLED``), and the SDK's internal
  metrics (``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED``) are off;
- the sampler records every new trace and every child of a sampled parent, adding no
  attributes (``AlwaysOnSampler``, or ``ParentBased`` of it or of
  ``TraceIdRatioBased{1.0}``, which is what the runtime installs because it samples
  before it asks for a span). Below an unsampled parent the SDK decides;
- every span processor is a `BatchSpanProcessor` or `SimpleSpanProcessor`, whose
  ``on_start`` does nothing. A processor of another kind, added to the provider at any
  time, sends every later span through the SDK, so its ``on_start`` runs.

NOTE: this relies on three private attributes of SDK 1.45: ``Tracer._span_limits``,
``Tracer._instrumentation_scope`` and ``SynchronousMultiSpanProcessor._span_processors``.
If a release renames one, `SpanFactory.for_tracer` returns None and every span comes from
the SDK again, slower but the same; ``test_span_factory_available_with_installed_sdk``
then fails to point at it.
"""

from __future__ import annotations

import logging
import os
import random
import re
import traceback
from collections.abc import Mapping
from time import time_ns
from typing import Any

from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import (
    Event,
    ReadableSpan,
    SpanLimits,
    SynchronousMultiSpanProcessor,
)
from opentelemetry.sdk.trace import Tracer as SDKTracer
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    ParentBased,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode
from opentelemetry.util import types

logger = logging.getLogger(__name__)

# Samplers that record every root span and every child of a sampled parent, keep the
# parent's trace state and add no attributes, by their (public) descriptions.
_RECORD_ALL_SAMPLERS = frozenset(
    {
        ALWAYS_ON.get_description(),
        ParentBased(ALWAYS_ON).get_description(),
        ParentBased(TraceIdRatioBased(1.0)).get_description(),
    }
)
# Span processors whose on_start and _on_ending do nothing.
_PLAIN_PROCESSORS = (BatchSpanProcessor, SimpleSpanProcessor)

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_SAMPLED_RANDOM = TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)
_UNSET = Status(StatusCode.UNSET)

# W3C traceparent of version 00 exactly as Arbor and the SDK write it. Anything else
# (other versions, upper case, surrounding blanks) goes through the SDK's propagator.
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16


def parse_traceparent(value: str) -> SpanContext | None:
    """Return the remote parent in a version-00 traceparent, or None if it has another form.

    None means "ask the propagator", which also handles the forms this does not.
    """
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    trace_id, span_id, flags = match.groups()
    if trace_id == _ZERO_TRACE_ID or span_id == _ZERO_SPAN_ID:
        return None
    return SpanContext(int(trace_id, 16), int(span_id, 16), True, TraceFlags(int(flags, 16)))


def is_plain_traceparent(value: str) -> bool:
    """Return whether `parse_traceparent` reads ``value``, without making a `SpanContext`."""
    return (
        _TRACEPARENT.fullmatch(value) is not None
        and value[3:35] != _ZERO_TRACE_ID
        and value[36:52] != _ZERO_SPAN_ID
    )


def format_traceparent(context: SpanContext) -> str:
    """Return the W3C traceparent of ``context``, as the SDK's propagator writes it."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


class SpanFactory:
    """Starts `RecordedSpan` objects for one SDK tracer, where they match the SDK's spans."""

    def __init__(self, tracer: SDKTracer, limits: SpanLimits, scope: Any) -> None:
        self.tracer = tracer
        self.limits = limits
        self.scope = scope
        self._processor: SynchronousMultiSpanProcessor = tracer.span_processor  # type: ignore[assignment]
        self._random_ids = tracer.id_generator.is_trace_id_random()
        self._checked: tuple[Any, ...] | None = None
        self._plain = False
        # Attribute values are taken as they are only when the SDK would not shorten them.
        self._plain_attribute_count = (
            limits.max_span_attributes if limits.max_span_attribute_length is None else -1
        )

    @classmethod
    def for_tracer(cls, tracer: Any) -> SpanFactory | None:
        """Return a factory for ``tracer``, or None where only the SDK's spans are right."""
        if type(tracer) is not SDKTracer:
            return None
        flag = os.environ.get("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "")
        if flag.strip().lower() == "true":
            return None
        if tracer.sampler.get_description() not in _RECORD_ALL_SAMPLERS:
            return None
        if type(tracer.span_processor) is not SynchronousMultiSpanProcessor:
            return None
        limits = getattr(tracer, "_span_limits", None)
        scope = getattr(tracer, "_instrumentation_scope", None)
        processors = getattr(tracer.span_processor, "_span_processors", None)
        if not isinstance(limits, SpanLimits) or scope is None or processors is None:
            return None
        return cls(tracer, limits, scope)

    def start(
        self,
        name: str,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: Mapping[str, types.AnyValue] | None,
    ) -> RecordedSpan | None:
        """Start a recorded span under ``parent`` (None: a new trace), or return None.

        None means the SDK has to make this span: the parent is not sampled, the tracer
        was disabled, or a span processor that is not plain was added.
        """
        processors = self._processor._span_processors
        if processors is not self._checked:
            self._plain = all(type(processor) in _PLAIN_PROCESSORS for processor in processors)
            self._checked = processors
        if not self._plain:
            return None
        is_enabled = getattr(self.tracer, "_is_enabled", None)
        if is_enabled is not None and not is_enabled():
            return None

        ids = self.tracer.id_generator
        if parent is None:
            trace_id = ids.generate_trace_id()
            flags = _SAMPLED_RANDOM if self._random_ids else _SAMPLED
            context = SpanContext(trace_id, ids.generate_span_id(), False, flags)
        else:
            parent_flags = parent.trace_flags
            if not parent_flags & TraceFlags.SAMPLED:
                return None
            flags = _SAMPLED_RANDOM if parent_flags & TraceFlags.RANDOM_TRACE_ID else _SAMPLED
            context = SpanContext(
                parent.trace_id, ids.generate_span_id(), False, flags, parent.trace_state
            )
        return RecordedSpan(self, name, context, parent, kind, self._attributes(attributes))

    def _attributes(self, attributes: Mapping[str, types.AnyValue] | None) -> Any:
        if not attributes:
            return None
        if len(attributes) <= self._plain_attribute_count:
            plain = True
            for key, value in attributes.items():
                if type(value) is not str or type(key) is not str or not key:
                    plain = False
                    break
            if plain:
                return dict(attributes)
        limits = self.limits
        return BoundedAttributes(
            limits.max_span_attributes,
            attributes,
            immutable=False,
            max_value_len=limits.max_span_attribute_length,
        )


class RecordedSpan(trace.Span):
    """A recording span that becomes an SDK `ReadableSpan` for the span processors at its end.

    It behaves as the SDK's span does for every method of the API, with the same limits
    and warnings. It has no lock: Arbor uses a span from the thread that handles the
    message, and the GIL keeps single attribute writes from other threads whole.
    """

    __slots__ = (
        "_factory",
        "_name",
        "_context",
        "_parent",
        "_kind",
        "_attributes",
        "_events",
        "_links",
        "_status",
        "_start_time",
        "_end_time",
    )

    def __init__(
        self,
        factory: SpanFactory,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: Any,
    ) -> None:
        self._factory = factory
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        # None, a dict of valid string attributes, or BoundedAttributes once changed.
        self._attributes = attributes
        self._events: BoundedList | None = None
        self._links: BoundedList | None = None
        self._status = _UNSET
        self._start_time = time_ns()
        self._end_time: int | None = None

    def __repr__(self) -> str:
        return f'{type(self).__name__}(name="{self._name}", context={self._context})'

    @property
    def name(self) -> str:
        return self._name

    @property
    def parent(self) -> SpanContext | None:
        return self._parent

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        if self._end_time is not None:
            logger.warning("Setting attribute on ended span.")
            return
        bounded = self._bounded_attributes()
        for key, value in attributes.items():
            bounded[key] = value

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if self._end_time is not None:
            logger.warning("Setting attribute on ended span.")
            return
        self._bounded_attributes()[key] = value

    def add_event(
        self,
        name: str,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
    ) -> None:
        if self._ended("_add_event"):
            return
        limits = self._factory.limits
        bounded = BoundedAttributes(
            limits.max_event_attributes,
            attributes,
            max_value_len=limits.max_attribute_length,
            immutable=True,
        )
        if self._events is None:
            self._events = BoundedList(limits.max_events)
        self._events.append(Event(name=name, attributes=bounded, timestamp=timestamp))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if not (context and (context.is_valid or (attributes or context.trace_state))):
            return
        if self._ended("_add_link"):
            return
        limits = self._factory.limits
        bounded = BoundedAttributes(
            limits.max_link_attributes,
            attributes,
            max_value_len=limits.max_attribute_length,
            immutable=True,
        )
        if self._links is None:
            self._links = BoundedList(limits.max_links)
        self._links.append(Link(context=context, attributes=bounded))

    def update_name(self, name: str) -> None:
        if self._ended("update_name"):
            return
        self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._ended("set_status"):
            return
        current = self._status
        # As the SDK: an OK status is final, and UNSET changes nothing.
        if isinstance(status, Status):
            if current.status_code is StatusCode.OK or status.status_code is StatusCode.UNSET:
                return
            if description is not None:
                logger.warning(
                    "Description %s ignored. Use either `Status` or `(StatusCode, Description)`",
                    description,
                )
            self._status = status
        elif isinstance(status, StatusCode):
            if current.status_code is StatusCode.OK or status is StatusCode.UNSET:
                return
            self._status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        # The attributes of the SDK's record_exception (semantic conventions "exception.*").
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        event_attributes: dict[str, types.AnyValue] = {
            "exception.type": f"{module}.{qualname}"
            if module and module != "builtins"
            else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            event_attributes.update(attributes)
        self.add_event("exception", event_attributes, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            logger.warning("Calling end() on an ended span.")
            return
        self._end_time = end_time if end_time is not None else time_ns()
        factory = self._factory
        tracer = factory.tracer
        readable = ReadableSpan(
            self._name,
            self._context,
            self._parent,
            tracer.resource,
            self._attributes,
            self._events if self._events is not None else (),
            self._links if self._links is not None else (),
            self._kind,
            tracer.instrumentation_info,
            self._status,
            self._start_time,
            self._end_time,
            factory.scope,
        )
        tracer.span_processor.on_end(readable)

    def _bounded_attributes(self) -> BoundedAttributes:
        attributes = self._attributes
        if not isinstance(attributes, BoundedAttributes):
            limits = self._factory.limits
            attributes = BoundedAttributes(
                limits.max_span_attributes,
                attributes,
                immutable=False,
                max_value_len=limits.max_span_attribute_length,
            )
            self._attributes = attributes
        return attributes

    def _ended(self, method: str) -> bool:
        if self._end_time is None:
            return False
        logger.warning("Tried calling %s on an ended span.", method)
        return True


class UnsampledSpan(trace.NonRecordingSpan):
    """The current span of a request that is not recorded: its trace context, sampled flag off.

    A message whose trace is not sampled runs in this span instead of a recorded one. Like
    any non-recording span it records nothing, and the SDK's sampler makes no recorded
    span below it, so libraries traced through OpenTelemetry inside the handler drop their
    spans too and a trace is recorded whole or not at all. Sends put `traceparent` into
    their envelopes unchanged, so the next agent makes the same decision, and log lines
    carry its trace id.

    It keeps the traceparent as text and reads it into a `SpanContext` only when asked, and
    a new trace's ids are drawn only when first needed, so a message that neither sends nor
    logs pays for neither.
    """

    __slots__ = ("_traceparent", "_checked")

    def __init__(self, traceparent: str | None = None) -> None:
        # NonRecordingSpan.__init__ would take a SpanContext; it is made on demand instead.
        self._traceparent = traceparent
        self._checked = False
        self._context: SpanContext | None = None  # type: ignore[assignment]

    @classmethod
    def for_context(cls, context: SpanContext) -> UnsampledSpan:
        """Return the unsampled span of a valid, unsampled parent read by the propagators.

        Unlike a bare traceparent, ``context`` may carry a trace state, which sends pass on.
        """
        span = cls(format_traceparent(context))
        span._checked = True
        span._context = context
        return span

    @property
    def has_trace_state(self) -> bool:
        """Whether sends have to carry a W3C tracestate too."""
        context = self._context
        return context is not None and bool(context.trace_state)

    @property
    def traceparent(self) -> str:
        """The W3C traceparent to send on, with the sampled flag off.

        It is the one given if that is a valid version-00 traceparent, else a new trace's.
        """
        if not self._checked:
            traceparent = self._traceparent
            if traceparent is None or not is_plain_traceparent(traceparent):
                # The ids need to be unique, not secret, so they come from `random`, as
                # the SDK's own ids do; W3C treats an all-zero id as invalid.
                trace_id = random.getrandbits(128) or 1
                span_id = random.getrandbits(64) or 1
                self._traceparent = f"00-{trace_id:032x}-{span_id:016x}-00"
            self._checked = True
        return self._traceparent  # type: ignore[return-value]

    def get_span_context(self) -> SpanContext:
        context = self._context
        if context is None:
            # `traceparent` is valid, so it always parses.
            context = parse_traceparent(self.traceparent) or trace.INVALID_SPAN_CONTEXT
            self._context = context
        return context

    def __repr__(self) -> str:
        return f"UnsampledSpan({self.traceparent!r})"
