"""Logs, traces and metric recording of arbor.observability, without Ray or a cluster."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace
from typing import Any

import pydantic
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from arbor.config import Settings, reset_settings
from arbor.errors import ConfigError
from arbor.observability import logs, metrics, tracing

# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = tracing.use_in_memory_exporter()
    yield exporter
    tracing.shutdown_tracing()


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers = list(root.handlers)
    level = root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def log_lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line]


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_lines(stream)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- logs ---------------------------------------------------------------------------------


def test_json_line_has_agent_and_trace_fields(
    spans: InMemorySpanExporter, restore_root_logger: None
) -> None:
    stream = io.StringIO()
    logs.configure_logging(Settings(log_format="json", log_level="INFO"), stream=stream)

    with (
        logs.agent_log_context(agent_id="c1", agent_type="Counter", incarnation=3, node_id="n1"),
        tracing.start_span("arbor.message") as span,
    ):
        logging.getLogger("arbor.test").warning("added %d", 5)

    (line,) = json_lines(stream)
    span_context = span.get_span_context()
    assert line["level"] == "WARNING"
    assert line["logger"] == "arbor.test"
    assert line["message"] == "added 5"
    assert line["agent_id"] == "c1"
    assert line["agent_type"] == "Counter"
    assert line["incarnation"] == 3
    assert line["node_id"] == "n1"
    assert line["trace_id"] == format(span_context.trace_id, "032x")
    assert line["span_id"] == format(span_context.span_id, "016x")
    assert line["timestamp"].endswith("Z")
    assert "exception" not in line


def test_json_line_outside_agent_has_null_fields(restore_root_logger: None) -> None:
    stream = io.StringIO()
    logs.configure_logging(Settings(log_format="json", log_level="INFO"), stream=stream)

    logging.getLogger("arbor.test").info("plain")

    (line,) = json_lines(stream)
    for key in ("agent_id", "agent_type", "incarnation", "node_id", "trace_id", "span_id"):
        assert line[key] is None, key
    assert line["message"] == "plain"


def test_json_line_carries_exception_text(restore_root_logger: None) -> None:
    stream = io.StringIO()
    logs.configure_logging(Settings(log_format="json", log_level="INFO"), stream=stream)

    try:
        raise KeyError("missing-key")
    except KeyError:
        logging.getLogger("arbor.test").exception("lookup failed")

    (line,) = json_lines(stream)
    assert line["message"] == "lookup failed"
    assert "Traceback" in line["exception"]
    assert "KeyError: 'missing-key'" in line["exception"]


def test_agent_context_resets_after_block() -> None:
    with logs.agent_log_context(agent_id="outer", incarnation=1):
        with logs.agent_log_context(agent_id="inner", incarnation=2):
            assert logs.current_agent_log_fields().agent_id == "inner"
        assert logs.current_agent_log_fields().agent_id == "outer"
    assert logs.current_agent_log_fields() == logs.AgentLogFields()


def test_text_format_is_plain_line(restore_root_logger: None) -> None:
    stream = io.StringIO()
    logs.configure_logging(Settings(log_format="text"), stream=stream)

    with logs.agent_log_context(agent_id="c1", agent_type="Counter", incarnation=2):
        logging.getLogger("arbor.test").warning("slow checkpoint %s", "c1")

    (line,) = log_lines(stream)
    assert not line.startswith("{")
    assert " WARNING arbor.test [agent_id=c1 agent_type=Counter incarnation=2]: " in line
    assert line.endswith("slow checkpoint c1")


def test_log_level_setting_filters_records(restore_root_logger: None) -> None:
    stream = io.StringIO()
    logs.configure_logging(Settings(log_format="json", log_level="warning"), stream=stream)

    logging.getLogger("arbor.test").info("hidden")
    logging.getLogger("arbor.test").error("shown")

    assert [line["message"] for line in json_lines(stream)] == ["shown"]


def test_second_configure_replaces_handler(restore_root_logger: None) -> None:
    first = io.StringIO()
    second = io.StringIO()
    logs.configure_logging(Settings(), stream=first)
    logs.configure_logging(Settings(), stream=second)

    logging.getLogger("arbor.test").warning("once")

    assert first.getvalue() == ""
    assert len(log_lines(second)) == 1


def test_settings_reject_unknown_log_format_and_level() -> None:
    with pytest.raises(pydantic.ValidationError, match="log_format"):
        Settings(log_format="xml")
    with pytest.raises(pydantic.ValidationError, match="log_level"):
        Settings(log_level="LOUD")


def test_repeated_errors_collapse_to_one_line() -> None:
    clock = FakeClock()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.RepeatedLogFilter(interval_s=60, clock=clock))
    test_logger = logging.getLogger("arbor.test.repeats")
    test_logger.addHandler(handler)
    test_logger.propagate = False
    try:
        for attempt in range(5):
            test_logger.error("store write failed for %s", f"agent-{attempt}")
            clock.now += 1
        test_logger.error("another failure")
        clock.now += 60
        test_logger.error("store write failed for %s", "agent-9")
    finally:
        test_logger.removeHandler(handler)
        test_logger.propagate = True

    lines = json_lines(stream)
    assert [line["message"] for line in lines] == [
        "store write failed for agent-0",
        "another failure",
        "store write failed for agent-9",
    ]
    assert "repeated" not in lines[0]
    assert "repeated" not in lines[1]
    assert lines[2]["repeated"] == 4


def test_repeat_filter_passes_info_records() -> None:
    repeat_filter = logs.RepeatedLogFilter(interval_s=60, clock=FakeClock())
    record = logging.LogRecord("arbor.test", logging.INFO, __file__, 1, "tick", None, None)

    passed = [repeat_filter.filter(record) for _ in range(3)]

    assert passed == [True, True, True]


def test_repeat_count_written_in_text_format() -> None:
    clock = FakeClock()
    repeat_filter = logs.RepeatedLogFilter(interval_s=10, clock=clock)
    formatter = logs.TextFormatter()

    def record() -> logging.LogRecord:
        return logging.LogRecord("arbor.test", logging.ERROR, __file__, 1, "boom", None, None)

    assert repeat_filter.filter(record())
    assert not repeat_filter.filter(record())
    assert not repeat_filter.filter(record())
    clock.now += 10
    last = record()
    assert repeat_filter.filter(last)

    assert formatter.format(last).endswith("boom (repeated 2 more times)")


def test_repeat_filter_rejects_zero_interval() -> None:
    with pytest.raises(ValueError, match="interval_s=0"):
        logs.RepeatedLogFilter(interval_s=0)


# --- traces -------------------------------------------------------------------------------


def test_trace_continues_across_three_hops(spans: InMemorySpanExporter) -> None:
    with tracing.start_span("gateway.request") as root:
        carrier_to_first = tracing.inject_context()

    # Each hop extracts only from its carrier, as a receiving process does.
    with tracing.span_from_carrier("arbor.message", carrier_to_first, {"arbor.handler": "a"}):
        carrier_to_second = tracing.inject_context()
    with tracing.span_from_carrier("arbor.message", carrier_to_second, {"arbor.handler": "b"}):
        carrier_to_third = tracing.inject_context()
    with tracing.span_from_carrier("arbor.message", carrier_to_third, {"arbor.handler": "c"}):
        pass

    finished = {
        span.attributes.get("arbor.handler", "root"): span for span in spans.get_finished_spans()
    }
    assert set(finished) == {"root", "a", "b", "c"}
    trace_id = root.get_span_context().trace_id
    assert {span.context.trace_id for span in finished.values()} == {trace_id}
    assert finished["root"].parent is None
    assert finished["a"].parent.span_id == finished["root"].context.span_id
    assert finished["b"].parent.span_id == finished["a"].context.span_id
    assert finished["c"].parent.span_id == finished["b"].context.span_id
    assert finished["a"].parent.is_remote
    assert finished["a"].kind == trace.SpanKind.SERVER


def test_carrier_holds_w3c_traceparent(spans: InMemorySpanExporter) -> None:
    with tracing.start_span("arbor.spawn") as span:
        carrier = tracing.inject_context()

    span_context = span.get_span_context()
    version, trace_id, parent_id, flags = carrier["traceparent"].split("-")
    assert version == "00"
    assert trace_id == f"{span_context.trace_id:032x}"
    assert parent_id == f"{span_context.span_id:016x}"
    # Bit 0x01 is "sampled". SDK 1.45 also sets 0x02, the W3C level 2 "random" flag.
    assert int(flags, 16) & 0x01 == 0x01


def test_inject_without_span_returns_empty_carrier(spans: InMemorySpanExporter) -> None:
    assert tracing.inject_context() == {}


@pytest.mark.parametrize(
    "carrier",
    [None, {}, {"traceparent": "not-a-traceparent"}, {"traceparent": 42}, ["traceparent"]],
)
def test_unusable_carrier_starts_new_trace(spans: InMemorySpanExporter, carrier: Any) -> None:
    with tracing.span_from_carrier("arbor.message", carrier):
        pass

    (span,) = spans.get_finished_spans()
    assert span.parent is None
    assert span.context.is_valid


def test_oversized_carrier_value_is_ignored(spans: InMemorySpanExporter) -> None:
    with tracing.start_span("parent"):
        carrier = tracing.inject_context()
    carrier["tracestate"] = "a=" + "x" * (tracing.MAX_CARRIER_VALUE_LENGTH + 1)
    spans.clear()

    with tracing.span_from_carrier("arbor.message", carrier):
        pass

    (span,) = spans.get_finished_spans()
    assert span.parent is not None
    assert len(span.context.trace_state) == 0


def test_exception_in_span_is_recorded_and_raised(spans: InMemorySpanExporter) -> None:
    with (
        pytest.raises(RuntimeError, match="handler failed"),
        tracing.span_from_carrier("arbor.message", {}),
    ):
        raise RuntimeError("handler failed")

    (span,) = spans.get_finished_spans()
    assert span.status.status_code == trace.StatusCode.ERROR
    assert span.events[0].name == "exception"


def test_interrupt_in_span_ends_it_without_error(spans: InMemorySpanExporter) -> None:
    with pytest.raises(KeyboardInterrupt), tracing.start_span("arbor.message"):
        raise KeyboardInterrupt

    (span,) = spans.get_finished_spans()
    assert span.end_time is not None
    assert span.status.status_code == trace.StatusCode.UNSET
    assert span.events == ()


def test_span_context_restored_after_block(spans: InMemorySpanExporter) -> None:
    with tracing.start_span("outer") as outer:
        with tracing.start_span("inner") as inner:
            assert trace.get_current_span() is inner
        assert trace.get_current_span() is outer

    assert not trace.get_current_span().get_span_context().is_valid
    inner_span, outer_span = spans.get_finished_spans()
    assert inner_span.parent.span_id == outer_span.context.span_id


def test_tracer_follows_reconfigured_provider() -> None:
    first = tracing.use_in_memory_exporter()
    first_tracer = tracing.get_tracer()
    second = tracing.use_in_memory_exporter()
    try:
        assert tracing.get_tracer() is tracing.get_tracer()
        assert tracing.get_tracer() is not first_tracer
        with tracing.start_span("after"):
            pass
        assert first.get_finished_spans() == ()
        assert [span.name for span in second.get_finished_spans()] == ["after"]
    finally:
        tracing.shutdown_tracing()


def test_ratio_zero_drops_roots_but_follows_sampled_parent() -> None:
    exporter = tracing.use_in_memory_exporter(sample_ratio=0.0)
    try:
        with tracing.start_span("unsampled root"):
            pass
        sampled_parent = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
        with tracing.span_from_carrier("arbor.message", sampled_parent):
            pass

        (span,) = exporter.get_finished_spans()
        assert span.name == "arbor.message"
        assert span.context.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736
        assert span.parent.span_id == 0x00F067AA0BA902B7
    finally:
        tracing.shutdown_tracing()


def test_unsampled_context_still_propagates() -> None:
    exporter = tracing.use_in_memory_exporter(sample_ratio=0.0)
    try:
        with tracing.start_span("unsampled root") as root:
            carrier = tracing.inject_context()

        _, trace_id, _, flags = carrier["traceparent"].split("-")
        assert exporter.get_finished_spans() == ()
        assert int(flags, 16) & 0x01 == 0
        assert trace_id == f"{root.get_span_context().trace_id:032x}"
    finally:
        tracing.shutdown_tracing()


def test_otel_traces_sampler_applies_when_ratio_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    monkeypatch.delenv("ARBOR_TRACE_SAMPLE_RATIO", raising=False)
    exporter = InMemorySpanExporter()
    try:
        provider = tracing.configure_tracing(Settings(), exporter=exporter)
        with tracing.start_span("dropped"):
            pass

        assert provider.sampler.get_description() == "AlwaysOffSampler"
        assert exporter.get_finished_spans() == ()
    finally:
        tracing.shutdown_tracing()


def test_arbor_ratio_wins_over_otel_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    monkeypatch.setenv("ARBOR_TRACE_SAMPLE_RATIO", "1.0")
    try:
        provider = tracing.configure_tracing(Settings())
        description = provider.sampler.get_description()
        assert description.startswith("ParentBased{root:TraceIdRatioBased{1.0}")
    finally:
        tracing.shutdown_tracing()


def test_sample_ratio_outside_range_rejected() -> None:
    with pytest.raises(pydantic.ValidationError, match="trace_sample_ratio"):
        Settings(trace_sample_ratio=1.5)


class _CollectorHandler(BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


def test_otlp_endpoint_receives_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    server = HTTPServer(("127.0.0.1", 0), _CollectorHandler)
    _CollectorHandler.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "arbor-test")
    try:
        provider = tracing.configure_tracing(Settings(trace_sample_ratio=1.0))
        with tracing.start_span("exported-span"):
            pass
        assert provider.force_flush(timeout_millis=10_000)
    finally:
        tracing.shutdown_tracing()
        server.shutdown()
        server.server_close()

    assert len(_CollectorHandler.received) >= 1
    path, content_type, body = _CollectorHandler.received[0]
    assert path == "/v1/traces"
    assert content_type == "application/x-protobuf"
    assert b"exported-span" in body
    assert b"arbor-test" in body


def test_otlp_endpoint_without_exporter_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fail_otlp_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("opentelemetry.exporter.otlp"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(builtins, "__import__", fail_otlp_import)
    with pytest.raises(ConfigError, match=r"arbor\[otlp\]"):
        tracing.configure_tracing(Settings())


def test_default_service_name_is_arbor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    try:
        provider = tracing.configure_tracing(Settings())
        assert provider.resource.attributes["service.name"] == "arbor"
    finally:
        tracing.shutdown_tracing()


# --- metrics ------------------------------------------------------------------------------


class FakeMetric:
    """Stands in for a ray.util.metrics class and keeps what was recorded."""

    created: list[FakeMetric] = []

    def __init__(
        self,
        name: str,
        description: str = "",
        boundaries: list[float] | None = None,
        tag_keys: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.boundaries = boundaries
        self.tag_keys = tag_keys
        self.records: list[tuple[float, dict[str, str]]] = []
        FakeMetric.created.append(self)

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self._record(value, tags)

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._record(value, tags)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._record(value, tags)

    def _record(self, value: float, tags: dict[str, str] | None) -> None:
        assert tags is not None and set(tags) == set(self.tag_keys), (self.name, tags)
        self.records.append((value, tags))


@pytest.fixture
def fake_ray_metrics(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, FakeMetric]]:
    """Replace Ray's metric classes with fakes and pretend Ray is initialised."""
    FakeMetric.created = []
    fake_module = SimpleNamespace(Counter=FakeMetric, Gauge=FakeMetric, Histogram=FakeMetric)
    monkeypatch.setattr(metrics, "ray_metrics", fake_module)
    monkeypatch.setattr(metrics, "_registry", None)
    monkeypatch.setattr(metrics.ray, "is_initialized", lambda: True)
    monkeypatch.delenv("ARBOR_METRICS", raising=False)
    reset_settings()

    class ByName(dict[str, FakeMetric]):
        def __missing__(self, name: str) -> FakeMetric:
            for metric in FakeMetric.created:
                if metric.name == name:
                    return metric
            raise KeyError(name)

    yield ByName()
    reset_settings()


