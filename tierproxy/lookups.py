"""One tier's lookup for a request, and the hedged lookup of two tiers.

The orchestrator (:mod:`tierproxy.readthrough`) walks the tiers in order with these: each
lookup under min(the tier's timeout, what is left of the request deadline), its duration in
the request's timings. With ``TIERPROXY_HEDGE=on``, a tier that has not answered by its
recent p95 gets the next tier asked alongside (:func:`hedged`).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from .states import ProxyRequest, freshness

if TYPE_CHECKING:
    from prometheus_client import Counter

    from .clock import Clock
    from .entry import Entry
    from .tiers.base import GuardedTier

__all__ = ["hedged", "tier_get"]


async def tier_get(
    req: ProxyRequest, tier: GuardedTier, loop: asyncio.AbstractEventLoop
) -> Entry | None:
    """``tier``'s lookup under min(its timeout, what is left of the request deadline)."""
    budget = min(tier.read_timeout, req.deadline - loop.time())
    started = time.perf_counter()  # (uvloop's loop clock has ms resolution)
    entry = await tier.get(req.key, budget, req.headers)
    req.timings[tier.name] = time.perf_counter() - started
    return entry


async def hedged(
    req: ProxyRequest,
    first_tier: GuardedTier,
    second_tier: GuardedTier,
    after: float,
    clock: Clock,
    hedges: Counter,
) -> tuple[Entry | None, int]:
    """``first_tier``, and ``second_tier`` too once the first has not answered within
    ``after`` (its recent p95). Returns the copy the lookup goes on with and 0 when it came
    from the first tier, 1 from the second (1 with None: both missed, go on after them).

    Only a fresh copy from the second tier answers before the first tier has: the first
    tier's copy, fresh or stale, is preferred otherwise, as without hedging. The lookup no
    longer needed is cancelled (a cancelled L2 GET keeps its place on the pipelined
    connection and its late reply is dropped; a cancelled L3 read finishes or meets its own
    deadline in the reader's thread, its row dropped). Counted in ``hedges``: ``started``
    when the second tier is asked, ``won`` when its answer is the one served.
    """
    loop = asyncio.get_running_loop()
    first = asyncio.ensure_future(tier_get(req, first_tier, loop))
    second: asyncio.Future[Entry | None] | None = None
    try:
        done, _ = await asyncio.wait((first,), timeout=after)
        if not done:
            hedges.labels("started").inc()
            second = asyncio.ensure_future(tier_get(req, second_tier, loop))
            await asyncio.wait((first, second), return_when=asyncio.FIRST_COMPLETED)
            if not first.done():  # the second tier answered first
                entry = second.result()
                if entry is not None and freshness(entry, clock.wall()) == "fresh":
                    hedges.labels("won").inc()
                    return entry, 1
                await asyncio.wait((first,))
        entry = first.result()
        if entry is not None:
            return entry, 0
        if second is None:  # not hedged: the second tier is looked up as ever
            return None, 0
        await asyncio.wait((second,))
        return second.result(), 1
    finally:
        for lookup in (first, second):
            if lookup is not None and not lookup.done():
                lookup.cancel()
