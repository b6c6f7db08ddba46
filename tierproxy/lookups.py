"""One tier's lookup for a request, and the hedged lookup of two tiers.

The orchestrator (:mod:`tierproxy.readthrough`) walks the tiers in order with these: each
lookup under min(the tier's timeout, what is left of the request deadline), its duration in
the request's timings. With ``TIERPROXY_HEDGE=on``, a tier that has not answered by its
recent p95 gets the next tier asked alongside (:func:`hedged`). Each says what the tier
held or why it did not answer, for the request's :data:`~tierproxy.states.Trace`.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from .states import ProxyRequest, freshness
from .tiers.base import MISS_REASON

if TYPE_CHECKING:
    from prometheus_client import Counter

    from .clock import Clock
    from .entry import Entry
    from .tiers.base import GuardedTier

__all__ = ["Looked", "hedged", "outcome", "tier_get"]

#: A tier's lookup: the copy it returned, or None and why (``MISS_REASON``; "" with a copy).
Looked = tuple["Entry | None", str]


async def tier_get(req: ProxyRequest, tier: GuardedTier, loop: asyncio.AbstractEventLoop) -> Looked:
    """``tier``'s lookup under min(its timeout, what is left of the request deadline)."""
    budget = min(tier.read_timeout, req.deadline - loop.time())
    started = time.perf_counter()  # (uvloop's loop clock has ms resolution)
    entry = await tier.get(req.key, budget, req.headers, loop)
    req.timings[tier.name] = time.perf_counter() - started
    return entry, "" if entry is not None else MISS_REASON.get()


def outcome(looked: Looked, now: float) -> str:
    """The trace outcome of a lookup: ``hit`` / ``stale`` for a copy (an expired one, read
    past its end, is a ``uri-miss``), else why there was none."""
    entry, why = looked
    if entry is None:
        return why
    state = freshness(entry, now)
    return "hit" if state == "fresh" else "stale" if state == "stale" else "uri-miss"


async def hedged(
    req: ProxyRequest,
    first_tier: GuardedTier,
    second_tier: GuardedTier,
    after: float,
    clock: Clock,
    hedges: Counter,
) -> tuple[Entry | None, int, tuple[str, ...]]:
    """``first_tier``, and ``second_tier`` too once the first has not answered within
    ``after`` (its recent p95). Returns the copy the lookup goes on with and 0 when it came
    from the first tier, 1 from the second (1 with None: both missed, go on after them), and
    the trace outcome (:func:`outcome`) of each tier asked - ``cancelled`` for a lookup no
    longer needed.

    Only a fresh copy from the second tier answers before the first tier has: the first
    tier's copy, fresh or stale, is preferred otherwise, as without hedging. The lookup no
    longer needed is cancelled (a cancelled L2 GET keeps its place on the pipelined
    connection and its late reply is dropped; a cancelled L3 read finishes or meets its own
    deadline in the reader's thread, its row dropped). Counted in ``hedges``: ``started``
    when the second tier is asked, ``won`` when its answer is the one served.
    """
    loop = asyncio.get_running_loop()
    first = asyncio.ensure_future(tier_get(req, first_tier, loop))
    second: asyncio.Future[Looked] | None = None

    def said(lookup: asyncio.Future[Looked]) -> str:
        return outcome(lookup.result(), clock.wall()) if lookup.done() else "cancelled"

    try:
        done, _ = await asyncio.wait((first,), timeout=after)
        if not done:
            hedges.labels("started").inc()
            second = asyncio.ensure_future(tier_get(req, second_tier, loop))
            await asyncio.wait((first, second), return_when=asyncio.FIRST_COMPLETED)
            if not first.done():  # the second tier answered first
                entry = second.result()[0]
                if entry is not None and freshness(entry, clock.wall()) == "fresh":
                    hedges.labels("won").inc()
                    return entry, 1, ("cancelled", "hit")
                await asyncio.wait((first,))
        entry = first.result()[0]
        if second is None:  # not hedged: on a miss the second tier is looked up as ever
            return entry, 0, (said(first),)
        if entry is not None:
            return entry, 0, (said(first), said(second))
        await asyncio.wait((second,))
        return second.result()[0], 1, (said(first), said(second))
    finally:
        for lookup in (first, second):
            if lookup is not None and not lookup.done():
                lookup.cancel()
