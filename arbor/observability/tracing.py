"""OpenTelemetry tracing: SDK set-up and W3C trace context carried in message envelopes.

`configure_tracing` installs an SDK tracer provider in the process. Spans go to an OTLP/HTTP
exporter when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is
set, and nowhere otherwise. The exporter reads the other standard ``OTEL_EXPORTER_OTLP_*``
variables (headers, timeout, certificates, compression) itself, the resource reads
``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``, and ``OTEL_SDK_DISABLED=true`` turns
the SDK's tracers into no-ops.

A sender calls `inject_context` and puts the returned carrier into the message envelope. The
receiver wraps the handler in `span_from_carrier`, so its span is a child of the sender's and
one trace follows a request through every agent it reaches. A process that never called
`configure_tracing` records nothing but still passes the context on, so a trace does not
break at such a process.

Where the provider is set up as `configure_tracing` does, `start_span` and
`span_from_carrier` start `arbor.observability.spans.RecordedSpan` objects instead of the
SDK's spans, and the W3C ``traceparent`` is read and written here instead of by the
propagators; both give the spans and carriers the SDK would, in a fraction of the time.

Example:

    configure_tracing()
    with start_span("arbor.spawn", {"arbor.agent_type": "Counter"}):
        carrier = inject_context()        # goes into the envelope
    ...
    with span_from_carrier("arbor.message", carrier, {"arbor.handler": "add"}):
        ...                               # handle the message
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from contextvars import Token
from types import TracebackType
from typing import Any

from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from arbor.config import Settings, get_settings
from arbor.errors import ConfigError
from arbor.observability.spans import (
    SpanFactory,
    UnsampledSpan,
    format_traceparent,
    parse_traceparent,
)

logger = logging.getLogger(__name__)

TRACER_NAME = "arbor"
DEFAULT_SERVICE_NAME = "arbor"

# Carrier entries longer than this are dropped before extraction. A W3C traceparent is 55
# characters and a tracestate at most 32 members of 256 characters, so real entries fit.
# The limit stops a client-supplied carrier from making the propagator parse megabytes.
MAX_CARRIER_VALUE_LENGTH = 8192

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

_provider: TracerProvider | None = None
# The tracer of `_provider`. The SDK's get_tracer (1.45) builds scope objects and resets a
# warnings filter on each call, which costs more than starting a span, so it runs once.
_tracer: trace.Tracer | None = None
# Starts Arbor's spans without SDK span objects where that gives the same spans; None
# where only the SDK's tracer does (see `arbor.observability.spans`).
_factory: SpanFactory | None = None
_global_provider_set = False
_lock = threading.Lock()
# The propagators `inject_context` and `span_from_carrier` can stand in for.
_PLAIN_PROPAGATORS = frozenset({TraceContextTextMapPropagator, W3CBaggagePropagator})
# The global propagator last checked by `_plain_propagation`, and whether it is plain.
_checked_textmap: Any = None
_plain_textmap = False


def configure_tracing(
    settings: Settings | None = None, *, exporter: SpanExporter | None = None
) -> TracerProvider:
    """Install the process's tracer provider, replacing one that Arbor installed before.

    Sampling: ``ARBOR_TRACE_SAMPLE_RATIO`` r gives ``ParentBased(TraceIdRatioBased(r))``,
    so a new trace is recorded with probability r and a span with a parent follows the
    parent's decision. When that variable is unset and ``OTEL_TRACES_SAMPLER`` is set, the
    SDK's own reading of ``OTEL_TRACES_SAMPLER`` and ``OTEL_TRACES_SAMPLER_ARG`` applies.

    The first call also makes the provider OpenTelemetry's global one, so libraries that
    trace through the global API (an HTTP framework's instrumentation, for example) join the
    same traces. OpenTelemetry sets its global provider once per process, so later calls
    replace only the provider behind Arbor's own spans.

    Args:
        settings: Arbor settings; the process-wide ones when None.
        exporter: an extra exporter that gets every finished span at once, without
            batching; tests pass an ``InMemorySpanExporter`` here.

    Returns:
        The new provider.

    Raises:
        ConfigError: an OTLP endpoint is set but the exporter package is not installed.
    """
    global _provider, _tracer, _factory, _global_provider_set
    settings = settings or get_settings()

    resource = Resource.create()
    if not os.environ.get("OTEL_SERVICE_NAME") and _resource_has_default_name(resource):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource, sampler=_sampler(settings))

    otlp_exporter = _otlp_exporter()
    if otlp_exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(otlp_exporter))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))

    with _lock:
        previous = _provider
        _provider = provider
        _tracer = provider.get_tracer(TRACER_NAME)
        _factory = SpanFactory.for_tracer(_tracer)
        if not _global_provider_set:
            trace.set_tracer_provider(provider)
            _global_provider_set = True
    if previous is not None:
        previous.shutdown()

    logger.info(
        "tracing configured: sampler %s, OTLP export %s",
        provider.sampler.get_description(),
        "on" if otlp_exporter is not None else "off",
    )
    return provider


def use_in_memory_exporter(sample_ratio: float = 1.0) -> InMemorySpanExporter:
    """Configure tracing with an in-memory exporter and return it, for tests.

    Args:
        sample_ratio: the sampling ratio of new traces, from 0.0 to 1.0.
    """
    exporter = InMemorySpanExporter()
    configure_tracing(Settings(trace_sample_ratio=sample_ratio), exporter=exporter)
    return exporter


def shutdown_tracing() -> None:
    """Flush and stop the provider Arbor installed, so later spans are not recorded."""
    global _provider, _tracer, _factory
    with _lock:
        provider = _provider
        _provider = None
        _tracer = None
        _factory = None
    if provider is not None:
        provider.shutdown()


def get_tracer() -> trace.Tracer:
    """Return Arbor's tracer: from the configured provider, else OpenTelemetry's global one."""
    tracer = _tracer
    if tracer is not None:
        return tracer
    return trace.get_tracer(TRACER_NAME)


def inject_context() -> dict[str, str]:
    """Return the current trace context as carrier entries for a message envelope.

    The entries are those of the configured propagators (``OTEL_PROPAGATORS``; by default
    the W3C ``traceparent``, ``tracestate`` when present, and ``baggage``). The carrier is
    empty when no span is active. With the default propagators and no trace state or
    baggage, the traceparent is written here directly, as the propagator would write it.
    """
    if _plain_propagation():
        context = otel_context.get_current()
        if not context:
            return {}
        span = trace.get_current_span(context)
        # A context that contains only the span contains no baggage.
        if (len(context) == 1 and span is not trace.INVALID_SPAN) or not baggage.get_all(context):
            if type(span) is UnsampledSpan and not span.has_trace_state:
                return {"traceparent": span.traceparent}
            span_context = span.get_span_context()
            if span_context.is_valid:
                if not span_context.trace_state:
                    return {"traceparent": format_traceparent(span_context)}
            elif span_context == trace.INVALID_SPAN_CONTEXT:
                return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def span_from_carrier(
    name: str,
    carrier: Mapping[str, Any] | None,
    attributes: Mapping[str, AttributeValue] | None = None,
    *,
    kind: trace.SpanKind = trace.SpanKind.SERVER,
) -> ActiveSpan:
    """Start a span that continues the trace in ``carrier``, to make current in a ``with``.

    A missing, empty or unreadable carrier starts a new trace. An exception raised inside
    the block is recorded on the span, which is marked as an error, and re-raised.

    Args:
        name: the span name, such as ``arbor.message``.
        carrier: the entries `inject_context` returned in the sender's process. Entries
            whose key or value is not a string, or whose value is longer than
            `MAX_CARRIER_VALUE_LENGTH`, are ignored.
        attributes: span attributes; bounded values such as the agent type and handler.
        kind: the span kind; SERVER fits a request that gets a reply.

    Returns:
        A context manager whose ``with`` block runs in the span and yields it.
    """
    return ActiveSpan(continue_trace(name, carrier, attributes, kind=kind))


def continue_trace(
    name: str,
    carrier: Mapping[str, Any] | None,
    attributes: Mapping[str, AttributeValue] | None = None,
    *,
    kind: trace.SpanKind = trace.SpanKind.SERVER,
) -> trace.Span:
    """Start the span of `span_from_carrier` without making it current; `finish_span` ends it."""
    factory = _factory
    if factory is not None and _plain_propagation():
        readable, parent = _plain_parent(carrier)
        if readable:
            span = factory.start(name, parent, kind, attributes)
            if span is not None:
                return span
    context = extract_context(carrier)
    return get_tracer().start_span(name, context=context, kind=kind, attributes=attributes)


def start_span(
    name: str,
    attributes: Mapping[str, AttributeValue] | None = None,
    *,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
) -> ActiveSpan:
    """Start a child of the current span (or a new trace), to make current in a ``with``.

    Used for spawns, checkpoints, recoveries and denied capability checks. An exception
    raised inside the block is recorded on the span and re-raised.
    """
    factory = _factory
    if factory is not None:
        parent = trace.get_current_span().get_span_context()
        span = factory.start(name, parent if parent.is_valid else None, kind, attributes)
        if span is not None:
            return ActiveSpan(span)
    return ActiveSpan(get_tracer().start_span(name, kind=kind, attributes=attributes))


def extract_context(carrier: Mapping[str, Any] | None) -> otel_context.Context:
    """Return a new context holding the trace context of ``carrier``, read by the propagators."""
    return propagate.extract(_clean_carrier(carrier), context=otel_context.Context())


class ActiveSpan:
    """A started span that a ``with`` block makes current and ends on exit.

    It does what the SDK's ``start_as_current_span`` does (an ``Exception`` leaving the
    block is recorded as an event and sets the status to ERROR) in one object instead of
    two nested generators, which saves a few microseconds per span.
    """

    __slots__ = ("span", "_token")

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self._token: Token[otel_context.Context] | None = None

    def __enter__(self) -> trace.Span:
        self._token = otel_context.attach(trace.set_span_in_context(self.span))
        return self.span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._token is not None:
            otel_context.detach(self._token)
        finish_span(self.span, exc)


def finish_span(span: trace.Span, error: BaseException | None) -> None:
    """End ``span``, first recording ``error`` on it if an exception left the span's block.

    Only Exception subclasses are errors, as in the SDK, so GeneratorExit and
    KeyboardInterrupt end the span without an error status.
    """
    try:
        if isinstance(error, Exception) and span.is_recording():
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    finally:
        span.end()


def current_trace_ids() -> tuple[str, str] | None:
    """Return the current span's (trace_id, span_id) in lowercase hex, or None if none."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")


