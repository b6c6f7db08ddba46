"""LoopTimeout (tierproxy.deadlines): asyncio.timeout_at's semantics for a known loop and task.

Real tasks on the running loop; the waits are a few ms with generous slack.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tierproxy.deadlines import LoopTimeout


def _scope(seconds: float) -> LoopTimeout:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task(loop)
    assert task is not None
    return LoopTimeout(loop, task, loop.time() + seconds)


async def test_a_block_past_its_deadline_raises_timeout_error() -> None:
    started = time.perf_counter()
    with pytest.raises(TimeoutError), _scope(0.02) as scope:
        await asyncio.sleep(5)
    assert scope.expired
    assert 0.015 <= time.perf_counter() - started < 1.0
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # its cancellation was taken back


async def test_a_block_done_in_time_leaves_the_task_alone_afterwards() -> None:
    with _scope(0.02) as scope:
        await asyncio.sleep(0)
    assert not scope.expired
    await asyncio.sleep(0.05)  # past the deadline: no cancellation arrives late


async def test_a_deadline_already_passed_times_out_at_the_first_wait() -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task(loop)
    assert task is not None
    with pytest.raises(TimeoutError), LoopTimeout(loop, task, loop.time() - 1):
        await asyncio.sleep(5)


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    async def waits() -> None:
        with _scope(5):
            await asyncio.sleep(5)

    task = asyncio.ensure_future(waits())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancellation_inside_the_block_stays_a_cancellation() -> None:
    """The task is cancelled by its own code before the deadline: not a timeout."""
    loop = asyncio.get_running_loop()

    async def waits() -> None:
        task = asyncio.current_task(loop)
        assert task is not None
        with LoopTimeout(loop, task, loop.time() + 0.01):
            task.cancel()  # from "elsewhere", before the deadline's own
            await asyncio.sleep(5)

    task = asyncio.ensure_future(waits())
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_outer_asyncio_timeout_keeps_its_own_deadline() -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.02) as outer:
            with _scope(5) as inner:
                await asyncio.sleep(5)
    assert outer.expired()
    assert not inner.expired
