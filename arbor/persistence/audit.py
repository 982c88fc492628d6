"""The hash-chained audit log: entries, row hashing and chain verification.

Each row stores the SHA-256 of a canonical JSON document made of its own fields and the
previous row's hash. Editing a row changes its hash, and deleting or reordering rows breaks
the link from one row to the next, so `verify_chain` finds the first row where the chain
breaks. The stores assign ``seq`` and ``prev_hash`` while they hold a lock that serialises
appends, so the chain never forks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

from arbor.errors import InvalidAuditEntry, InvalidAuditQuery

ALLOWED = "allowed"
DENIED = "denied"
DECISIONS = (ALLOWED, DENIED)

# Actions that Arbor itself writes. Callers may use other action names too.
GRANT = "grant"
DELEGATE = "delegate"
REVOKE = "revoke"
DENY = "deny"
SPAWN = "spawn"
STOP = "stop"
ALLOW_COUNT = "allow_count"

# The prev_hash of the first row (seq 1), which has no predecessor.
GENESIS_HASH = "0" * 64

# Upper bounds that keep one faulty caller from writing huge rows into an append-only
# table, which no one may shrink afterwards. They are generous guesses, not measured needs.
MAX_TEXT_LENGTH = 4096
MAX_DETAIL_LENGTH = 65_536

# Maximum rows that one list_audit call returns.
MAX_LIST_LIMIT = 10_000

# Rows read per query while verifying, so a long chain is never held in memory at once.
VERIFY_BATCH_ROWS = 1000

# Kinds of chain break that AuditVerification.problem reports.
HASH_MISMATCH = "hash_mismatch"
SEQ_GAP = "seq_gap"
PREV_HASH_MISMATCH = "prev_hash_mismatch"

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass
class AuditEntry:
    """One audit log row.

    A caller fills in who (``principal``), what (``action`` on ``resource``), the
    ``decision`` and optional ``detail`` and ``trace_id``. The store assigns ``seq``,
    ``at``, ``prev_hash`` and ``hash`` when it appends the entry and ignores any values
    given for them.
    """

    principal: str
    action: str
    resource: str
    decision: str
    detail: dict[str, Any] = field(default_factory=dict)
    trace_id: str | None = None
    seq: int | None = None
    at: datetime | None = None
    prev_hash: str | None = None
    hash: str | None = None


@dataclass
class AuditVerification:
    """The outcome of walking the audit chain from seq 1.

    Attributes:
        ok: whether every row matched its hash and linked to the row before it.
        checked: rows examined, including the first bad row when there is one.
        bad_seq: seq of the first bad row, or None when the chain holds.
        problem: `HASH_MISMATCH` (the row was edited), `SEQ_GAP` (rows before it were
            deleted) or `PREV_HASH_MISMATCH` (rows were reordered, or a row before it was
            deleted or edited and given a new hash); None when the chain holds.
        reason: the problem in one sentence, for people.
        head_seq: seq of the last intact row, or None when no row is intact.
        head_hash: hash of the last intact row. Deleting the newest rows leaves a shorter
            chain that still verifies, so record the head elsewhere and compare it later.
    """

    ok: bool
    checked: int
    bad_seq: int | None = None
    problem: str | None = None
    reason: str | None = None
    head_seq: int | None = None
    head_hash: str | None = None


class AuditRow(NamedTuple):
    """An audit row as stored, with ``detail`` as the exact JSON text that the hash covers."""

    seq: int
    at: datetime
    principal: str
    action: str
    resource: str
    decision: str
    detail_text: str
    trace_id: str | None
    prev_hash: str
    hash: str

    def to_entry(self) -> AuditEntry:
        """Convert the row to an `AuditEntry`, parsing its detail."""
        return AuditEntry(
            principal=self.principal,
            action=self.action,
            resource=self.resource,
            decision=self.decision,
            detail=json.loads(self.detail_text),
            trace_id=self.trace_id,
            seq=self.seq,
            at=self.at.astimezone(timezone.utc),
            prev_hash=self.prev_hash,
            hash=self.hash,
        )


def seal_row(entry: AuditEntry, seq: int, prev_hash: str, at: datetime | None = None) -> AuditRow:
    """Validate ``entry`` and build the row that follows ``prev_hash`` at ``seq``, with its hash.

    ``at`` defaults to the current time; both stores keep it to the microsecond.

    Raises:
        InvalidAuditEntry: a field is missing, too long or of the wrong type.
    """
    detail_text = _validate_entry(entry)
    at = at or datetime.now(timezone.utc)
    unhashed = AuditRow(
        seq=seq,
        at=at.astimezone(timezone.utc),
        principal=entry.principal,
        action=entry.action,
        resource=entry.resource,
        decision=entry.decision,
        detail_text=detail_text,
        trace_id=entry.trace_id,
        prev_hash=prev_hash,
        hash="",
    )
    return unhashed._replace(hash=row_hash(unhashed))


def row_hash(row: AuditRow) -> str:
    """Return the SHA-256 hex digest of every field of ``row`` except its own hash."""
    return hashlib.sha256(_canonical(row).encode("ascii")).hexdigest()


def hash_parts(row: AuditRow) -> tuple[str, str, str]:
    """Split the document that `row_hash` hashes around the values of prev_hash and seq.

    The document of ``row`` with prev_hash P and seq N is ``first + P + second + str(N) +
    third``, so a store can hash a row whose predecessor it reads in the same statement.
    """
    # The canonical form sorts its keys, so prev_hash comes before principal, and seq
    # between resource and trace_id. Inside an encoded string, every quote follows a
    # backslash, so only the keys themselves match the separators below.
    canonical = _canonical(row._replace(prev_hash="", seq=0))
    before, after_prev = canonical.split(',"prev_hash":""', 1)
    middle, tail = after_prev.split(',"seq":0,', 1)
    return before + ',"prev_hash":"', '"' + middle + ',"seq":', "," + tail


def _canonical(row: AuditRow) -> str:
    document = {
        "seq": row.seq,
        "at": format_time(row.at),
        "principal": row.principal,
        "action": row.action,
        "resource": row.resource,
        "decision": row.decision,
        "detail": row.detail_text,
        "trace_id": row.trace_id,
        "prev_hash": row.prev_hash,
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def format_time(at: datetime) -> str:
    """Format ``at`` in UTC with microseconds, the form the hash covers."""
    return at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_microseconds(at: datetime) -> int:
    """Return ``at`` as whole microseconds since the Unix epoch."""
    return (at - _EPOCH) // timedelta(microseconds=1)


def from_microseconds(value: int) -> datetime:
    """Return the UTC datetime ``value`` microseconds after the Unix epoch."""
    return _EPOCH + timedelta(microseconds=value)


def check_query(
    decision: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    after_seq: int | None,
) -> None:
    """Check the filters of a list_audit call.

    Raises:
        InvalidAuditQuery: a filter is out of range or a datetime has no time zone.
    """
    if decision is not None and decision not in DECISIONS:
        raise InvalidAuditQuery(
            f"decision {decision!r} is invalid; use one of {', '.join(DECISIONS)}"
        )
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise InvalidAuditQuery(
                f"{name}={value.isoformat()} has no time zone; pass an aware datetime such as "
                "datetime(..., tzinfo=timezone.utc)"
            )
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidAuditQuery(
            f"limit {limit!r} is invalid; pass a whole number from 1 to {MAX_LIST_LIMIT}"
        )
    if after_seq is not None and (isinstance(after_seq, bool) or not isinstance(after_seq, int)):
        raise InvalidAuditQuery(f"after_seq {after_seq!r} is invalid; pass a whole number")


def verify_chain(read_batch: Callable[[int], list[AuditRow]]) -> AuditVerification:
    """Walk the chain from seq 1 and stop at the first bad row.

    Args:
        read_batch: returns up to `VERIFY_BATCH_ROWS` rows with a seq above its argument,
            in seq order, and an empty list at the end.
    """
    checked = 0
    expected_seq = 1
    prev_hash = GENESIS_HASH
    head: AuditRow | None = None
    after_seq = 0
    while rows := read_batch(after_seq):
        for row in rows:
            checked += 1
            problem, reason = _check_row(row, expected_seq, prev_hash)
            if problem is not None:
                return AuditVerification(
                    ok=False,
                    checked=checked,
                    bad_seq=row.seq,
                    problem=problem,
                    reason=reason,
                    head_seq=head.seq if head else None,
                    head_hash=head.hash if head else None,
                )
            head = row
            expected_seq = row.seq + 1
            prev_hash = row.hash
        after_seq = rows[-1].seq
    return AuditVerification(
        ok=True,
        checked=checked,
        head_seq=head.seq if head else None,
        head_hash=head.hash if head else None,
    )


def _check_row(row: AuditRow, expected_seq: int, prev_hash: str) -> tuple[str | None, str]:
    # Links are checked before the row's own hash: a swap changes both, and the broken
    # link names the cause, while a hash mismatch alone means the row itself was edited.
    if row.seq < expected_seq:
        return SEQ_GAP, f"seq {row.seq} is below {expected_seq}, so the row's seq was edited"
    if row.seq > expected_seq:
        if row.seq == expected_seq + 1:
            missing = f"seq {expected_seq} is missing"
        else:
            missing = f"seqs {expected_seq} to {row.seq - 1} are missing"
        return SEQ_GAP, f"{missing} before seq {row.seq}, so rows were deleted"
    if row.prev_hash != prev_hash:
        before = f"seq {expected_seq - 1}" if expected_seq > 1 else "the start of the chain"
        return (
            PREV_HASH_MISMATCH,
            f"prev_hash of seq {row.seq} does not match the hash of {before}, so rows were "
            "reordered, or a row before it was deleted or edited and given a new hash",
        )
    if row_hash(row) != row.hash:
        return (
            HASH_MISMATCH,
            f"hash of seq {row.seq} does not match its content, so the row was edited",
        )
    return None, ""


def _validate_entry(entry: AuditEntry) -> str:
    """Check the caller's fields of ``entry`` and return its detail as canonical JSON text."""
    for name in ("principal", "action", "resource"):
        value = getattr(entry, name)
        check_text(name, value, required=True)
    if entry.decision not in DECISIONS:
        raise InvalidAuditEntry(
            f"audit entry decision {entry.decision!r} is invalid; use one of {', '.join(DECISIONS)}"
        )
    if entry.trace_id is not None:
        check_text("trace_id", entry.trace_id, required=False)
    if not isinstance(entry.detail, dict):
        raise InvalidAuditEntry(
            f"audit entry detail must be a dict, not {type(entry.detail).__name__}"
        )
    try:
        detail_text = json.dumps(
            entry.detail, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
    except (TypeError, ValueError) as error:
        raise InvalidAuditEntry(
            f"audit entry detail is not JSON ({error}); use dicts with string keys, lists, "
            "strings, finite numbers, booleans and None"
        ) from None
    if len(detail_text) > MAX_DETAIL_LENGTH:
        raise InvalidAuditEntry(
            f"audit entry detail is {len(detail_text)} characters of JSON, above the limit of "
            f"{MAX_DETAIL_LENGTH}; record a summary instead"
        )
    return detail_text


def check_text(name: str, value: object, *, required: bool) -> None:
    """Check one text field of an audit entry.

    Raises:
        InvalidAuditEntry: ``value`` is not a str, is empty while ``required``, is longer
            than `MAX_TEXT_LENGTH` or contains a NUL character.
    """
    if not isinstance(value, str):
        raise InvalidAuditEntry(f"audit entry {name} must be a str, not {type(value).__name__}")
    if required and not value:
        raise InvalidAuditEntry(f"audit entry {name} is empty; name the {name}")
    if len(value) > MAX_TEXT_LENGTH:
        raise InvalidAuditEntry(
            f"audit entry {name} is {len(value)} characters, above the limit of {MAX_TEXT_LENGTH}"
        )
    if "\x00" in value:
        raise InvalidAuditEntry(
            f"audit entry {name} {value[:80]!r} contains a NUL character, which PostgreSQL "
            "text cannot store; remove it"
        )