def _sampler(settings: Settings) -> Sampler | None:
    ratio_set = "trace_sample_ratio" in settings.model_fields_set
    if not ratio_set and os.environ.get("OTEL_TRACES_SAMPLER"):
        return None
    return ParentBased(TraceIdRatioBased(settings.trace_sample_ratio))


def _resource_has_default_name(resource: Resource) -> bool:
    name = resource.attributes.get(SERVICE_NAME)
    return not name or str(name).startswith("unknown_service")


def _otlp_exporter() -> SpanExporter | None:
    if not any(os.environ.get(variable) for variable in _ENDPOINT_VARIABLES):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: F401
            OTLPSpanExporter,
        )

        from arbor.observability.otlp import OTLPHTTPSpanExporter
    except ImportError as error:
        raise ConfigError(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP/HTTP exporter is not installed; "
            "install it with pip install 'arbor[otlp]' or unset the variable"
        ) from error
    return OTLPHTTPSpanExporter()


def _plain_propagation() -> bool:
    """Return whether the global propagators are the default W3C ones (trace context, baggage).

    Then `inject_context` and `span_from_carrier` read and write ``traceparent`` themselves
    where the propagators would give the same result. The result is cached until the
    global propagator changes.
    """
    global _checked_textmap, _plain_textmap
    textmap = propagate.get_global_textmap()
    if textmap is not _checked_textmap:
        kinds = None
        if type(textmap) is CompositePropagator:
            propagators = getattr(textmap, "_propagators", None)
            if propagators is not None:
                kinds = {type(propagator) for propagator in propagators}
        _plain_textmap = kinds is not None and TraceContextTextMapPropagator in kinds
        _plain_textmap = _plain_textmap and kinds <= _PLAIN_PROPAGATORS
        _checked_textmap = textmap
    return _plain_textmap


