"""BackgroundTasks: the required lane stays bounded, and required work is never dropped."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from tierproxy.background import BackgroundTasks
from tierproxy.metrics import Metrics


async def test_required_work_waited_for_briefly_never_grows_the_lane_past_its_limit() -> None:
    """A caller that waits at most ``wait`` for required work (an unsafe method's
    invalidation) may leave it running in the background - but only while the lane has room:
    with the lane full, the work runs inline and the caller waits for all of it (back
    pressure), so a flood of such callers cannot pile up background tasks."""
    background = BackgroundTasks(2, Metrics())
    release = asyncio.Event()
    done: list[int] = []

    def work(n: int) -> Callable[[], Coroutine[Any, Any, None]]:
        async def run() -> None:
            await release.wait()
            done.append(n)

        return run

    first = [await background.run_required("r", work(n), wait=0.01) for n in range(2)]
    assert first == [False, False]  # not done within the wait: left running, lane now full
    assert background.pending == 2
    third = asyncio.create_task(background.run_required("r", work(2), wait=0.01))
    await asyncio.sleep(0.05)
    assert not third.done(), "lane full: the caller runs the work itself and waits for it"
    assert background.pending == 2
    release.set()
    assert await third is True
    await background.drain(1.0)
    assert sorted(done) == [0, 1, 2]  # none dropped
