"""Bounded polling: wait on a condition, never on a bare sleep."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

__all__ = ["wait_for_condition", "wait_until_wallclock"]

T = TypeVar("T")


@overload
async def wait_for_condition(
    predicate: Callable[[], Awaitable[T]],
    timeout: float = ...,
    *,
    interval: float = ...,
    message: str | Callable[[], str] | None = ...,
) -> T: ...
@overload
async def wait_for_condition(
    predicate: Callable[[], T],
    timeout: float = ...,
    *,
    interval: float = ...,
    message: str | Callable[[], str] | None = ...,
) -> T: ...
async def wait_for_condition(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 5.0,
    *,
    interval: float = 0.02,
    message: str | Callable[[], str] | None = None,
) -> T:
    """Call ``predicate`` (sync or async) until it returns something truthy; return that.

    Raises ``AssertionError`` after ``timeout`` seconds (loop clock) with ``message`` and the
    last value or exception seen, so a failing poll explains itself.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: object = None
    attempts = 0
    while True:
        attempts += 1
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            last = value
            if value:
                return value
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last error
            last = exc
        if loop.time() >= deadline:
            what = message() if callable(message) else (message or "condition")
            raise AssertionError(
                f"timed out after {timeout}s ({attempts} attempts) waiting for {what}; "
                f"last value: {last!r}"
            )
        await asyncio.sleep(interval)


async def wait_until_wallclock(when: float, *, max_wait: float = 10.0) -> None:
    """Let wall-clock time pass until ``time.time() >= when``.

    Only for times the proxy's clock does not decide: a test of the proxy's freshness,
    stale windows or cool-downs advances the proxy's clock instead (support.clock). What is
    left is real time between processes - e.g. an origin's one-second ``Date`` against the
    purge log's start in Redis (support.purge_log). Bounded by ``max_wait``.
    """
    await wait_for_condition(
        lambda: time.time() >= when,
        timeout=max_wait,
        interval=0.01,
        message=f"wall clock to reach {when:.3f}",
    )
