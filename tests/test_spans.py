"""Arbor's recorded spans against the SDK's own, and the fast W3C reading and writing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from arbor.config import Settings
from arbor.observability import otlp, spans, tracing

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = tracing.use_in_memory_exporter(sample_ratio=1.0)
    yield exporter
    tracing.shutdown_tracing()


def use_sdk_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "_factory", None)


def exercise(carrier: dict[str, str]) -> None:
    """Make a message span and a child, using every method of the API's Span."""
    with tracing.span_from_carrier("arbor.message", carrier, {"arbor.handler": "add"}) as span:
        span.set_attribute("count", 3)
        span.set_attributes({"ratio": 0.5, "tags": ("a", "b")})
        span.add_event("step", {"n": 1}, timestamp=1_000)
        span.add_link(trace.SpanContext(5, 6, False), {"why": "batch"})
        span.update_name("arbor.message renamed")
        with tracing.start_span("arbor.checkpoint", {"arbor.agent": "a"}) as child:
            child.set_status(Status(StatusCode.OK))
            child.set_status(StatusCode.ERROR, "ignored after OK")
        try:
            raise ValueError("bad value")
        except ValueError as error:
            span.record_exception(error, timestamp=2_000)
        span.set_status(StatusCode.ERROR, "failed")


def comparable(span: ReadableSpan) -> dict[str, Any]:
    """The fields of a finished span that do not depend on ids or clocks."""
    return {
        "name": span.name,
        "kind": span.kind,
        "attributes": dict(span.attributes),
        "events": [(event.name, dict(event.attributes)) for event in span.events],
        "links": [(link.context, dict(link.attributes)) for link in span.links],
        "status": (span.status.status_code, span.status.description),
        "has_parent": span.parent is not None,
        "parent_remote": span.parent.is_remote if span.parent else None,
        "flags": span.context.trace_flags,
        "trace_state": span.context.trace_state,
        "resource": span.resource,
        "scope": span.instrumentation_scope,
    }


def test_factory_available_with_installed_sdk(exporter: InMemorySpanExporter) -> None:
    # Fails when an SDK release renames the private attributes `SpanFactory` reads.
    assert tracing._factory is not None
    with tracing.start_span("arbor.spawn") as span:
        assert isinstance(span, spans.RecordedSpan)


