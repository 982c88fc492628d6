"""Cost of one `CapabilityVerifier.check`, in microseconds per call (p50 and p99).

Each case times single calls in this process, with no Ray and no network:

- each engine (``python``, ``biscuit``, ``both``) on a verified token already in the
  verifier's cache, for an issued token and for one delegated twice (three blocks);
- a token with ``max_uses``, which takes the verifier's lock and updates a counter;
- a denied check (resource outside the pattern);
- an uncached check (a verifier with ``cache_size=0``), which pays for signature
  verification and block validation on every call, as for a token seen the first time.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_capability --checks 5000
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from arbor.security import CapabilityAuthority, CapabilityVerifier, delegate, generate_keypair

URI = "arbor://agent/send/workers/eu/7"


def measure(call: Callable[[], object], count: int) -> tuple[float, float]:
    """Time ``count`` calls after a warm-up; return p50 and p99 in microseconds."""
    for _ in range(min(count, 200)):
        call()
    samples = []
    for _ in range(count):
        start = time.perf_counter_ns()
        call()
        samples.append((time.perf_counter_ns() - start) / 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checks", type=int, default=5000, help="timed calls per case (default: 5000)"
    )
    arguments = parser.parse_args()
    count = arguments.checks

    keys = generate_keypair()
    authority = CapabilityAuthority(keys.private_key)
    expires_at = datetime.now(timezone.utc) + timedelta(days=1)
    issued = authority.issue(
        "coordinator", "arbor://agent/*/workers/**", ["send", "ask"], expires_at=expires_at, depth=2
    )
    chain = delegate(delegate(issued, "pool", "arbor://agent/send/workers/eu/**"), "worker-1")
    limited = authority.issue(
        "coordinator", "arbor://agent/send/workers/**", expires_at=expires_at, max_uses=10**9
    )

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, ", end="")
    print(f"Python {platform.python_version()}, {count} calls per case")
    print(f"{'case':<46} {'p50 µs':>8} {'p99 µs':>8}")

    rows: list[tuple[str, Callable[[], object]]] = []
    for engine in ("python", "biscuit", "both"):
        verifier = CapabilityVerifier(keys.public_key, engine=engine)
        rows.append(
            (
                f"{engine}: issued token, allowed",
                lambda v=verifier: v.check(issued, "coordinator", URI),
            )
        )
        rows.append(
            (
                f"{engine}: 3-block delegated token, allowed",
                lambda v=verifier: v.check(chain, "worker-1", URI),
            )
        )
    verifier = CapabilityVerifier(keys.public_key)
    rows.append(
        ("python: max_uses token, allowed", lambda: verifier.check(limited, "coordinator", URI))
    )
    rows.append(
        (
            "python: resource outside pattern, denied",
            lambda: verifier.check(issued, "coordinator", "arbor://agent/stop/workers/7"),
        )
    )
    uncached = CapabilityVerifier(keys.public_key, cache_size=0)
    for label, text, principal in (
        ("issued", issued.to_string(), issued.principal),
        ("3-block", chain.to_string(), chain.principal),
    ):
        rows.append(
            (
                f"python: {label} token, not cached",
                lambda t=text, p=principal: uncached.check(t, p, URI),
            )
        )

    for label, call in rows:
        decision = call()
        assert bool(decision) == ("denied" not in label), (label, decision)
        p50, p99 = measure(call, count)
        print(f"{label:<46} {p50:>8.1f} {p99:>8.1f}")


if __name__ == "__main__":
    main()
