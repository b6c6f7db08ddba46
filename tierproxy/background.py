"""Owned, bounded background tasks (backfills, revalidations), drained on shutdown.

Every task is referenced until it ends; when the set is full a new task is refused and
counted, never queued: the client path must not slow down because a tier is slow.
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
    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.metrics = metrics
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def spawn(self, name: str, factory: Callable[[], Coroutine[Any, Any, Any]]) -> bool:
        """Run ``factory()`` in the background if there is room; False (and counted) if not.

        Takes a factory, not a coroutine, so a refused task never creates a coroutine that
        would then warn about never being awaited.
        """
        if self._closed or len(self._tasks) >= self.limit:
            self.metrics.background_dropped.inc()
            log.debug("background task %s dropped: %d running", name, len(self._tasks))
            return False
        task = asyncio.get_running_loop().create_task(self._run(name, factory()), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.metrics.background_tasks.set(len(self._tasks))
        return True

    async def _run(self, name: str, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background task %s failed", name)
        finally:
            self.metrics.background_tasks.set(len(self._tasks) - 1)

    async def drain(self, timeout: float) -> int:
        """Stop taking tasks, wait up to ``timeout`` for running ones, cancel the rest.

        Returns how many had to be cancelled.
        """
        self._closed = True
        if not self._tasks:
            return 0
        _, still_running = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in still_running:
            task.cancel()
        if still_running:
            await asyncio.wait(still_running, timeout=1.0)
            log.warning("shutdown: %d background tasks cancelled after %.1fs",
                        len(still_running), timeout)
        return len(still_running)
