"""Head sampling in the runtime: unrecorded messages cost no span and pass the decision on."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import Tracer as SDKTracer
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import arbor
from arbor.config import Settings
from arbor.messages import Envelope, ErrorInfo, Reply
from arbor.observability import logs, tracing
from arbor.observability.spans import SpanFactory
from arbor.persistence import AgentRecord, open_store
from arbor.runtime import telemetry
from arbor.runtime.cell import AgentCell
from arbor.runtime.context import RuntimeContext


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = tracing.use_in_memory_exporter(sample_ratio=1.0)
    monkeypatch.setattr(telemetry, "_tracing", True)
    yield exporter
    tracing.shutdown_tracing()


def handle(cell: telemetry.CellTelemetry, envelope: Envelope) -> dict[str, str]:
    """Run an empty handler for ``envelope`` and return what a send inside it carries."""
    with cell.message(envelope, epoch=1):
        return telemetry.outgoing_headers()


def test_root_message_at_ratio_zero_records_nothing_downstream(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(telemetry, "_ratio", 0.0)
    cell = telemetry.CellTelemetry("a", "Counter", "node")
    sent = handle(cell, Envelope("add"))
    assert sent["traceparent"].endswith("-00")
    # The next hop reads the unsampled flag and records nothing either, whatever its ratio.
    monkeypatch.setattr(telemetry, "_ratio", 1.0)
    forwarded = handle(cell, Envelope("add", headers=sent))
    assert forwarded["traceparent"] == sent["traceparent"]
    assert spans.get_finished_spans() == ()


def test_root_message_at_ratio_one_records_and_propagates(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(telemetry, "_ratio", 1.0)
    cell = telemetry.CellTelemetry("a", "Counter", "node")
    sent = handle(cell, Envelope("add"))
    # The last field is the trace flags; bit 0 is "sampled".
    assert int(sent["traceparent"][-2:], 16) & 1
    handle(cell, Envelope("get", headers=sent))
    first, second = spans.get_finished_spans()[-2:]
    assert first.parent is None
    assert second.parent is not None
    assert second.parent.span_id == first.context.span_id
    assert first.context.trace_id == second.context.trace_id


def test_sampled_parent_is_followed_at_ratio_zero(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(telemetry, "_ratio", 0.0)
    cell = telemetry.CellTelemetry("b", "Counter", "node")
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    handle(cell, Envelope("add", headers={"traceparent": parent}))
    (span,) = spans.get_finished_spans()
    assert f"{span.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"


def test_malformed_traceparent_starts_by_ratio(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(telemetry, "_ratio", 0.0)
    cell = telemetry.CellTelemetry("c", "Counter", "node")
    handle(cell, Envelope("add", headers={"traceparent": "garbage-zz"}))
    assert spans.get_finished_spans() == ()


def test_unsampled_root_traceparent_is_valid_w3c(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(telemetry, "_ratio", 0.0)
    cell = telemetry.CellTelemetry("a", "Counter", "node")
    first = handle(cell, Envelope("add"))["traceparent"]
    second = handle(cell, Envelope("add"))["traceparent"]

    version, trace_id, span_id, flags = first.split("-")
    assert version == "00"
    assert len(trace_id) == 32
    assert int(trace_id, 16) != 0
    assert len(span_id) == 16
    assert int(span_id, 16) != 0
    assert flags == "00"
    assert second.split("-")[1] != trace_id


def test_message_scope_restores_context_after_error(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(telemetry, "_ratio", 1.0)
    cell = telemetry.CellTelemetry("a", "Counter", "node")

    with pytest.raises(RuntimeError), cell.message(Envelope("add"), epoch=3):
        assert logs.current_agent_log_fields().incarnation == 3
        raise RuntimeError("handler failed")

    (span,) = spans.get_finished_spans()
    assert span.status.status_code == trace.StatusCode.ERROR
    assert span.attributes["arbor.handler"] == "add"
    assert logs.current_agent_log_fields() == logs.AgentLogFields()
    assert not trace.get_current_span().get_span_context().is_valid


def test_unsampled_mark_cleared_after_message(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(telemetry, "_ratio", 0.0)
    cell = telemetry.CellTelemetry("a", "Counter", "node")
    handle(cell, Envelope("add"))

    # The unsampled trace context ends with the message.
    assert not trace.get_current_span().get_span_context().is_valid
    assert telemetry.outgoing_headers() == {}
    # Outside any message, a step may start a trace of its own again.
    monkeypatch.setattr(telemetry, "_ratio", 1.0)
    with telemetry.span("arbor.spawn"):
        pass
    (span,) = spans.get_finished_spans()
    assert span.name == "arbor.spawn"


def test_log_fields_follow_new_incarnation() -> None:
    cell = telemetry.CellTelemetry("a", "Counter", "node")
    with cell.message(Envelope("add"), epoch=1):
        first = logs.current_agent_log_fields()
    with cell.message(Envelope("add"), epoch=2):
        second = logs.current_agent_log_fields()

    assert first == logs.AgentLogFields("a", "Counter", 1, "node")
    assert second == logs.AgentLogFields("a", "Counter", 2, "node")


def test_child_only_step_outside_span_records_nothing(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(telemetry, "_ratio", 1.0)
    with telemetry.span("arbor.checkpoint", child_only=True):
        pass
    cell = telemetry.CellTelemetry("a", "Counter", "node")
    with (
        cell.message(Envelope("add"), epoch=1),
        telemetry.span("arbor.checkpoint", {"arbor.agent": "a"}, child_only=True),
    ):
        pass

    checkpoint, message = spans.get_finished_spans()
    assert checkpoint.name == "arbor.checkpoint"
    assert checkpoint.parent.span_id == message.context.span_id


def fail_if_called(*args: object, **kwargs: object) -> None:
    raise AssertionError("a span object was made for an unsampled message")


def test_unsampled_message_makes_no_span_and_passes_flag_00(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(telemetry, "_ratio", 0.0)
    monkeypatch.setattr(SDKTracer, "start_span", fail_if_called)
    monkeypatch.setattr(SpanFactory, "start", fail_if_called)
    monkeypatch.setattr(tracing, "span_from_carrier", fail_if_called)
    monkeypatch.setattr(tracing, "continue_trace", fail_if_called)
    monkeypatch.setattr(tracing, "start_span", fail_if_called)
    first = telemetry.CellTelemetry("a", "Counter", "node")
    second = telemetry.CellTelemetry("b", "Counter", "node")

    with first.message(Envelope("add"), epoch=1):
        with telemetry.span("arbor.checkpoint", first.checkpoint_attributes, child_only=True):
            pass
        with telemetry.span("arbor.spawn"):
            pass
        sent = telemetry.outgoing_headers()
    # The next agent records nothing either, whatever its own ratio.
    monkeypatch.setattr(telemetry, "_ratio", 1.0)
    with second.message(Envelope("add", headers=sent), epoch=1):
        with telemetry.span("arbor.checkpoint", second.checkpoint_attributes, child_only=True):
            pass
        forwarded = telemetry.outgoing_headers()

    assert sent["traceparent"].endswith("-00")
    assert forwarded == sent
    assert spans.get_finished_spans() == ()


def test_sampled_chain_links_two_agents(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(telemetry, "_ratio", 1.0)
    first = telemetry.CellTelemetry("a", "Counter", "node")
    second = telemetry.CellTelemetry("b", "Counter", "node")

    with first.message(Envelope("relay"), epoch=1):
        sent = telemetry.outgoing_headers()
        with telemetry.span("arbor.checkpoint", first.checkpoint_attributes, child_only=True):
            pass
    # The envelope is all that crosses between the two agents' processes.
    with (
        second.message(Envelope("add", headers=dict(sent)), epoch=1),
        telemetry.span("arbor.checkpoint", second.checkpoint_attributes, child_only=True),
    ):
        pass

    by_agent = {
        (span.name, span.attributes["arbor.agent"]): span for span in spans.get_finished_spans()
    }
    first_message = by_agent["arbor.message", "a"]
    second_message = by_agent["arbor.message", "b"]
    assert first_message.parent is None
    assert second_message.parent.span_id == first_message.context.span_id
    assert second_message.parent.is_remote
    assert by_agent["arbor.checkpoint", "a"].parent == first_message.context
    assert by_agent["arbor.checkpoint", "b"].parent == second_message.context
    assert len({span.context.trace_id for span in by_agent.values()}) == 1
    assert second_message.attributes["arbor.handler"] == "add"


def test_library_span_follows_message_decision(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    cell = telemetry.CellTelemetry("a", "Counter", "node")
    library = tracing.get_tracer()

    monkeypatch.setattr(telemetry, "_ratio", 0.0)
    with (
        cell.message(Envelope("add"), epoch=1),
        library.start_as_current_span("library call in unsampled message"),
    ):
        pass
    monkeypatch.setattr(telemetry, "_ratio", 1.0)
    with (
        cell.message(Envelope("add"), epoch=1),
        library.start_as_current_span("library call in sampled message"),
    ):
        pass

    child, message = spans.get_finished_spans()
    assert child.name == "library call in sampled message"
    assert child.parent == message.context


def test_unsampled_message_logs_carry_trace_id(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(telemetry, "_ratio", 0.0)
    stream = io.StringIO()
    handler = logs.configure_logging(Settings(log_format="json", log_level="INFO"), stream=stream)
    cell = telemetry.CellTelemetry("a", "Counter", "node")
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    try:
        with cell.message(Envelope("add", headers={"traceparent": parent}), epoch=1):
            logging.getLogger("tests.unsampled").info("handled")
    finally:
        logging.getLogger().removeHandler(handler)

    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert line["span_id"] == "b7ad6b7169203331"
    assert line["agent_id"] == "a"


def test_untraced_process_passes_on_current_context(monkeypatch: pytest.MonkeyPatch) -> None:
    # A driver that set up OpenTelemetry itself, while Arbor's tracing is off in it.
    monkeypatch.setattr(telemetry, "_tracing", False)
    parent = trace.SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, False, trace.TraceFlags(1)
    )
    token = otel_context.attach(trace.set_span_in_context(trace.NonRecordingSpan(parent)))
    try:
        sent = telemetry.outgoing_headers()
    finally:
        otel_context.detach(token)

    assert sent == {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    assert telemetry.outgoing_headers() == {}


@pytest.mark.parametrize(
    "traceparent",
    [
        "garbage-00",
        "00-" + "x" * 32 + "-b7ad6b7169203331-00",
        "00-" + "0" * 32 + "-b7ad6b7169203331-00",
    ],
)
def test_malformed_traceparent_not_passed_on(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch, traceparent: str
) -> None:
    monkeypatch.setattr(telemetry, "_ratio", 0.0)
    cell = telemetry.CellTelemetry("a", "Counter", "node")

    sent = handle(cell, Envelope("add", headers={"traceparent": traceparent}))

    assert sent["traceparent"] != traceparent
    assert sent["traceparent"].endswith("-00")
    assert trace.get_current_span(tracing.extract_context(sent)).get_span_context().is_valid


def test_unsampled_message_passes_trace_state_on(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(telemetry, "_ratio", 1.0)
    cell = telemetry.CellTelemetry("a", "Counter", "node")
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"

    sent = handle(cell, Envelope("add", headers={"traceparent": parent, "tracestate": "v=1"}))

    assert sent == {"traceparent": parent, "tracestate": "v=1"}
    assert spans.get_finished_spans() == ()


def test_failed_reply_marks_message_span(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(telemetry, "_ratio", 1.0)
    cell = telemetry.CellTelemetry("a", "Counter", "node")
    failed = Reply(
        "m1",
        error=ErrorInfo(
            kind="handler", error_type="builtins.ValueError", message="bad", traceback="tb"
        ),
    )
    with cell.message(Envelope("add"), epoch=1):
        cell.mark_failed(failed)
    with cell.message(Envelope("get"), epoch=1):
        cell.mark_failed(Reply("m2", value=1))

    failed_span, ok_span = spans.get_finished_spans()[-2:]
    assert failed_span.status.status_code is StatusCode.ERROR
    assert failed_span.status.description == "builtins.ValueError: bad"
    (event,) = failed_span.events
    assert event.name == "exception"
    assert dict(event.attributes or {}) == {
        "exception.type": "builtins.ValueError",
        "exception.message": "bad",
        "exception.stacktrace": "tb",
    }
    assert ok_span.status.status_code is StatusCode.UNSET
    assert ok_span.events == ()


def test_raising_handler_exports_error_span(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(telemetry, "_ratio", 1.0)
    url = f"sqlite:///{tmp_path}/spans.db"
    store = open_store(url, Settings(database_url=url))
    store.create_agent(
        AgentRecord(name="flaky", type_path="tests:Flaky", status="starting", spawn_id="s1")
    )
    cell = AgentCell("flaky", Flaky, store, RuntimeContext("flaky"), init_kwargs={})
    try:
        reply = asyncio.run(cell.handle(Envelope("explode")))
    finally:
        store.close()

    assert reply.error is not None
    message_span = next(span for span in spans.get_finished_spans() if span.name == "arbor.message")
    assert message_span.status.status_code is StatusCode.ERROR
    assert "boom" in (message_span.status.description or "")
    assert [event.name for event in message_span.events] == ["exception"]


class Flaky(arbor.Agent):
    """Raises from its only handler."""

    def explode(self) -> None:
        raise RuntimeError("boom")
