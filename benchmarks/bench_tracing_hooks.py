"""Tracing hooks in one process: the time the runtime's telemetry adds to a request.

`bench_observability` measures whole asks on a cluster, where the spread between rounds is
larger than the cost of tracing. This script times only the hooks, without Ray: the
telemetry calls that `bench_observability`'s request makes in its two agents (a message
span, a send and a checkpoint span in the pinger; a message span and a checkpoint span in
the counter), through `CellTelemetry` and `telemetry.span` as the runtime calls them. The
batch span processor queues the finished spans and exports nothing during the timing;
the OTLP encoding of the same spans is timed apart.

Rows:

- off: tracing not configured;
- unsampled: tracing on, every request unsampled (ratio 0.0);
- sampled, SDK spans: ratio 1.0 with the SDK's `Tracer.start_span` for every span;
- sampled: ratio 1.0 with Arbor's `RecordedSpan`.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_tracing_hooks
"""

from __future__ import annotations

import argparse
import os
import timeit
from collections.abc import Callable

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from arbor.config import Settings
from arbor.messages import Envelope
from arbor.observability import otlp, tracing
from arbor.runtime import telemetry
from benchmarks import common


class _NoExport(SpanExporter):
    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=20000, help="requests per timing")
    parser.add_argument("--repeat", type=int, default=7, help="timings per row; the best counts")
    args = parser.parse_args()

    # The batch processor queues every span and exports none while the hooks are timed.
    os.environ["OTEL_BSP_MAX_QUEUE_SIZE"] = str(args.requests * args.repeat * 4 + 1)
    os.environ["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"] = os.environ["OTEL_BSP_MAX_QUEUE_SIZE"]
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = str(24 * 3600 * 1000)
    tracing._otlp_exporter = _NoExport  # type: ignore[assignment]

    common.print_header(f"Tracing hooks, {args.requests} requests, best of {args.repeat}")
    baseline = _best(_envelopes_only, args)
    rows = []
    for label, ratio, sdk_spans in (
        ("off", None, False),
        ("unsampled", 0.0, False),
        ("sampled, SDK spans", 1.0, True),
        ("sampled", 1.0, False),
    ):
        _configure(ratio, sdk_spans)
        seconds = _best(_request, args) - baseline
        rows.append([label, f"{seconds * 1e6:.2f}"])
    print(common.format_table(["setting", "hooks µs/request"], rows))

    _configure(1.0, sdk_spans=False)
    exporter = tracing.use_in_memory_exporter(1.0)
    for _ in range(128):
        _request()
    spans = exporter.get_finished_spans()
    per_span = min(timeit.repeat(lambda: otlp.encode_spans(spans), number=20, repeat=5))
    per_span = per_span / 20 / len(spans)
    print(f"\nOTLP encoding of {len(spans)} such spans: {per_span * 1e6:.2f} µs/span")
    tracing.shutdown_tracing()
    common.print_footer()


_PINGER = telemetry.CellTelemetry("bench/pinger", "Pinger", "node")
_COUNTER = telemetry.CellTelemetry("bench/target", "BenchCounter", "node")


def _request() -> None:
    ping = Envelope("ping", args=("bench/target", 1), message_id="m")
    with _PINGER.message(ping, 1):
        headers = telemetry.outgoing_headers()
        with telemetry.span("arbor.checkpoint", _PINGER.checkpoint_attributes, child_only=True):
            pass
    add = Envelope("add", args=(1,), headers=headers, message_id="m")
    with (
        _COUNTER.message(add, 1),
        telemetry.span("arbor.checkpoint", _COUNTER.checkpoint_attributes, child_only=True),
    ):
        pass


def _envelopes_only() -> None:
    Envelope("ping", args=("bench/target", 1), message_id="m")
    Envelope("add", args=(1,), headers={}, message_id="m")


def _configure(ratio: float | None, sdk_spans: bool) -> None:
    tracing.shutdown_tracing()
    telemetry._tracing = ratio is not None
    if ratio is None:
        return
    telemetry._ratio = ratio
    # The runtime's provider records whatever it is given; the runtime samples itself.
    tracing.configure_tracing(Settings(trace_sample_ratio=1.0))
    if sdk_spans:
        tracing._factory = None


def _best(function: Callable[[], None], args: argparse.Namespace) -> float:
    timings = timeit.repeat(function, number=args.requests, repeat=args.repeat)
    return min(timings) / args.requests


if __name__ == "__main__":
    main()
