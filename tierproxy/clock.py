"""Time as tierproxy's logic reads it: one injected clock, two readings.

* ``wall()`` - seconds since the epoch. Freshness lifetimes, ages and stale windows are
  defined on dates (RFC 9111 §4.2), so every freshness decision reads this.
* ``monotonic()`` - seconds on a clock that never steps back: breaker cool-downs, backoff,
  how long ago something happened.

Components take a :class:`Clock` (default :data:`SYSTEM`) instead of calling :mod:`time`, so a
test can hand them one it advances (tests/support/clock.py) rather than sleeping until a
response goes stale or a breaker cools down.

Not covered, on purpose: request deadlines and per-tier timeouts stay on the event loop's
clock (``asyncio.timeout`` waits in real time), and durations measured for logs and
histograms use ``time.perf_counter``. Those are real timing, not logic. Storage expiry is
real time too: a Redis TTL and SQLite's sweeps of expired rows only decide when a copy is
dropped, never whether one is served (every tier classifies a copy as fresh, stale or
expired on this clock), and the purge lease is compared with Redis's own clock.
"""

from __future__ import annotations

import time

__all__ = ["SYSTEM", "Clock"]


class Clock:
    """The system clock. Subclasses override both readings together."""

    __slots__ = ()

    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


#: The clock of a running proxy.
SYSTEM = Clock()
