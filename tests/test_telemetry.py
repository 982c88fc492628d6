"""Head sampling in the runtime: unrecorded messages cost no span and pass the decision on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from arbor.messages import Envelope
from arbor.observability import logs, tracing
from arbor.runtime import telemetry


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

    assert telemetry._unsampled.get() is None
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
