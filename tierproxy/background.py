"""Owned, bounded background tasks, drained on shutdown.

Two lanes, each a bounded set of owned tasks:

* optional work (backfills, revalidations) - :meth:`BackgroundTasks.spawn`: when the set is
  full a new task is refused and counted, never queued: the client path must not slow down
  because a tier is slow, and a skipped backfill only costs a later miss.
* required work (invalidations: a copy that must go) - :meth:`BackgroundTasks.run_required`:
  never dropped. It runs in the background while its lane has room; when the lane is full the
  caller runs it itself and waits for it (each such write is bounded by its tier's write
  timeout), which slows down only the requests that cause such writes. A caller that should
  not answer before the work is done (``wait``) waits for it in any case, up to a bound; the
  work runs as an owned task all the same, so neither that bound nor a caller cancelled
  meanwhile stops it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from .metrics import Metrics

__all__ = ["BackgroundTasks"]

log = logging.getLogger("tierproxy.background")


class BackgroundTasks:
    def __init__(self, limit: int, metrics: Metrics, *, fetch_limit: int | None = None) -> None:
        self.limit = limit
        self.metrics = metrics
        # Origin fetches a client stopped waiting for (TIERPROXY_STALE_DEADLINE) have their
        # own lane: a slow origin must not crowd out backfills, nor backfills them.
        self.fetch_limit = limit if fetch_limit is None else fetch_limit
        self._tasks: set[asyncio.Task[Any]] = set()
        self._required: set[asyncio.Task[Any]] = set()
        self._fetches: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def pending(self) -> int:
        return len(self._tasks) + len(self._required) + len(self._fetches)

    def spawn(self, name: str, factory: Callable[[], Coroutine[Any, Any, Any]]) -> bool:
        """Run ``factory()`` in the background if there is room; False (and counted) if not.

        Takes a factory, not a coroutine, so a refused task never creates a coroutine that
        would then warn about never being awaited.
        """
        return self._spawn(self._tasks, self.limit, name, factory)

    def spawn_fetch(self, name: str, factory: Callable[[], Coroutine[Any, Any, Any]]) -> bool:
        """Like :meth:`spawn`, in the origin fetches' own lane (``fetch_limit``)."""
        return self._spawn(self._fetches, self.fetch_limit, name, factory)

    def _spawn(
        self,
        lane: set[asyncio.Task[Any]],
        limit: int,
        name: str,
        factory: Callable[[], Coroutine[Any, Any, Any]],
    ) -> bool:
        if self._closed or len(lane) >= limit:
            self.metrics.background_dropped.inc()
            log.debug("background task %s dropped: %d running in its lane", name, len(lane))
            return False
        self._start(lane, name, factory)
        return True

    async def run_required(
        self,
        name: str,
        factory: Callable[[], Coroutine[Any, Any, Any]],
        *,
        wait: float | None = None,
    ) -> bool:
        """Run ``factory()`` for sure: in the background while the required lane has room,
        else (lane full, or shutting down) right here, awaited by the caller. ``wait``: with
        room in the lane, the caller waits for it at most this many seconds (an owned task:
        neither the bound nor cancelling the caller stops it); with the lane full it runs
        inline like any other, to its end - back pressure, so callers that do not wait for
        all of it can never pile up more than the lane's limit. Returns whether it is done.

        ``factory()`` must bound its own I/O (a tier write runs under its write timeout).
        """
        if not self._closed and len(self._required) < self.limit:
            task = self._start(self._required, name, factory)
            if wait is None:
                return False
            done, _ = await asyncio.wait((task,), timeout=wait)
            return bool(done)
        self.metrics.background_inline.inc()
        log.debug("required task %s run inline: %d running", name, len(self._required))
        await self._run(name, factory(), counted=False)
        return True

    def _start(
        self,
        lane: set[asyncio.Task[Any]],
        name: str,
        factory: Callable[[], Coroutine[Any, Any, Any]],
    ) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._run(name, factory()), name=name)
        lane.add(task)
        task.add_done_callback(lane.discard)
        self.metrics.background_tasks.set(self.pending)
        return task

    async def _run(self, name: str, coro: Coroutine[Any, Any, Any], counted: bool = True) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background task %s failed", name)
        finally:
            if counted:
                self.metrics.background_tasks.set(self.pending - 1)

    async def drain(self, timeout: float) -> int:
        """Stop taking tasks, wait up to ``timeout`` for running ones, cancel the rest.

        Returns how many had to be cancelled.
        """
        self._closed = True
        running = self._tasks | self._required | self._fetches
        if not running:
            return 0
        _, still_running = await asyncio.wait(running, timeout=timeout)
        for task in still_running:
            task.cancel()
        if still_running:
            await asyncio.wait(still_running, timeout=1.0)
            log.warning(
                "shutdown: %d background tasks cancelled after %.1fs", len(still_running), timeout
            )
        return len(still_running)