def call_every_recording_function() -> None:
    metrics.record_spawn("Counter", "node-1")
    metrics.record_spawn_failure("Counter", "timeout")
    metrics.record_stop("Counter", "node-1", "requested")
    metrics.record_restart("Counter", "node-1", "crash")
    metrics.set_active_agents("Counter", "node-1", 3)
    metrics.record_message("Counter", "add", "ok", 0.002)
    metrics.set_mailbox_depth("Counter", "node-1", 4)
    metrics.record_checkpoint("Counter", 120, 0.004)
    metrics.record_recovery("Counter", "process", 0.3)
    metrics.record_reminder_fired("Counter", "ok", 0.004)
    metrics.record_topic_published()
    metrics.record_topic_delivery("Counter", "ok")
    metrics.record_topic_skipped("Counter", 3)
    metrics.record_reconciler_action("recreate")
    metrics.set_nodes(alive=2, dead=1)
    metrics.record_node_lost()
    metrics.record_capability_grant("agent", "send", delegated=True)
    metrics.record_capability_revocation("cascade", count=2)
    metrics.record_capability_denied("agent", "send", "missing")
    metrics.record_audit_row("capability.grant", "allow")
    metrics.record_gateway_request("/agents/{name}", "GET", 200, 0.01)


def test_metrics_noop_without_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeMetric.created = []
    fake_module = SimpleNamespace(Counter=FakeMetric, Gauge=FakeMetric, Histogram=FakeMetric)
    monkeypatch.setattr(metrics, "ray_metrics", fake_module)
    monkeypatch.setattr(metrics, "_registry", None)
    monkeypatch.setattr(metrics.ray, "is_initialized", lambda: False)

    assert not metrics.enabled()
    call_every_recording_function()

    assert FakeMetric.created == []
    assert metrics._registry is None


