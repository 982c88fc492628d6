"""Reminder requests and their public view: the checks a reminder passes before it is stored."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from arbor.errors import InvalidArguments, StateNotSerializable
from arbor.persistence.jsonstate import encode_state
from arbor.persistence.reminders import ReminderRecord

# The handler a reminder is delivered to, as ``on_reminder(self, name, payload)``.
REMINDER_HANDLER = "on_reminder"

# Reminder names are kept in the store and in log lines, so they stay short.
MAX_REMINDER_NAME_LENGTH = 200

# Bytes of JSON a payload may take. The registry keeps every reminder in memory, so 1,000
# reminders cost at most about 64 MB there.
MAX_PAYLOAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class ReminderInfo:
    """A durable reminder as `arbor.reminders` and ``self.context.reminders()`` list it.

    Attributes:
        agent: the agent it is delivered to.
        name: its name, unique per agent.
        due_at: the next firing, a timezone-aware UTC datetime. A firing that is late
            because the agent or the cluster was down keeps its past time until delivered.
        every: the period in seconds, or None for a one-shot reminder.
        payload: the JSON value passed to ``on_reminder``.
        created_at: when it was last set.
        fired: deliveries the agent acknowledged since it was set.
    """

    agent: str
    name: str
    due_at: datetime
    every: float | None
    payload: Any
    created_at: datetime
    fired: int

    @classmethod
    def from_record(cls, record: ReminderRecord) -> ReminderInfo:
        """Build the public view of a stored reminder."""
        return cls(
            agent=record.agent,
            name=record.name,
            due_at=datetime.fromtimestamp(record.due_ms / 1000, UTC),
            every=record.period_ms / 1000 if record.period_ms is not None else None,
            payload=json.loads(record.payload_json),
            created_at=record.created_at,
            fired=record.fired,
        )


@dataclass(frozen=True)
class ReminderRequest:
    """A checked request to set a reminder, which the registry turns into a stored row.

    Exactly one of ``at_ms`` and ``delay_ms`` is set, unless ``period_ms`` is, in which
    case both may be None and the first firing is one period after the request.
    """

    name: str
    at_ms: int | None
    delay_ms: int | None
    period_ms: int | None
    payload_json: str

    @classmethod
    def parse(
        cls,
        agent: str,
        name: Any,
        at: Any = None,
        delay: Any = None,
        every: Any = None,
        payload: Any = None,
        min_period_s: float = 1.0,
    ) -> ReminderRequest:
        """Check the arguments of ``remind`` and return the request.

        Raises:
            InvalidArguments: a value is invalid; the message names it and the fix.
        """
        _check_name(agent, name)
        if at is not None and delay is not None:
            raise InvalidArguments(
                f"agent {agent!r} reminder {name!r}: at={at!r} and delay={delay!r} were both "
                "given; pass at= for a point in time or delay= for seconds from now, not both"
            )
        if at is None and delay is None and every is None:
            raise InvalidArguments(
                f"agent {agent!r} reminder {name!r} has no time; pass at= (a datetime or Unix "
                "seconds), delay= (seconds from now) or every= (a period in seconds)"
            )
        at_ms = _at_ms(agent, name, at) if at is not None else None
        delay_ms = _seconds_ms(agent, name, "delay", delay, 0.0) if delay is not None else None
        period_ms = (
            _seconds_ms(agent, name, "every", every, min_period_s) if every is not None else None
        )
        try:
            payload_json = encode_state(agent, payload, root="payload")
        except StateNotSerializable as error:
            raise InvalidArguments(
                f"agent {agent!r} reminder {name!r}: {error.path} is not JSON: {error.reason}; "
                "pass dicts, lists, strings, finite numbers, booleans and None"
            ) from None
        if len(payload_json.encode()) > MAX_PAYLOAD_BYTES:
            raise InvalidArguments(
                f"agent {agent!r} reminder {name!r}: the payload is "
                f"{len(payload_json.encode())} bytes of JSON, over the limit of "
                f"{MAX_PAYLOAD_BYTES}; keep large data in the agent's state and pass a key"
            )
        return cls(name, at_ms, delay_ms, period_ms, payload_json)

    def first_due_ms(self, now_ms: int) -> int:
        """Return the first firing of this request made at ``now_ms``."""
        if self.at_ms is not None:
            return self.at_ms
        if self.delay_ms is not None:
            return now_ms + self.delay_ms
        assert self.period_ms is not None
        return now_ms + self.period_ms


def next_due_ms(due_ms: int, period_ms: int, now_ms: int) -> int:
    """Return the first firing of a periodic reminder after ``now_ms``.

    The schedule keeps its phase: the result is ``due_ms`` plus a whole number of periods.
    Firings missed while the agent or the cluster was down are skipped, not made up.
    """
    if now_ms < due_ms:
        return due_ms + period_ms
    return due_ms + ((now_ms - due_ms) // period_ms + 1) * period_ms


def check_owner(agent: str | None, by: str | None) -> None:
    """Allow the operator (``by`` None) and the agent itself to manage its reminders.

    ``agent`` None stands for every agent's reminders, which only the operator may list.

    Raises:
        InvalidArguments: an agent asked to manage another agent's reminders.
    """
    if by is not None and by != agent:
        target = f"agent {agent!r}" if agent is not None else "every agent"
        raise InvalidArguments(
            f"agent {by!r} cannot manage the reminders of {target}; an agent manages only "
            "its own, and the operator (arbor.reminders, arbor.cancel_reminder) any"
        )


def _check_name(agent: str, name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise InvalidArguments(
            f"agent {agent!r}: reminder name {name!r} is invalid; pass a non-empty string"
        )
    if len(name) > MAX_REMINDER_NAME_LENGTH:
        raise InvalidArguments(
            f"agent {agent!r}: reminder name {name[:40]!r}... is longer than "
            f"{MAX_REMINDER_NAME_LENGTH} characters"
        )
    if not name.isprintable():
        raise InvalidArguments(
            f"agent {agent!r}: reminder name {name!r} contains control characters; use "
            "printable text"
        )


def _at_ms(agent: str, name: str, at: Any) -> int:
    if isinstance(at, datetime):
        if at.tzinfo is None or at.utcoffset() is None:
            raise InvalidArguments(
                f"agent {agent!r} reminder {name!r}: at={at!r} has no time zone; pass an "
                "aware datetime such as datetime.now(timezone.utc) + timedelta(minutes=5)"
            )
        return round(at.timestamp() * 1000)
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        raise InvalidArguments(
            f"agent {agent!r} reminder {name!r}: at={at!r} is invalid; pass a timezone-aware "
            "datetime or Unix seconds as a number"
        )
    return round(at * 1000)


def _seconds_ms(agent: str, name: str, field: str, value: Any, minimum: float) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < minimum
    ):
        floor = "0" if minimum == 0 else f"{minimum:g}"
        hint = " (ARBOR_REMINDER_MIN_PERIOD_S; use a timer for shorter periods)"
        raise InvalidArguments(
            f"agent {agent!r} reminder {name!r}: {field}={value!r} is invalid; pass a number "
            f"of seconds >= {floor}{hint if field == 'every' else ''}"
        )
    return round(value * 1000)
