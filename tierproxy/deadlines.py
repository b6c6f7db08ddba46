"""``asyncio.timeout`` for a loop and a task the caller already holds.

On Python 3.11 every ``asyncio.get_running_loop()`` (and ``asyncio.current_task()``, and
``asyncio.timeout()``, which asks for both) makes a ``getpid()`` system call: CPython 3.11
checks that the loop it cached was not inherited across a ``fork`` (the check is gone in
3.12). ``asyncio.timeout`` costs three of them, and under load each one is a measurable share
of a cache hit (py-spy puts ``asyncio.timeout`` at about 7% of an L2 hit). :class:`LoopTimeout`
takes the loop and the task from its caller and asks for neither.

Its semantics are ``asyncio.timeout_at`` as of Python 3.12: at the deadline the task is
cancelled; leaving the block, that cancellation - and only that one - becomes ``TimeoutError``
(``Task.uncancel`` counts it back, so a cancellation from elsewhere, e.g. a client gone, still
propagates as ``CancelledError``).
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Self

__all__ = ["LoopTimeout"]


class LoopTimeout:
    """``with LoopTimeout(loop, task, when):`` - the block's task is cancelled at ``when``
    (``loop.time()`` reading), turned into ``TimeoutError`` on leaving it (module docstring).
    ``task`` must be the task running the block (``asyncio.current_task(loop)``)."""

    __slots__ = ("_cancelling", "_expired", "_handle", "_loop", "_task", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[object], when: float):
        self._loop = loop
        self._task = task
        self._when = when
        self._handle: asyncio.Handle | None = None
        self._expired = False
        self._cancelling = 0

    def __enter__(self) -> Self:
        loop = self._loop
        self._cancelling = self._task.cancelling()
        if self._when <= loop.time():
            self._handle = loop.call_soon(self._on_timeout)
        else:
            self._handle = loop.call_at(self._when, self._on_timeout)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        handle = self._handle
        if handle is not None:
            handle.cancel()
            self._handle = None
        if (
            self._expired
            and self._task.uncancel() <= self._cancelling
            and exc_type is not None
            and issubclass(exc_type, asyncio.CancelledError)
        ):
            raise TimeoutError from exc

    @property
    def expired(self) -> bool:
        """Whether the deadline passed inside the block (its cancellation was delivered)."""
        return self._expired

    def _on_timeout(self) -> None:
        self._handle = None
        self._task.cancel()
        self._expired = True
