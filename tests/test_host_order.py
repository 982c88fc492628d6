"""A host's per-sender message order: holding, releasing and dropping idle streams."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from arbor.messages import Envelope
from arbor.runtime import host_order
from arbor.runtime.host_order import StreamOrder

GAP_S = 0.05


class Clock:
    """Stands in for the `time` module in `host_order`, so a test sets the monotonic time."""

    now = 1000.0

    @classmethod
    def monotonic(cls) -> float:
        return cls.now


@pytest.fixture(autouse=True)
def short_gap_and_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_order, "SEQUENCE_GAP_S", GAP_S)
    monkeypatch.setattr(host_order, "time", Clock)
    Clock.now = 1000.0


class Mailboxes:
    """Records what the order posts, as (agent, message id), and completes its futures."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.posted: list[tuple[str, str]] = []

    def post(
        self, name: str, envelope: Envelope, future: asyncio.Future[Any] | None
    ) -> asyncio.Future[Any]:
        self.posted.append((name, envelope.message_id))
        if future is None:
            future = self.loop.create_future()
        future.set_result(envelope.message_id)
        return future


def run(test: Callable[[StreamOrder, Mailboxes], Awaitable[None]]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        mailboxes = Mailboxes(loop)
        await test(StreamOrder("host-test", loop, mailboxes.post), mailboxes)

    asyncio.run(main())


def message(message_id: str) -> Envelope:
    return Envelope(handler="add", message_id=message_id)


def pass_idle_limit() -> None:
    Clock.now += host_order.STREAM_IDLE_S


def test_messages_in_order_post_at_once() -> None:
    async def check(order: StreamOrder, mailboxes: Mailboxes) -> None:
        for number in range(3):
            order.post("a", message(f"m{number}"), f"s1:{number}")

        assert mailboxes.posted == [("a", "m0"), ("a", "m1"), ("a", "m2")]
        assert len(order) == 1

    run(check)


def test_early_message_waits_for_predecessor() -> None:
    async def check(order: StreamOrder, mailboxes: Mailboxes) -> None:
        order.post("a", message("m1"), "s1:1")
        assert mailboxes.posted == []

        order.post("a", message("m0"), "s1:0")
        assert mailboxes.posted == [("a", "m0"), ("a", "m1")]

    run(check)


def test_idle_stream_is_dropped() -> None:
    async def check(order: StreamOrder, mailboxes: Mailboxes) -> None:
        order.post("a", message("m0"), "s1:0")
        order.post("b", message("n0"), "s2:0")

        Clock.now += host_order.STREAM_IDLE_S - 1
        assert order.prune() == 0
        assert len(order) == 2
        Clock.now += 1
        assert order.prune() == 2
        assert len(order) == 0

    run(check)


def test_recent_stream_outlives_older_ones() -> None:
    async def check(order: StreamOrder, mailboxes: Mailboxes) -> None:
        order.post("a", message("m0"), "s1:0")
        order.post("b", message("n0"), "s2:0")
        Clock.now += 200
        order.post("a", message("m1"), "s1:1")
        Clock.now += host_order.STREAM_IDLE_S - 100

        assert order.prune() == 1
        assert len(order) == 1
        order.post("a", message("m2"), "s1:2")
        assert mailboxes.posted[-1] == ("a", "m2")

    run(check)


def test_dropped_stream_late_messages_keep_order() -> None:
    async def check(order: StreamOrder, mailboxes: Mailboxes) -> None:
        order.post("a", message("m0"), "s1:0")
        order.post("a", message("m1"), "s1:1")
        pass_idle_limit()
        order.prune()
        assert len(order) == 0

        # Ray may start the sender's next two messages in either order.
        late = [order.post("a", message("m3"), "s1:3"), order.post("a", message("m2"), "s1:2")]
        assert mailboxes.posted == [("a", "m0"), ("a", "m1")]

        assert await asyncio.wait_for(asyncio.gather(*late), 5) == ["m3", "m2"]
        assert mailboxes.posted[2:] == [("a", "m2"), ("a", "m3")]
        order.post("a", message("m4"), "s1:4")
        assert mailboxes.posted[-1] == ("a", "m4")

    run(check)


def test_dropped_stream_resend_posts_again() -> None:
    async def check(order: StreamOrder, mailboxes: Mailboxes) -> None:
        order.post("a", message("m0"), "s1:0")
        pass_idle_limit()
        order.prune()

        # The agent's deduplication, not the order, drops the second copy of m0.
        resent = order.post("a", message("m0"), "s1:0")

        assert await resent == "m0"
        assert mailboxes.posted == [("a", "m0"), ("a", "m0")]

    run(check)


def test_stream_with_held_message_kept() -> None:
    async def check(order: StreamOrder, mailboxes: Mailboxes) -> None:
        order.post("a", message("m0"), "s1:0")
        held = order.post("a", message("m2"), "s1:2")

        pass_idle_limit()
        assert order.prune() == 0
        assert len(order) == 1
        assert await asyncio.wait_for(held, 5) == "m2"
        assert mailboxes.posted == [("a", "m0"), ("a", "m2")]

    run(check)


def test_stop_drops_streams_posts_held() -> None:
    async def check(order: StreamOrder, mailboxes: Mailboxes) -> None:
        order.post("a", message("m0"), "s1:0")
        order.post("a", message("m3"), "s1:3")
        order.post("a", message("m2"), "s1:2")
        order.post("a", message("x0"), "s3:0")
        order.post("b", message("n0"), "s1:0")
        assert order.held_by_agent() == {"a": 2}

        order.forget_agent("a")

        assert mailboxes.posted[-2:] == [("a", "m2"), ("a", "m3")]
        assert order.held_by_agent() == {}
        assert len(order) == 1
        # The gap timer of the forgotten stream finds nothing to release.
        await asyncio.sleep(GAP_S * 3)
        assert len(mailboxes.posted) == 5

    run(check)


def test_unnumbered_sequence_posts_at_once() -> None:
    async def check(order: StreamOrder, mailboxes: Mailboxes) -> None:
        order.post("a", message("m0"), "s1:first")

        assert mailboxes.posted == [("a", "m0")]
        assert len(order) == 0

    run(check)
