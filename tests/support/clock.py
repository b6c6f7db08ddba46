"""A clock tests advance instead of sleeping (see tierproxy.clock)."""

from __future__ import annotations

from tierproxy.clock import Clock

__all__ = ["SteppedClock"]


class SteppedClock(Clock):
    """The system's readings plus an offset that only :meth:`advance` moves.

    Time still passes as it does (a request's deadline, a tier timeout, asyncio's timers stay
    real); what the proxy's logic reads - freshness, stale windows, breaker cool-downs - can
    be moved ahead at once.
    """

    __slots__ = ("offset",)

    def __init__(self) -> None:
        self.offset = 0.0

    def wall(self) -> float:
        return super().wall() + self.offset

    def monotonic(self) -> float:
        return super().monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock is advanced, never set back")
        self.offset += seconds

    def advance_to(self, when: float) -> None:
        """Advance until ``wall()`` reads at least ``when`` (e.g. past an entry's freshness)."""
        self.advance(max(0.0, when - self.wall()))
