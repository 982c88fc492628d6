"""Timeouts of ask calls between agents of one host, grouped by window of deadline."""

from __future__ import annotations

import asyncio
from typing import Any

from arbor.runtime.host_local import AskDeadlines


def run(check: Any) -> Any:
    return asyncio.run(check())


def test_watched_ask_times_out_after_its_window() -> None:
    async def check() -> tuple[float, Any]:
        loop = asyncio.get_running_loop()
        deadlines = AskDeadlines(loop)
        future = loop.create_future()
        started = loop.time()
        deadlines.watch(future, 0.05)
        result = await future
        return loop.time() - started, result

    elapsed, result = run(check)

    assert result is None
    assert 0.05 <= elapsed < 0.05 + AskDeadlines.WINDOW_S + 0.05


def test_asks_in_one_window_share_a_timer() -> None:
    async def check() -> tuple[int, list[Any]]:
        loop = asyncio.get_running_loop()
        deadlines = AskDeadlines(loop)
        futures = [loop.create_future() for _ in range(50)]
        for future in futures:
            deadlines.watch(future, 0.02)
        windows = len(deadlines._windows)
        return windows, list(await asyncio.gather(*futures))

    windows, results = run(check)

    # 50 calls posted within microseconds span at most two windows.
    assert windows <= 2
    assert results == [None] * 50


def test_unwatched_and_answered_calls_keep_results() -> None:
    async def check() -> tuple[Any, Any, int]:
        loop = asyncio.get_running_loop()
        deadlines = AskDeadlines(loop)
        answered, unwatched = loop.create_future(), loop.create_future()
        deadlines.watch(answered, 0.02)
        answered.set_result("reply")
        unwatch = deadlines.watch(unwatched, 0.02)
        unwatch(unwatched)
        await asyncio.sleep(0.02 + 2 * AskDeadlines.WINDOW_S)
        return answered.result(), unwatched.done(), len(deadlines._windows)

    answered, unwatched_done, windows = run(check)

    assert answered == "reply"
    assert unwatched_done is False
    # Each window's timer removes the window when it ends.
    assert windows == 0