def test_recorded_span_matches_sdk_span(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    exercise({"traceparent": PARENT})
    ours = [comparable(span) for span in exporter.get_finished_spans()]
    exporter.clear()
    use_sdk_spans(monkeypatch)
    exercise({"traceparent": PARENT})
    theirs = [comparable(span) for span in exporter.get_finished_spans()]

    assert ours == theirs
    assert ours[1]["events"][1][0] == "exception"
    assert ours[1]["events"][1][1]["exception.type"] == "ValueError"


def test_recorded_spans_link_as_sdk_spans(exporter: InMemorySpanExporter) -> None:
    with (
        tracing.span_from_carrier("arbor.message", {"traceparent": PARENT}) as message,
        tracing.start_span("arbor.checkpoint") as checkpoint,
    ):
        pass

    finished_checkpoint, finished_message = exporter.get_finished_spans()
    context = message.get_span_context()
    assert f"{context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert finished_message.parent.span_id == 0xB7AD6B7169203331
    assert finished_message.parent.is_remote
    assert finished_checkpoint.parent == context
    assert checkpoint.get_span_context().trace_id == context.trace_id
    assert not finished_checkpoint.parent.is_remote


def test_new_trace_sets_sampled_and_random_flags(exporter: InMemorySpanExporter) -> None:
    with tracing.span_from_carrier("arbor.message", {}) as span:
        carrier = tracing.inject_context()

    flags = span.get_span_context().trace_flags
    assert flags.sampled
    assert flags.random_trace_id
    assert carrier["traceparent"].endswith("-03")


def test_recorded_spans_encode_as_sdk_does(exporter: InMemorySpanExporter) -> None:
    exercise({"traceparent": PARENT})
    finished = exporter.get_finished_spans()

    assert otlp.encode_spans(finished) == sdk_encode(finished).SerializePartialToString()


def test_ended_span_ignores_changes(exporter: InMemorySpanExporter) -> None:
    with tracing.start_span("arbor.spawn") as span:
        pass
    span.set_attribute("late", 1)
    span.add_event("late")
    span.end()

    (finished,) = exporter.get_finished_spans()
    assert "late" not in finished.attributes
    assert finished.events == ()
    assert not span.is_recording()


def test_invalid_attribute_handled_as_sdk_does(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    attributes: dict[str, Any] = {"good": "x", "bad": object(), "": "no key", "n": 2}
    with tracing.start_span("arbor.spawn", attributes):
        pass
    use_sdk_spans(monkeypatch)
    with tracing.start_span("arbor.spawn", attributes):
        pass

    ours, theirs = exporter.get_finished_spans()
    assert dict(ours.attributes) == dict(theirs.attributes)
    assert "" not in ours.attributes


class CountingProcessor(SpanProcessor):
    def __init__(self) -> None:
        self.started: list[str] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.started.append(span.name)


def test_other_processor_gets_sdk_spans() -> None:
    exporter = InMemorySpanExporter()
    provider = tracing.configure_tracing(Settings(trace_sample_ratio=1.0), exporter=exporter)
    counting = CountingProcessor()
    try:
        with tracing.start_span("before") as before:
            pass
        provider.add_span_processor(counting)
        with tracing.start_span("after") as after:
            pass
    finally:
        tracing.shutdown_tracing()

    assert isinstance(before, spans.RecordedSpan)
    assert not isinstance(after, spans.RecordedSpan)
    assert counting.started == ["after"]
    assert [finished.name for finished in exporter.get_finished_spans()] == ["before", "after"]


def test_sampler_below_one_keeps_sdk_spans() -> None:
    tracing.use_in_memory_exporter(sample_ratio=0.5)
    try:
        assert tracing._factory is None
    finally:
        tracing.shutdown_tracing()


@pytest.mark.parametrize(
    "carrier",
    [
        {"traceparent": PARENT},
        {"traceparent": PARENT[:-2] + "00"},
        {"traceparent": PARENT, "tracestate": "vendor=a1"},
        {"traceparent": "  " + PARENT},
        {"traceparent": PARENT.upper()},
        {"traceparent": "00-" + "0" * 32 + "-b7ad6b7169203331-01"},
        {"traceparent": "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra"},
        {"traceparent": "garbage"},
        {},
    ],
)
def test_message_parent_read_as_propagator_does(
    exporter: InMemorySpanExporter, carrier: dict[str, str]
) -> None:
    expected = trace.get_current_span(propagate.extract(carrier)).get_span_context()

    with tracing.span_from_carrier("arbor.message", carrier):
        pass

    finished = exporter.get_finished_spans()
    if not expected.is_valid:
        assert finished[0].parent is None
    elif not expected.trace_flags.sampled:
        # Below an unsampled parent the SDK's sampler decides: ParentBased drops the span.
        assert finished == ()
    else:
        assert finished[0].parent == expected


def test_inject_writes_what_propagator_writes(exporter: InMemorySpanExporter) -> None:
    with tracing.span_from_carrier("arbor.message", {"traceparent": PARENT}):
        ours = tracing.inject_context()
        theirs: dict[str, str] = {}
        propagate.inject(theirs)

    assert ours == theirs


def test_inject_keeps_baggage_and_trace_state(exporter: InMemorySpanExporter) -> None:
    carrier = {"traceparent": PARENT, "tracestate": "vendor=a1"}
    token = otel_context.attach(baggage.set_baggage("tenant", "t1"))
    try:
        with tracing.span_from_carrier("arbor.message", carrier):
            sent = tracing.inject_context()
    finally:
        otel_context.detach(token)

    assert sent["tracestate"] == "vendor=a1"
    assert sent["baggage"] == "tenant=t1"
    assert sent["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")


def test_inject_without_context_is_empty() -> None:
    assert tracing.inject_context() == {}


def test_unsampled_span_reads_its_traceparent() -> None:
    span = spans.UnsampledSpan(PARENT[:-2] + "00")

    context = span.get_span_context()
    assert context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert context.span_id == 0xB7AD6B7169203331
    assert not context.trace_flags.sampled
    assert not span.is_recording()


def test_unsampled_root_draws_ids_once() -> None:
    span = spans.UnsampledSpan()

    first = span.traceparent
    assert first == span.traceparent
    assert first.endswith("-00")
    assert span.get_span_context().is_valid
    assert spans.UnsampledSpan().traceparent != first


def test_plain_traceparent_forms() -> None:
    assert spans.is_plain_traceparent(PARENT)
    assert not spans.is_plain_traceparent(PARENT.upper())
    assert not spans.is_plain_traceparent(" " + PARENT)
    assert not spans.is_plain_traceparent("00-" + "0" * 32 + "-b7ad6b7169203331-01")
    assert not spans.is_plain_traceparent("00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01")
    assert spans.parse_traceparent(PARENT) == trace.SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True, trace.TraceFlags(1)
    )
    assert spans.format_traceparent(spans.parse_traceparent(PARENT)) == PARENT  # type: ignore[arg-type]


def test_span_kind_and_status_default(exporter: InMemorySpanExporter) -> None:
    with tracing.span_from_carrier("arbor.message", {}):
        pass

    (finished,) = exporter.get_finished_spans()
    assert finished.kind == SpanKind.SERVER
    assert finished.status.status_code == StatusCode.UNSET
