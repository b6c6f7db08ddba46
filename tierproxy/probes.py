"""Active health probes: a tier whose lookups' breaker is open is probed in the background.

Without them a breaker closes only when a client request, after the cool-down, is let
through as the half-open probe - and that request pays for finding out (a timeout when the
tier is still down). :class:`Prober` owns one task, started once the tiers are open and
stopped before they close (``tierproxy.server``'s resources). It looks at the tiers at short
jittered intervals (uniform in [``MIN_INTERVAL``, ``TICK``], never longer than the first
backoff window) and probes each tier whose lookups' breaker is open and whose next probe is
due, with :meth:`~tierproxy.tiers.base.GuardedTier.probe`: the backend's ``ping`` (Redis PING
on both of its connections, a SQLite read) under the tier's configured read timeout. The
first probe that answers closes the breaker, so the next request uses the tier again. With
adaptive timeouts its answer also lifts the tier's learned lookup timeout to at least 1.5
times the probe's latency (:mod:`tierproxy.latency`): a tier that slowed down past its
learned timeout is used again, under a timeout it can meet, after one breaker trip.

Backoff. The first probe of a tier goes at the first look after its breaker opened; after
``n`` consecutive failed probes the next one waits ``equal_jitter(n - 1, base, cap)``
(:mod:`tierproxy.backoff`: between half of ``min(cap, base * 2**(n-1))`` and all of it, so
the replicas sharing a Redis do not probe it in step), with ``base`` =
``TIERPROXY_BREAKER_COOLDOWN`` / 8 and ``cap`` = the cool-down / 2. A probe that answers
ends the backoff. Capped at half a cool-down because a failed probe re-arms the lookups'
breaker cool-down (:meth:`~tierproxy.tiers.base.Breaker.rearm`): while the probes keep
failing no client request is let through as the half-open probe, and a tier that comes back
is found within half a cool-down. Due times are read on the tiers' injected clock
(:mod:`tierproxy.clock`); the looks themselves wait in real time.

Exported per tier: ``tierproxy_tier_probes_total{tier,outcome}``, the gauges
``tierproxy_tier_probe_failures{tier}`` (consecutive failed probes, 0 when not backing off)
and ``tierproxy_tier_probe_backoff_seconds{tier}`` (the wait drawn before the next probe).
Logged once per change: the first failed probe of a streak, and the probe that answers.

Writes' breakers are not probed: a write fails for reasons a read cannot see (a full disk),
and writes find out for themselves (``tierproxy_breaker_open{tier="<tier>-writes"}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .backoff import equal_jitter

if TYPE_CHECKING:
    from .tiers.base import GuardedTier

__all__ = ["MIN_INTERVAL", "TICK", "Prober"]

log = logging.getLogger("tierproxy.probes")

#: The shortest wait between two looks: a tiny cool-down must not become a busy loop.
MIN_INTERVAL = 0.02
#: The longest real wait between two looks at the tiers (a look reads a few attributes).
TICK = 0.25


@dataclass(slots=True)
class _Streak:
    """A tier's failed probes in a row."""

    failures: int = 0
    due: float = 0.0  # the tier clock's monotonic reading: no probe before
    since: float = 0.0  # when the first of them failed


class Prober:
    """Probes the tiers in ``tiers`` whose lookups' breaker is open, backing off per tier
    while its probes fail (see module), until :meth:`stop`."""

    def __init__(
        self,
        tiers: Sequence[GuardedTier],
        cooldown: float,
        *,
        rng: random.Random | None = None,
    ) -> None:
        # Memory tiers never time out or break: nothing to probe.
        self.tiers = [tier for tier in tiers if not tier.synchronous]
        self.base = max(MIN_INTERVAL, cooldown / 8)
        self.cap = max(self.base, cooldown / 2)
        self.longest = max(MIN_INTERVAL, min(TICK, self.base))
        self._rng = rng or random.Random()
        self._streaks: dict[str, _Streak] = {}
        for tier in self.tiers:  # exported from the start, at 0
            tier.metrics.tier_probe_failures.labels(tier.name).set(0)
            tier.metrics.tier_probe_backoff.labels(tier.name).set(0)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0

    def interval(self) -> float:
        """The wait before the next look: full jitter, bounded below by MIN_INTERVAL."""
        return self._rng.uniform(MIN_INTERVAL, self.longest)

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

    def due(self) -> list[GuardedTier]:
        """The tiers to probe now: breaker open, storage there, backoff over."""
        due = []
        for tier in self.tiers:
            streak = self._streaks.get(tier.name)
            if not tier.breaker.is_open:
                if streak is not None:  # closed by a request's half-open probe
                    self._end(tier, streak, None)
                continue
            if tier.probe_due() and (streak is None or tier.clock.monotonic() >= streak.due):
                due.append(tier)
        return due

    async def _probe(self, tier: GuardedTier) -> None:
        outcome = await tier.probe()
        streak = self._streaks.get(tier.name)
        if outcome == "ok":
            if streak is not None:
                self._end(tier, streak, outcome)
            return
        if outcome == "skipped":  # the storage is being reopened: not the tier's answer
            return
        now = tier.clock.monotonic()
        if streak is None:
            streak = self._streaks[tier.name] = _Streak(since=now)
        streak.failures += 1
        wait = equal_jitter(streak.failures - 1, self.base, self.cap, self._rng)
        streak.due = now + wait
        metrics = tier.metrics
        metrics.tier_probe_failures.labels(tier.name).set(streak.failures)
        metrics.tier_probe_backoff.labels(tier.name).set(wait)
        if streak.failures == 1:
            log.warning(
                "%s probe %s: probing again with backoff (%.2f s doubling up to %.2f s, "
                "jittered) until it answers",
                tier.name,
                outcome,
                self.base,
                self.cap,
            )

    def _end(self, tier: GuardedTier, streak: _Streak, outcome: str | None) -> None:
        """The tier answered (or a request found it back): its backoff is over."""
        del self._streaks[tier.name]
        tier.metrics.tier_probe_failures.labels(tier.name).set(0)
        tier.metrics.tier_probe_backoff.labels(tier.name).set(0)
        # A probe that answers logs the breaker's closing itself (GuardedTier.probe).
        log.log(
            logging.INFO if outcome == "ok" else logging.WARNING,
            "%s probes' backoff over after %d failed probes in %.1f s (%s)",
            tier.name,
            streak.failures,
            tier.clock.monotonic() - streak.since,
            "a probe answered" if outcome == "ok" else "a request found the tier back",
        )

    async def _run(self) -> None:
        # Runs until stop(): every round is bounded (each probe by its tier's read timeout).
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval()):
                    await self._stopping.wait()
            if self._stopping.is_set():
                return
            due = self.due()
            if due:
                self.rounds += 1
                try:
                    await asyncio.gather(*(self._probe(tier) for tier in due))
                except Exception:  # a bug in one round must not end the probes
                    log.exception("health probe round failed")
