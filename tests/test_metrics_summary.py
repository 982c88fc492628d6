"""Percentiles and rates from Prometheus text, as `arbor metrics` computes them."""

from __future__ import annotations

import pytest

from arbor.observability import summary

EXPORT = """\
# HELP ray_arbor_agent_message_duration_seconds Handling time.
# TYPE ray_arbor_agent_message_duration_seconds histogram
ray_arbor_agent_message_duration_seconds_bucket{status="ok",le="0.001",WorkerId="a"} 10.0
ray_arbor_agent_message_duration_seconds_bucket{status="ok",le="0.01",WorkerId="a"} 90.0
ray_arbor_agent_message_duration_seconds_bucket{status="ok",le="+Inf",WorkerId="a"} 100.0
ray_arbor_agent_message_duration_seconds_count{status="ok",WorkerId="a"} 100.0
ray_arbor_agent_message_duration_seconds_sum{status="ok",WorkerId="a"} 0.5
ray_arbor_agent_message_duration_seconds_bucket{status="error",le="0.001",WorkerId="b"} 0.0
ray_arbor_agent_message_duration_seconds_bucket{status="error",le="0.01",WorkerId="b"} 10.0
ray_arbor_agent_message_duration_seconds_bucket{status="error",le="+Inf",WorkerId="b"} 10.0
ray_arbor_agent_message_duration_seconds_count{status="error",WorkerId="b"} 10.0
ray_arbor_agent_message_duration_seconds_sum{status="error",WorkerId="b"} 0.05
# HELP ray_arbor_capability_denied_total Denials.
# TYPE ray_arbor_capability_denied_total counter
ray_arbor_capability_denied_total{reason="missing",WorkerId="a"} 2.0
ray_arbor_capability_denied_total{reason="revoked",WorkerId="b"} 1.0
# HELP ray_other_total Not Arbor's.
# TYPE ray_other_total counter
ray_other_total 7.0
"""


def snapshot(text: str = EXPORT) -> summary.Snapshot:
    result = summary.Snapshot()
    summary.add_text(result, text)
    return result


def test_series_are_summed_across_workers_and_labels() -> None:
    read = snapshot()
    buckets = read.buckets[summary.MESSAGE_HISTOGRAM]
    assert buckets == {0.001: 10.0, 0.01: 100.0, float("inf"): 110.0}
    assert read.counts[summary.MESSAGE_HISTOGRAM] == 110.0
    assert read.by_status == {"ok": 100.0, "error": 10.0}
    assert read.totals[summary.DENIALS] == 3.0
    assert "ray_other_total" not in read.totals


@pytest.mark.parametrize(
    ("q", "expected"),
    [(0.05, 0.001 * 5.5 / 10), (0.5, 0.001 + 0.009 * (55 - 10) / 90), (0.99, 0.01)],
)
def test_quantile_interpolates_inside_the_bucket(q: float, expected: float) -> None:
    buckets = snapshot().buckets[summary.MESSAGE_HISTOGRAM]
    assert summary.quantile(buckets, q) == pytest.approx(expected)


def test_quantile_of_nothing_is_none() -> None:
    assert summary.quantile({}, 0.5) is None
    assert summary.quantile({0.1: 0.0, float("inf"): 0.0}, 0.5) is None


def test_difference_keeps_only_what_happened_between_readings() -> None:
    earlier = snapshot()
    later = snapshot(
        EXPORT.replace("} 100.0", "} 150.0").replace(
            'le="0.01",WorkerId="a"} 90.0', 'le="0.01",WorkerId="a"} 140.0'
        )
    )
    delta = summary.difference(later, earlier)
    assert delta.counts[summary.MESSAGE_HISTOGRAM] == 50.0
    assert delta.buckets[summary.MESSAGE_HISTOGRAM][0.01] == 50.0
    assert delta.by_status["ok"] == 50.0


def test_unreadable_export_is_listed_not_raised() -> None:
    read = summary.read_exports(["http://127.0.0.1:1/metrics"])
    assert len(read.errors) == 1
    assert "127.0.0.1:1" in read.errors[0]
