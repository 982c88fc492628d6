"""Put each sender's messages to a hosted agent back in the order the sender sent them.

A host is an async Ray actor, and Ray may start an async actor's calls out of submission
order. Each sending process numbers its messages to each hosted agent (the
``arbor-seq`` header, see `arbor.runtime.ref`), and `StreamOrder` keeps a message back until
the one numbered before it in its stream has been posted to the agent's mailbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
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

# Seconds after its last message that a stream's order state is dropped. Far longer than
# SEQUENCE_GAP_S, so that a stream is dropped long after every gap in it was given up on.
STREAM_IDLE_S = 300.0

# Posts an envelope to an agent's mailbox, completing the given future or a new one.
Post = Callable[[str, Envelope, "asyncio.Future[Any] | None"], "asyncio.Future[Any]"]

_Key = tuple[str, str]


class StreamOrder:
    """The order state of one host: per (sender stream, agent), the next number to post.

    Passivating an agent keeps its streams. Two events drop a stream's entry, so the state
    stays bounded by the streams active in the last ``STREAM_IDLE_S`` seconds:

    * `forget_agent`, when the agent is stopped. Its held messages are posted at once, in
      number order, and the mailbox rejects them as it does any message to a stopped agent.
    * `prune`, for a stream with no message for ``STREAM_IDLE_S`` seconds and none held:
      the streams of sending processes that ended, and those to an agent that moved to
      another host. A moved agent's streams are kept until then, because this host
      forwards the messages that still reach it, in order.

    A message of a dropped stream that still arrives is delivered, because the host takes
    it for the first message of a new stream. A message numbered 0 is posted at once.
    One numbered higher waits at most ``SEQUENCE_GAP_S`` for lower numbers and is then
    posted with the stream's other waiting messages in number order. The agent's
    deduplication by message id (within ``ARBOR_DEDUP_WINDOW``), not this order state,
    decides whether a resent message runs again. Dropping keeps the stream's order: a
    stream is dropped only when none of its messages is held, and its later messages are
    held against the new entry and posted in number order, as after any gap. The one
    cost is that wait of at most ``SEQUENCE_GAP_S`` for the first message after a drop.
    """

    def __init__(self, host: str, loop: asyncio.AbstractEventLoop, post: Post) -> None:
        self._host = host
        self._loop = loop
        self._post = post
        # The next number to post per stream, least recently used first.
        self._expected: OrderedDict[_Key, int] = OrderedDict()
        # The monotonic time of each stream's last message, in the same order.
        self._last_seen: dict[_Key, float] = {}
        # The stream ids that sent to each agent, to drop them when the agent leaves.
        self._streams: dict[str, set[str]] = {}
        # Messages that arrived before their predecessors, by number.
        self._held: dict[_Key, dict[int, tuple[Envelope, asyncio.Future[Any]]]] = {}

    def __len__(self) -> int:
        """Return the number of streams with order state."""
        return len(self._expected)

    def post(self, name: str, envelope: Envelope, sequence: str) -> asyncio.Future[Any]:
        """Post a numbered message once the messages numbered before it in its stream are."""
        stream, _, number_text = sequence.rpartition(":")
        try:
            number = int(number_text)
        except ValueError:
            return self._post(name, envelope, None)
        key = (stream, name)
        expected = self._touch(key)
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

    def held_by_agent(self) -> Counter[str]:
        """Count the held messages per agent."""
        counts: Counter[str] = Counter()
        for (_, name), held in self._held.items():
            counts[name] += len(held)
        return counts

    def forget_agent(self, name: str) -> None:
        """Drop the streams to agent ``name``, which left this host; post its held messages."""
        for stream in self._streams.pop(name, ()):
            key = (stream, name)
            for _, (envelope, future) in sorted(self._held.pop(key, {}).items()):
                self._post(name, envelope, future)
            self._expected.pop(key, None)
            self._last_seen.pop(key, None)

    def prune(self, now: float | None = None) -> int:
        """Drop the streams idle for ``STREAM_IDLE_S`` seconds; returns how many went."""
        now = time.monotonic() if now is None else now
        dropped = 0
        for key in list(self._expected):
            if now - self._last_seen[key] < STREAM_IDLE_S:
                # The entries are in order of last use, so the rest are newer.
                break
            if key in self._held:
                continue
            del self._expected[key]
            del self._last_seen[key]
            streams = self._streams.get(key[1])
            if streams is not None:
                streams.discard(key[0])
                if not streams:
                    del self._streams[key[1]]
            dropped += 1
        return dropped

    def _touch(self, key: _Key) -> int:
        """Return the stream's next number and mark it used now, creating it at 0."""
        expected = self._expected.get(key)
        if expected is None:
            expected = self._expected[key] = 0
            self._streams.setdefault(key[1], set()).add(key[0])
        else:
            self._expected.move_to_end(key)
        self._last_seen[key] = time.monotonic()
        return expected

    def _release_ready(self, key: _Key) -> None:
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

    def _release_held(self, key: _Key, waited_for: int) -> None:
        """Give up on a gap in a stream: post its held messages in number order."""
        held = self._held.get(key)
        if not held or self._expected.get(key) != waited_for:
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
