"""Arbor's OTLP span encoder against the SDK's, and the exporter that sends its output."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode
from opentelemetry.exporter.otlp.proto.http import trace_exporter as sdk_trace_exporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from arbor.config import Settings
from arbor.observability import otlp, tracing

REMOTE_PARENT = {
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "vendor=a1,other=b2",
}


def finished_spans(resource: Resource | None = None) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=resource or Resource.create({"service.name": "arbor"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def assert_same_request(spans: Sequence[ReadableSpan]) -> None:
    ours = otlp.encode_spans(spans)
    expected = sdk_encode(spans)
    assert ExportTraceServiceRequest.FromString(ours) == expected
    assert ours == expected.SerializePartialToString()


def test_message_spans_encode_as_sdk_does() -> None:
    provider, exporter = finished_spans()
    tracer = provider.get_tracer("arbor")
    parent = propagate.extract(REMOTE_PARENT)
    attributes = {"arbor.agent_type": "Counter", "arbor.kind": "ask", "arbor.handler": "add"}

    with (
        tracer.start_as_current_span(
            "arbor.message", context=parent, kind=trace.SpanKind.SERVER, attributes=attributes
        ),
        tracer.start_as_current_span("arbor.checkpoint", attributes={"arbor.agent": "c1"}),
    ):
        pass

    assert_same_request(exporter.get_finished_spans())


def test_every_attribute_type_encodes_as_sdk_does() -> None:
    provider, exporter = finished_spans()
    attributes = {
        "text": "x",
        "empty": "",
        "true": True,
        "false": False,
        "negative": -5,
        "zero": 0,
        "large": 2**62,
        "double": 1.5,
        "texts": ("a", "b"),
        "ints": (1, -2),
        "doubles": (0.5,),
        "bools": (True, False),
    }

    with provider.get_tracer("arbor").start_as_current_span("typed", attributes=attributes):
        pass

    assert_same_request(exporter.get_finished_spans())


def test_events_links_and_status_encode_as_sdk_does() -> None:
    provider, exporter = finished_spans()
    tracer = provider.get_tracer("arbor")
    other = provider.get_tracer("library", "1.2.3", schema_url="https://example.test/schema")

    with tracer.start_as_current_span("root", kind=trace.SpanKind.CLIENT) as root:
        link = trace.Link(root.get_span_context(), {"link.kind": "follows"})
        with other.start_as_current_span("linked", links=[link]) as linked:
            linked.add_event("retry", {"attempt": 2})
            linked.set_status(trace.Status(trace.StatusCode.OK))
        with pytest.raises(ValueError), tracer.start_as_current_span("failed"):
            raise ValueError("store unavailable")

    assert_same_request(exporter.get_finished_spans())


def test_spans_of_two_resources_group_as_sdk_does() -> None:
    first, first_spans = finished_spans(Resource.create({"service.name": "gateway"}))
    second, second_spans = finished_spans(Resource.create({"service.name": "agent"}))
    for provider in (first, second, first):
        with provider.get_tracer("arbor").start_as_current_span("step"):
            pass

    spans = [*first_spans.get_finished_spans(), *second_spans.get_finished_spans()]
    request = ExportTraceServiceRequest.FromString(otlp.encode_spans(spans))

    assert len(request.resource_spans) == 2
    assert_same_request(spans)


def test_integer_outside_int64_is_left_out() -> None:
    provider, exporter = finished_spans()
    with provider.get_tracer("arbor").start_as_current_span(
        "big", attributes={"kept": 1, "too_big": 2**70}
    ):
        pass

    (span,) = exporter.get_finished_spans()
    request = ExportTraceServiceRequest.FromString(otlp.encode_spans([span]))

    encoded = request.resource_spans[0].scope_spans[0].spans[0]
    assert [attribute.key for attribute in encoded.attributes] == ["kept"]


def test_attribute_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(otlp, "MAX_CACHED_ATTRIBUTES", 8)
    monkeypatch.setattr(otlp, "_attribute_cache", {})
    monkeypatch.setattr(otlp, "_attribute_set_cache", {})
    monkeypatch.setattr(otlp, "_name_cache", {})
    provider, exporter = finished_spans()
    for number in range(20):
        with provider.get_tracer("arbor").start_as_current_span(
            f"step {number}", attributes={"request": f"r{number}"}
        ):
            pass

    spans = exporter.get_finished_spans()
    otlp.encode_spans(spans)

    assert 0 < len(otlp._attribute_cache) <= 8
    assert 0 < len(otlp._attribute_set_cache) <= 8
    assert 0 < len(otlp._name_cache) <= 8
    assert_same_request(spans)


# --- the exporter -------------------------------------------------------------------------


class _Collector(BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
        self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    server = HTTPServer(("127.0.0.1", 0), _Collector)
    _Collector.bodies = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    yield _Collector.bodies
    server.shutdown()
    server.server_close()


def test_exporter_sends_arbor_encoding(
    collector: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    def sdk_encoder_not_expected(spans: Any) -> Any:
        raise AssertionError("the SDK's encoder ran")

    monkeypatch.setattr(sdk_trace_exporter, "encode_spans", sdk_encoder_not_expected)
    try:
        provider = tracing.configure_tracing(Settings(trace_sample_ratio=1.0))
        with tracing.start_span("arbor.spawn", {"arbor.agent_type": "Counter"}):
            pass
        assert provider.force_flush(timeout_millis=10_000)
    finally:
        tracing.shutdown_tracing()

    request = ExportTraceServiceRequest.FromString(b"".join(collector))
    (span,) = request.resource_spans[0].scope_spans[0].spans
    assert span.name == "arbor.spawn"
    assert span.attributes[0].key == "arbor.agent_type"
    assert span.attributes[0].value.string_value == "Counter"


def test_exporter_fast_path_available_with_installed_sdk(collector: list[bytes]) -> None:
    exporter = otlp.OTLPHTTPSpanExporter()
    try:
        assert exporter.is_fast_path_available()
    finally:
        exporter.shutdown()


def test_exporter_defers_to_sdk_for_internal_metrics(
    collector: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded_by_sdk: list[int] = []

    def counting_sdk_encoder(spans: Sequence[ReadableSpan]) -> Any:
        encoded_by_sdk.append(len(spans))
        return sdk_encode(spans)

    monkeypatch.setattr(sdk_trace_exporter, "encode_spans", counting_sdk_encoder)
    monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")
    provider, spans = finished_spans()
    with provider.get_tracer("arbor").start_as_current_span("step"):
        pass
    exporter = otlp.OTLPHTTPSpanExporter()
    try:
        result = exporter.export(spans.get_finished_spans())
    finally:
        exporter.shutdown()

    assert result == SpanExportResult.SUCCESS
    assert encoded_by_sdk == [1]
    assert len(collector) == 1