def _plain_parent(carrier: Mapping[str, Any] | None) -> tuple[bool, trace.SpanContext | None]:
    """Read the parent in ``carrier`` as the default propagators would, where that is simple.

    Returns (True, parent or None for a new trace), or (False, None) when the carrier needs
    the propagators: trace state or baggage, a traceparent of another form.
    """
    if not carrier:
        return True, None
    if not isinstance(carrier, Mapping) or "tracestate" in carrier or "baggage" in carrier:
        return False, None
    value = carrier.get("traceparent")
    if not value or type(value) is not str or len(value) > MAX_CARRIER_VALUE_LENGTH:
        # `_clean_carrier` drops such an entry, so the propagator would start a new trace.
        return True, None
    parent = parse_traceparent(value)
    if parent is None:
        return False, None
    return True, parent


def _clean_carrier(carrier: Mapping[str, Any] | None) -> dict[str, str]:
    if not carrier:
        return {}
    if not isinstance(carrier, Mapping):
        logger.debug("trace carrier of type %s ignored", type(carrier).__name__)
        return {}
    cleaned: dict[str, str] = {}
    for key, value in carrier.items():
        if not isinstance(key, str) or not isinstance(value, str):
            continue
        if len(value) > MAX_CARRIER_VALUE_LENGTH:
            continue
        cleaned[key] = value
    return cleaned
