"""Put each sender's messages to a hosted agent back in the order the sender sent them.

A host is an async Ray actor, and Ray may start an async actor's calls out of submission
order. Each sending process numbers its messages to each hosted agent (the
``arbor-seq`` header, see `arbor.runtime.ref`), and `StreamOrder` keeps a message back until
the one numbered before it in its stream has been posted to the agent's mailbox.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from arbor.messages import Envelope

logger = logging.getLogger(__name__)

# Seconds a message waits for the messages numbered before it in its stream. A gap
# outlives this only when the earlier message is lost to the host, as after a host restart
# (Ray resends in-flight calls in no particular order) or a move from another host.
# NOTE: a sender stalled longer than this between numbering and submitting a message
# (a heavily loaded machine) lets its later messages run first.
SEQUENCE_GAP_S = 1.0

# Posts an envelope to an agent's mailbox, completing the given future or a new one.
Post = Callable[[str, Envelope, "asyncio.Future[Any] | None"], "asyncio.Future[Any]"]


class StreamOrder:
    """The order state of one host: per (sender stream, agent), the next number to post.

    Entries are kept for the host's lifetime, so passivating an agent keeps its order.
    """

    def __init__(self, host: str, loop: asyncio.AbstractEventLoop, post: Post) -> None:
        self._host = host
        self._loop = loop
        self._post = post
        # NOTE: entries of senders that are gone are never removed, about 100 bytes per
        # sending process and agent for the host's lifetime.
        self._expected: dict[tuple[str, str], int] = {}
        # Messages that arrived before their predecessors, by number.
        self._held: dict[tuple[str, str], dict[int, tuple[Envelope, asyncio.Future[Any]]]] = {}

    def post(self, name: str, envelope: Envelope, sequence: str) -> asyncio.Future[Any]:
        """Post a numbered message once the messages numbered before it in its stream are."""
        stream, _, number_text = sequence.rpartition(":")
        try:
            number = int(number_text)
        except ValueError:
            return self._post(name, envelope, None)
        key = (stream, name)
        expected = self._expected.get(key, 0)
        if number < expected:
            # A resent message; deduplication decides whether it runs.
            return self._post(name, envelope, None)
        if number > expected:
            future = self._loop.create_future()
            held = self._held.setdefault(key, {})
            if not held:
                self._loop.call_later(SEQUENCE_GAP_S, self._release_held, key, expected)
            held[number] = (envelope, future)
            return future
        future = self._post(name, envelope, None)
        self._expected[key] = number + 1
        self._release_ready(key)
        return future

    def _release_ready(self, key: tuple[str, str]) -> None:
        held = self._held.get(key)
        if not held:
            return
        number = self._expected[key]
        while number in held:
            envelope, future = held.pop(number)
            self._post(key[1], envelope, future)
            number += 1
        self._expected[key] = number
        if not held:
            del self._held[key]
        else:
            self._loop.call_later(SEQUENCE_GAP_S, self._release_held, key, number)

    def _release_held(self, key: tuple[str, str], waited_for: int) -> None:
        """Give up on a gap in a stream: post its held messages in number order."""
        held = self._held.get(key)
        if not held or self._expected.get(key, 0) != waited_for:
            return
        logger.info(
            "host %s: agent %s messages %d.. of stream %s did not arrive within %.1f s; "
            "running the %d later ones",
            self._host,
            key[1],
            waited_for,
            key[0],
            SEQUENCE_GAP_S,
            len(held),
        )
        self._expected[key] = min(held)
        self._release_ready(key)
