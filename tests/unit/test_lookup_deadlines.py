"""One timer per tier for its lookups' timeouts (tierproxy.tiers.base.LookupDeadlines), on a
real event loop: every lookup times out at its own deadline - never late because another
lookup, over or queued, held the timer - and a lookup that ended never times out."""

from __future__ import annotations

import asyncio
from typing import cast

from tierproxy.tiers.base import LookupDeadlines, TierLookup

SLACK = 0.05  # a loaded machine's lateness of a timer
EPSILON = 1e-6  # float rounding of the loop's clock (uvloop's counts whole ms)


class Recorded:
    """What the deadlines see of a lookup: whether it is over, and its timeout."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.over = False
        self.timed_out_at: float | None = None

    def timed_out(self) -> None:
        assert not self.over
        self.over = True
        self.timed_out_at = self.loop.time()


async def _timed(deadlines: LookupDeadlines, after: float) -> tuple[Recorded, float]:
    loop = asyncio.get_running_loop()
    lookup = Recorded(loop)
    at = loop.time() + after
    # (a timer of its own, when it needs one, is the caller's to cancel if it ends first)
    deadlines.add(cast(TierLookup, lookup), at, loop)
    return lookup, at


async def test_a_short_deadline_after_a_long_one_ended_is_not_late() -> None:
    deadlines = LookupDeadlines()
    long, _ = await _timed(deadlines, 0.5)
    long.over = True  # answered: the timer armed for it must not hold the next one
    short, at = await _timed(deadlines, 0.02)
    await asyncio.sleep(0.1)
    assert short.timed_out_at is not None and at - EPSILON <= short.timed_out_at <= at + SLACK
    assert long.timed_out_at is None


async def test_deadlines_out_of_order_each_time_out_on_time() -> None:
    deadlines = LookupDeadlines()
    first, first_at = await _timed(deadlines, 0.15)
    earlier, earlier_at = await _timed(deadlines, 0.03)  # the request's deadline cut it
    later, later_at = await _timed(deadlines, 0.2)
    await asyncio.sleep(0.3)
    for lookup, at in ((first, first_at), (earlier, earlier_at), (later, later_at)):
        assert lookup.timed_out_at is not None
        # Never early: a lookup's whole timeout is counted as waited (breaker, estimate).
        assert at - EPSILON <= lookup.timed_out_at <= at + SLACK, (lookup.timed_out_at, at)


async def test_lookups_that_ended_never_time_out_and_are_let_go() -> None:
    deadlines = LookupDeadlines()
    lookups = [(await _timed(deadlines, 0.02))[0] for _ in range(100)]
    for lookup in lookups[::2]:
        lookup.over = True
    await asyncio.sleep(0.1)
    assert [lookup.timed_out_at is not None for lookup in lookups] == [False, True] * 50
    assert deadlines.waiting == 0


class Failing(Recorded):
    def timed_out(self) -> None:
        super().timed_out()
        raise RuntimeError("a bug downstream of a timeout")


async def test_a_timeout_whose_callback_fails_strands_no_other_timeout() -> None:
    deadlines = LookupDeadlines()
    loop = asyncio.get_running_loop()
    failing = Failing(loop)
    deadlines.add(cast(TierLookup, failing), loop.time() + 0.01, loop)
    same, _ = await _timed(deadlines, 0.01)
    later, later_at = await _timed(deadlines, 0.05)
    await asyncio.sleep(0.15)
    assert failing.timed_out_at is not None and same.timed_out_at is not None
    assert (
        later.timed_out_at is not None
        and later_at - EPSILON <= later.timed_out_at <= later_at + SLACK
    )
