"""Backing off from an origin that keeps failing: jittered exponential intervals.

* :func:`full_jitter` - the pause before retrying a request whose origin connection failed
  before any response byte (:mod:`tierproxy.upstream`): ``uniform(0, min(cap, base * 2**n))``,
  so clients that failed together do not retry together.
* :class:`SessionBackoff` - the pause before starting again a long-lived session that ended
  (a pub/sub subscription, a worker process): equal jitter, the window doubling with each
  session that ended early, back to the first once one lasted.
* :class:`KeyBackoff` - per cache key, while the origin keeps failing for it (as many
  consecutive failures as open the origin's breaker, TIERPROXY_BREAKER_FAILURES: a per-key
  breaker, for the key that fails while the others succeed and keep the breaker closed): at
  most one origin attempt per key per interval (exponential, jittered, capped), the stale
  copy served meanwhile (``StaleHit("origin-backoff")``, :func:`tierproxy.states.on_stale`).
  Bounded: at most ``limit`` keys, the least recently failed dropped first; a key's record
  goes at its first success.

Intervals are read on the injected clock's monotonic reading (:mod:`tierproxy.clock`).
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass

from .clock import SYSTEM, Clock

__all__ = ["KeyBackoff", "SessionBackoff", "equal_jitter", "full_jitter"]


def _window(attempt: int, base: float, cap: float) -> float:
    """``min(cap, base * 2**attempt)``: the exponentially growing, capped window."""
    return min(cap, base * (2.0 ** min(attempt, 32)))


def full_jitter(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """The pause before retry number ``attempt`` (0 for the first): full jitter over an
    exponentially growing, capped window."""
    return (rng or random).uniform(0.0, _window(attempt, base, cap))


def equal_jitter(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Between half of the window and all of it: never near 0, still spread (the pause
    bounds how often something is tried, and peers that failed together do not retry
    together)."""
    window = _window(attempt, base, cap)
    return window / 2 + (rng or random).uniform(0.0, window / 2)


@dataclass(slots=True)
class SessionBackoff:
    """Pauses between the runs of a session that should last (a subscription, a worker):
    :func:`equal_jitter` over a window that doubles with each run ending sooner than
    ``stable_after`` seconds; a run that lasted that long starts over at the first window."""

    base: float
    cap: float
    stable_after: float = 10.0
    #: Runs in a row that ended early (0 before the first pause of an episode).
    attempt: int = 0

    def pause(self, lived: float) -> float:
        """The pause after a run that lasted ``lived`` seconds."""
        if lived >= self.stable_after:
            self.attempt = 0
        delay = equal_jitter(self.attempt, self.base, self.cap)
        self.attempt += 1
        return delay


@dataclass(slots=True)
class _Failing:
    failures: int  # consecutive failed origin attempts for the key
    until: float  # monotonic: no origin attempt for the key before this


class KeyBackoff:
    """Per-key origin backoff (see module).

    From ``threshold`` consecutive failures on, the interval after ``n`` of them is
    ``min(cap, base * 2**(n - threshold))``, with "equal jitter": between half of it and all
    of it. (Full jitter could draw an interval near 0, and the interval is what bounds the
    attempts per key.)
    """

    def __init__(
        self,
        *,
        threshold: int = 1,
        base: float = 0.5,
        cap: float = 30.0,
        limit: int = 10_000,
        clock: Clock = SYSTEM,
        rng: random.Random | None = None,
    ) -> None:
        self.threshold, self.base, self.cap = threshold, base, cap
        self.limit, self.clock = limit, clock
        self._rng = rng or random.Random()
        self._failing: collections.OrderedDict[str, _Failing] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._failing)

    def allow(self, key: str) -> bool:
        """Whether the origin may be asked for ``key`` now (no side effect: concurrent
        requests for one key share one fetch, tierproxy.coalescer)."""
        record = self._failing.get(key)
        return record is None or self.clock.monotonic() >= record.until

    def failure(self, key: str) -> float:
        """The origin failed for ``key``: from ``threshold`` consecutive failures on, no
        attempt for it before the next interval ends. Returns that interval (0: none yet)."""
        record = self._failing.pop(key, None)
        failures = 1 if record is None else record.failures + 1
        interval = 0.0
        if failures >= self.threshold:
            interval = equal_jitter(failures - self.threshold, self.base, self.cap, self._rng)
        self._failing[key] = _Failing(failures, self.clock.monotonic() + interval)
        while len(self._failing) > self.limit:
            self._failing.popitem(last=False)  # the least recently failed key
        return interval

    def success(self, key: str) -> None:
        """The origin answered for ``key``: its backoff is over."""
        if self._failing:
            self._failing.pop(key, None)