def test_metrics_noop_when_disabled(
    fake_ray_metrics: dict[str, FakeMetric], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARBOR_METRICS", "false")
    reset_settings()

    assert not metrics.enabled()
    call_every_recording_function()

    assert FakeMetric.created == []


def test_metrics_noop_skips_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics.ray, "is_initialized", lambda: False)

    metrics.record_message("Counter", "add", "no-such-status", -1.0)


def test_every_family_created_once(fake_ray_metrics: dict[str, FakeMetric]) -> None:
    call_every_recording_function()
    call_every_recording_function()

    names = [metric.name for metric in FakeMetric.created]
    assert sorted(names) == sorted(spec.name for spec in metrics.METRICS)
    histogram = fake_ray_metrics["arbor_agent_message_duration_seconds"]
    assert histogram.boundaries == list(metrics.LATENCY_BUCKETS_S)


def test_recorded_values_and_labels(fake_ray_metrics: dict[str, FakeMetric]) -> None:
    call_every_recording_function()

    assert fake_ray_metrics["arbor_agents_spawned_total"].records == [
        (1, {"agent_type": "Counter", "node": "node-1"})
    ]
    assert fake_ray_metrics["arbor_agent_message_duration_seconds"].records == [
        (0.002, {"agent_type": "Counter", "handler": "add", "status": "ok"})
    ]
    assert fake_ray_metrics["arbor_checkpoint_bytes_total"].records == [
        (120, {"agent_type": "Counter"})
    ]
    assert fake_ray_metrics["arbor_checkpoint_writes_total"].records == [
        (1, {"agent_type": "Counter", "status": "ok"})
    ]
    assert fake_ray_metrics["arbor_nodes"].records == [
        (2, {"state": "alive"}),
        (1, {"state": "dead"}),
    ]
    assert fake_ray_metrics["arbor_capability_grants_total"].records == [
        (1, {"kind": "agent", "operation": "send", "delegated": "true"})
    ]
    assert fake_ray_metrics["arbor_capability_revocations_total"].records == [
        (2, {"reason": "cascade"})
    ]
    assert fake_ray_metrics["arbor_gateway_requests_total"].records == [
        (1, {"route": "/agents/{name}", "method": "GET", "status": "200"})
    ]


