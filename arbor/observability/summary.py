"""Key numbers from the Prometheus text that Ray's per-node metrics agents export.

`arbor metrics` uses this for people without Grafana: it reads every node's export twice,
a few seconds apart, and derives message rates and handling-time percentiles from the
histogram buckets, as PromQL's ``histogram_quantile`` does.
"""

from __future__ import annotations

import math
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

MESSAGE_HISTOGRAM = "ray_arbor_agent_message_duration_seconds"
RECOVERY_HISTOGRAM = "ray_arbor_recovery_duration_seconds"
RESTARTS = "ray_arbor_agents_restarted_total"
DENIALS = "ray_arbor_capability_denied_total"

# Seconds to wait for one node's metrics export.
SCRAPE_TIMEOUT_S = 5.0


@dataclass
class Snapshot:
    """Summed series of one reading of every node's export.

    Attributes:
        buckets: per histogram, cumulative counts by upper bound (``le``).
        counts: per histogram, the number of observations.
        totals: per counter, its value summed over every label set.
        by_status: message counts by their ``status`` label.
        errors: the exports that could not be read, with the reason.
    """

    buckets: dict[str, dict[float, float]] = field(default_factory=lambda: defaultdict(dict))
    counts: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    totals: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    by_status: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    errors: list[str] = field(default_factory=list)


def read_exports(urls: list[str]) -> Snapshot:
    """Read and sum the Arbor series of every export URL; unreadable ones are listed."""
    snapshot = Snapshot()
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
                text = response.read().decode("utf-8", errors="replace")
        except OSError as error:
            snapshot.errors.append(f"{url}: {error}")
            continue
        add_text(snapshot, text)
    return snapshot


def add_text(snapshot: Snapshot, text: str) -> None:
    """Add the Arbor series of one Prometheus text export to ``snapshot``."""
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("ray_arbor_"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                base = sample.name[: -len("_bucket")]
                bound = float(sample.labels["le"])
                snapshot.buckets[base][bound] = (
                    snapshot.buckets[base].get(bound, 0.0) + sample.value
                )
            elif sample.name.endswith("_count"):
                base = sample.name[: -len("_count")]
                snapshot.counts[base] += sample.value
                if base == MESSAGE_HISTOGRAM:
                    snapshot.by_status[sample.labels.get("status", "")] += sample.value
            elif sample.name.endswith("_total"):
                snapshot.totals[sample.name] += sample.value


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """Estimate quantile ``q`` from cumulative buckets, interpolating inside a bucket.

    Returns None when there are no observations. A quantile in the last, unbounded bucket
    is reported as the highest finite bound, as ``histogram_quantile`` does.
    """
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def difference(later: Snapshot, earlier: Snapshot) -> Snapshot:
    """Return what happened between two readings: bucket and count increases."""
    delta = Snapshot()
    for name, buckets in later.buckets.items():
        before = earlier.buckets.get(name, {})
        delta.buckets[name] = {
            bound: value - before.get(bound, 0.0) for bound, value in buckets.items()
        }
    for name, value in later.counts.items():
        delta.counts[name] = value - earlier.counts.get(name, 0.0)
    for name, value in later.totals.items():
        delta.totals[name] = value - earlier.totals.get(name, 0.0)
    for status, value in later.by_status.items():
        delta.by_status[status] = value - earlier.by_status.get(status, 0.0)
    delta.errors = later.errors
    return delta
