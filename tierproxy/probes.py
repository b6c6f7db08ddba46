"""Active health probes: a tier whose lookups' breaker is open is probed in the background.

Without them a breaker closes only when a client request, after the cool-down, is let
through as the half-open probe - and that request pays for finding out (a timeout when the
tier is still down). :class:`Prober` owns one task, started once the tiers are open and
stopped before they close (``tierproxy.server``'s resources). It wakes at jittered intervals
- uniform in [``MIN_INTERVAL``, ``TIERPROXY_BREAKER_COOLDOWN`` / 4], "full jitter", so the
replicas sharing a Redis do not probe it in step - and probes every tier whose lookups'
breaker is open with :meth:`~tierproxy.tiers.base.GuardedTier.probe`: the backend's ``ping``
(Redis PING on both of its connections, a SQLite read) under the tier's configured read
timeout. The first probe that answers closes the breaker, so the next request uses the tier
again. The client-request half-open probe stays as it was, for a tier found down longer than
a cool-down.

Writes' breakers are not probed: a write fails for reasons a read cannot see (a full disk),
and writes find out for themselves (``tierproxy_breaker_open{tier="<tier>-writes"}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tiers.base import GuardedTier

__all__ = ["MIN_INTERVAL", "Prober"]

log = logging.getLogger("tierproxy.probes")

#: The shortest wait between two rounds: a tiny cool-down must not become a busy loop.
MIN_INTERVAL = 0.02


class Prober:
    """Probes the tiers in ``tiers`` whose lookups' breaker is open, every
    uniform(MIN_INTERVAL, ``cooldown`` / 4) seconds, until :meth:`stop`."""

    def __init__(
        self,
        tiers: Sequence[GuardedTier],
        cooldown: float,
        *,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        # Memory tiers never time out or break: nothing to probe.
        self.tiers = [tier for tier in tiers if not tier.synchronous]
        self.longest = max(MIN_INTERVAL, cooldown / 4)
        self._jitter = jitter
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0

    def interval(self) -> float:
        """The wait before the next round: full jitter, bounded below by MIN_INTERVAL."""
        return MIN_INTERVAL + self._jitter() * (self.longest - MIN_INTERVAL)

    def start(self) -> None:
        """Start the probing task (once; nothing to do without a tier that can break)."""
        if self._task is None and self.tiers:
            self._stopping.clear()
            self._task = asyncio.create_task(self._run(), name="tierproxy-probes")

    async def stop(self) -> None:
        """Stop probing; returns once the task has ended (a probe in flight is cancelled)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        # Runs until stop(): every round is bounded (each probe by its tier's read timeout).
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval()):
                    await self._stopping.wait()
            if self._stopping.is_set():
                return
            due = [tier for tier in self.tiers if tier.probe_due()]
            if due:
                self.rounds += 1
                try:
                    await asyncio.gather(*(tier.probe() for tier in due))
                except Exception:  # a bug in one round must not end the probes
                    log.exception("health probe round failed")