def test_failed_checkpoint_counts_no_bytes(fake_ray_metrics: dict[str, FakeMetric]) -> None:
    metrics.record_checkpoint("Counter", 500, 0.1, status="error")

    assert fake_ray_metrics["arbor_checkpoint_writes_total"].records == [
        (1, {"agent_type": "Counter", "status": "error"})
    ]
    assert fake_ray_metrics["arbor_checkpoint_bytes_total"].records == []


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: metrics.record_message("C", "add", "failed", 0.1), "status='failed'"),
        (lambda: metrics.record_message("C", "add", "ok", -0.1), "seconds=-0.1"),
        (lambda: metrics.record_checkpoint("C", -1, 0.1), "nbytes=-1"),
        (lambda: metrics.record_recovery("C", "teleport", 1.0), "path='teleport'"),
        (lambda: metrics.record_stop("C", "n", "bored"), "reason='bored'"),
        (lambda: metrics.record_gateway_request("/x", "get", 200, 0.1), "method='get'"),
        (lambda: metrics.record_gateway_request("/x", "GET", 99, 0.1), "status_code 99"),
        (lambda: metrics.record_audit_row("grant", "maybe"), "decision='maybe'"),
        (lambda: metrics.set_nodes(alive=-1, dead=0), "alive=-1"),
    ],
)
def test_invalid_metric_input_rejected(
    fake_ray_metrics: dict[str, FakeMetric], call: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_open_label_capped_to_other(
    fake_ray_metrics: dict[str, FakeMetric], caplog: pytest.LogCaptureFixture
) -> None:
    for index in range(metrics.MAX_LABEL_VALUES + 5):
        metrics.record_message("Counter", f"handler_{index}", "ok", 0.001)

    records = fake_ray_metrics["arbor_agent_message_duration_seconds"].records
    handlers = [tags["handler"] for _, tags in records]
    assert len(set(handlers)) == metrics.MAX_LABEL_VALUES + 1
    assert handlers[-5:] == ["other"] * 5
    assert handlers[metrics.MAX_LABEL_VALUES - 1] == f"handler_{metrics.MAX_LABEL_VALUES - 1}"
    warnings = [record for record in caplog.records if "bounded set" in record.getMessage()]
    assert len(warnings) == 1


def test_exported_names_follow_ray_rules() -> None:
    assert metrics.exported_name("arbor_agents_spawned_total") == "ray_arbor_agents_spawned_total"
    assert metrics.exported_name("arbor_agents_active") == "ray_arbor_agents_active"
    series = metrics.exported_series_names()
    assert "ray_arbor_agent_message_duration_seconds_bucket" in series
    assert "ray_arbor_agent_message_duration_seconds" not in series
    with pytest.raises(KeyError):
        metrics.exported_name("arbor_unknown_total")


def test_metric_names_follow_prometheus_conventions() -> None:
    for spec in metrics.METRICS:
        assert spec.name.startswith("arbor_"), spec.name
        if spec.kind == "counter":
            assert spec.name.endswith("_total"), spec.name
        if spec.kind == "histogram":
            assert spec.name.endswith("_seconds"), spec.name
            assert list(spec.boundaries) == sorted(spec.boundaries), spec.name
        forbidden = {"agent", "agent_name", "name", "message_id", "agent_id"}
        assert not forbidden & set(spec.labels), spec.name


def test_message_times_reach_ray_at_flush(fake_ray_metrics: dict[str, FakeMetric]) -> None:
    times = metrics.MessageTimes(interval_s=3600)
    times.add("Counter", "add", "ok", 0.002)
    times.add("Counter", "add", "error", 0.004)
    assert "arbor_agent_message_duration_seconds" not in [m.name for m in FakeMetric.created]

    assert times.flush() == 2
    assert fake_ray_metrics["arbor_agent_message_duration_seconds"].records == [
        (0.002, {"agent_type": "Counter", "handler": "add", "status": "ok"}),
        (0.004, {"agent_type": "Counter", "handler": "add", "status": "error"}),
    ]
    assert times.flush() == 0


def test_message_times_flush_in_the_background(fake_ray_metrics: dict[str, FakeMetric]) -> None:
    times = metrics.MessageTimes(interval_s=0.05)
    times.add("Counter", "add", "ok", 0.001)
    deadline = time.monotonic() + 10
    while (
        not FakeMetric.created
        or not fake_ray_metrics["arbor_agent_message_duration_seconds"].records
    ):
        assert time.monotonic() < deadline, "the flush thread observed nothing in 10 s"
        time.sleep(0.02)


def test_message_times_keep_nothing_when_metrics_are_off(
    fake_ray_metrics: dict[str, FakeMetric], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARBOR_METRICS", "false")
    reset_settings()
    times = metrics.MessageTimes(interval_s=3600)
    times.add("Counter", "add", "ok", 0.002)
    assert times.flush() == 0


def test_message_times_skip_bad_value(
    fake_ray_metrics: dict[str, FakeMetric], caplog: pytest.LogCaptureFixture
) -> None:
    times = metrics.MessageTimes(interval_s=3600)
    times.add("Counter", "add", "no-such-status", 0.002)
    times.add("Counter", "add", "ok", 0.003)
    with caplog.at_level(logging.WARNING):
        assert times.flush() == 2
    assert "no-such-status" in caplog.text
    assert fake_ray_metrics["arbor_agent_message_duration_seconds"].records == [
        (0.003, {"agent_type": "Counter", "handler": "add", "status": "ok"})
    ]
