"""Message envelopes passed to agents and the replies they return."""

from __future__ import annotations

import itertools
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal


def new_message_id() -> str:
    """Return a fresh, globally unique message id.

    The id is a random 64-bit prefix of this process followed by a counter, which costs a
    fraction of a `uuid.uuid4` per message. A forked child draws a prefix of its own.
    """
    return f"{_id_prefix}{next(_id_counter):x}"


def _new_id_prefix() -> None:
    global _id_prefix, _id_counter
    _id_prefix = uuid.uuid4().hex[:16] + "-"
    _id_counter = itertools.count()


_id_prefix = ""
_id_counter = itertools.count()
_new_id_prefix()
os.register_at_fork(after_in_child=_new_id_prefix)


@dataclass
class Envelope:
    """One message to an agent.

    Attributes:
        handler: name of the public method to call.
        args: positional arguments for the handler.
        kwargs: keyword arguments for the handler.
        kind: ``ask`` expects a reply; ``send`` is fire-and-forget.
        message_id: unique id; a retried message keeps its id so the agent applies it once.
        sender: name of the sending agent, or ``None`` for a client outside any agent.
        sent_at: Unix time the sender created the envelope.
        headers: propagated context such as W3C ``traceparent``; free-form strings.
    """

    handler: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    kind: Literal["ask", "send"] = "ask"
    message_id: str = field(default_factory=new_message_id)
    sender: str | None = None
    sent_at: float = field(default_factory=time.time)
    headers: dict[str, str] = field(default_factory=dict)

    def to_wire(self) -> tuple[Any, ...]:
        """Return the envelope as a plain tuple, which Ray serialises faster than an object."""
        return (
            self.handler,
            self.args,
            self.kwargs,
            self.kind,
            self.message_id,
            self.sender,
            self.sent_at,
            self.headers,
        )

    @classmethod
    def from_wire(cls, wire: tuple[Any, ...]) -> Envelope:
        """Rebuild an envelope from `to_wire` output."""
        return cls(*wire)


@dataclass
class ErrorInfo:
    """An error raised while processing a message, in a form that crosses processes."""

    kind: Literal[
        "handler",
        "unknown_handler",
        "invalid_arguments",
        "state",
        "conflict",
        "store",
        "stopped",
        "denied",
        "moved",
    ]
    error_type: str
    message: str
    traceback: str = ""


@dataclass
class Reply:
    """The outcome of one message: a value, or the error that replaced it."""

    message_id: str
    value: Any = None
    error: ErrorInfo | None = None
    duplicate: bool = False
    # The Arbor exception behind ``error``, when the runtime rather than a handler raised;
    # never stored, only carried back to the caller.
    exception: Exception | None = None
