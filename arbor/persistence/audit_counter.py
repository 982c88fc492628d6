"""Counted allows: allowed checks summed per key and written as ``allow_count`` audit rows."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from arbor.errors import InvalidAuditEntry
from arbor.persistence.audit import ALLOW_COUNT, ALLOWED, AuditEntry, check_text, format_time

if TYPE_CHECKING:
    from arbor.persistence.base import CheckpointStore

logger = logging.getLogger(__name__)

# Seconds between background flushes: an operator sees the counts within this delay, and
# one key writes at most one row per interval.
DEFAULT_FLUSH_INTERVAL_S = 10.0


@dataclass
class _Tally:
    count: int
    first_at: float
    last_at: float


class AuditCounter:
    """Counts allowed checks and writes them as one ``allow_count`` row per key.

    A row for every allowed check on a message hot path would cost a database transaction
    per message. So allowed checks are counted per (principal, action, resource pattern),
    and `flush` appends the counts, on demand or every ``interval_s`` seconds after `start`.
    Denials are rare and are appended one by one with `append_audit`.

    Each row has ``action="allow_count"``, ``resource`` set to the resource pattern, and
    ``detail`` holding the checked action, the count and the first and last check times.
    Pass the capability's pattern, not each concrete URI, so that the number of keys stays
    small.

    NOTE: counts recorded since the last flush live in this process only and are lost if
    the process is killed; `close` flushes them on an orderly shutdown.

    Example:
        >>> counter = AuditCounter(store, interval_s=10).start()
        >>> counter.record("agent:planner", "send", "arbor://agent/send/workers/*")
        >>> counter.close()
    """

    def __init__(
        self, store: CheckpointStore, interval_s: float = DEFAULT_FLUSH_INTERVAL_S
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s {interval_s!r} is invalid; pass a number of seconds > 0")
        self.store = store
        self.interval_s = interval_s
        self._tallies: dict[tuple[str, str, str], _Tally] = {}
        self._lock = threading.Lock()
        # Serialises flushes, so a background and an explicit flush never interleave.
        self._flush_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, principal: str, action: str, resource: str, count: int = 1) -> None:
        """Count ``count`` allowed checks of ``action`` by ``principal`` on ``resource``.

        Raises:
            InvalidAuditEntry: a name is empty, too long or contains a NUL character, or
                ``count`` is not a whole number of 1 or more.
        """
        if type(count) is not int or count < 1:
            raise InvalidAuditEntry(f"count {count!r} is invalid; pass a whole number of 1 or more")
        key = (principal, action, resource)
        now = time.time()
        with self._lock:
            tally = self._tallies.get(key)
            if tally is not None:
                tally.count += count
                tally.last_at = now
                return
        # A new key is checked once, outside the lock, so that the hot path for a known
        # key stays a dictionary update.
        for name, value in zip(("principal", "action", "resource"), key, strict=True):
            check_text(name, value, required=True)
        with self._lock:
            tally = self._tallies.setdefault(key, _Tally(0, now, now))
            tally.count += count
            tally.last_at = now

    def pending(self) -> dict[tuple[str, str, str], int]:
        """Return the counts not yet flushed, by (principal, action, resource)."""
        with self._lock:
            return {key: tally.count for key, tally in self._tallies.items()}

    def flush(self) -> list[AuditEntry]:
        """Append one ``allow_count`` row per counted key and reset the counts.

        Returns:
            The appended entries, in key order.

        Raises:
            StoreUnavailable: the store stayed unreachable. Counts not yet written are kept
                for the next flush, so none are lost.
        """
        with self._flush_lock:
            with self._lock:
                flushing, self._tallies = self._tallies, {}
            written: list[AuditEntry] = []
            keys = sorted(flushing)
            for index, key in enumerate(keys):
                try:
                    written.append(self.store.append_audit(_count_entry(key, flushing[key])))
                except BaseException:
                    self._restore({k: flushing[k] for k in keys[index:]})
                    raise
            return written

    def start(self) -> AuditCounter:
        """Start a daemon thread that flushes every ``interval_s`` seconds, and return self."""
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(
                target=self._run, name="arbor-audit-counter", daemon=True
            )
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the background thread and flush what is left.

        Raises:
            StoreUnavailable: the final flush failed, and `pending` still lists the counts.
        """
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.flush()

    def __enter__(self) -> AuditCounter:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            try:
                self.flush()
            except Exception as error:
                logger.warning(
                    "audit counter flush failed (%s: %s); keeping %d counted keys for the "
                    "next flush",
                    type(error).__name__,
                    error,
                    len(self.pending()),
                )

    def _restore(self, unwritten: dict[tuple[str, str, str], _Tally]) -> None:
        with self._lock:
            for key, tally in unwritten.items():
                current = self._tallies.get(key)
                if current is None:
                    self._tallies[key] = tally
                else:
                    current.count += tally.count
                    current.first_at = min(current.first_at, tally.first_at)
                    current.last_at = max(current.last_at, tally.last_at)


def _count_entry(key: tuple[str, str, str], tally: _Tally) -> AuditEntry:
    principal, action, resource = key
    return AuditEntry(
        principal=principal,
        action=ALLOW_COUNT,
        resource=resource,
        decision=ALLOWED,
        detail={
            "action": action,
            "count": tally.count,
            "first_at": format_time(datetime.fromtimestamp(tally.first_at, tz=timezone.utc)),
            "last_at": format_time(datetime.fromtimestamp(tally.last_at, tz=timezone.utc)),
        },
    )
