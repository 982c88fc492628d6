"""The outbox: messages an agent sends while handling a message, kept until delivered.

A send made inside a handler is staged, written into the same checkpoint as the state
change it belongs to, and dispatched only after that checkpoint commits. A new
incarnation dispatches again whatever the last checkpoint lists, and receivers drop the
copies by message id, so a crash between the commit and the delivery loses nothing.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# A dispatch returns a handle on the delivery, or None when the target cannot be reached
# yet. A delivery check returns True (delivered), False (lost, send again) or None (still
# in flight).
Dispatch = Callable[[str, list[Any]], Any]
DeliveryCheck = Callable[[Any], "bool | None"]


@dataclass
class _Entry:
    target: str
    wire: list[Any]
    delivery: Any = None


class Outbox:
    """Staged and undelivered messages of one agent."""

    def __init__(self, dispatch: Dispatch, delivered: DeliveryCheck) -> None:
        self._dispatch = dispatch
        self._delivered = delivered
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._staged: list[tuple[str, _Entry]] = []

    def busy(self) -> bool:
        """Return whether any message is staged or undelivered, which an idle outbox skips."""
        return bool(self._entries or self._staged)

    @property
    def has_staged(self) -> bool:
        """Whether the running handler has sent messages that are not committed yet."""
        return bool(self._staged)

    def stage(self, message_id: str, target: str, wire: list[Any]) -> None:
        """Hold a message until the checkpoint of the running handler commits."""
        self._staged.append((message_id, _Entry(target, wire)))

    def discard_staged(self) -> None:
        """Drop the running handler's messages, because its checkpoint did not commit."""
        self._staged.clear()

    def records(self) -> list[list[Any]]:
        """Return ``[message_id, target, wire]`` for every message a checkpoint must keep."""
        entries = [*self._entries.items(), *self._staged]
        return [[message_id, entry.target, entry.wire] for message_id, entry in entries]

    def load(self, records: list[list[Any]]) -> None:
        """Take over the undelivered messages listed in a restored checkpoint."""
        for message_id, target, wire in records:
            self._entries[message_id] = _Entry(target, wire)

    def commit_staged(self) -> None:
        """Move the running handler's messages to the outbox once their checkpoint committed."""
        for message_id, entry in self._staged:
            self._entries[message_id] = entry
        self._staged.clear()

    def flush(self) -> None:
        """Dispatch every message that has no delivery under way."""
        for message_id, entry in self._entries.items():
            if entry.delivery is None:
                entry.delivery = self._dispatch(entry.target, entry.wire)
                if entry.delivery is None:
                    logger.warning(
                        "message %s to agent %s could not be dispatched; it is retried later",
                        message_id,
                        entry.target,
                    )

    def prune(self) -> bool:
        """Forget delivered messages and mark lost ones for another dispatch.

        Returns:
            Whether a message was forgotten, so the next checkpoint should drop it.
        """
        delivered = []
        for message_id, entry in self._entries.items():
            if entry.delivery is None:
                continue
            outcome = self._delivered(entry.delivery)
            if outcome is True:
                delivered.append(message_id)
            elif outcome is False:
                entry.delivery = None
        for message_id in delivered:
            del self._entries[message_id]
        return bool(delivered)
