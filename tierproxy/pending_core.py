# TEMP until core lands: the whole module goes at merge.
"""TEMP until core lands: ReadThrough's API as the edge expects it (tierproxy.states types).

The orchestrator on this branch still returns ``Cached``/``Forwarded``/``Failed`` and its own
``Lookup``; the core rewrite returns the final states of :mod:`tierproxy.states` and
``states.Lookup``. The edge calls ``lookup``/``get``/``forward`` here with the new types; at
merge each call ``pending_core.get(rt, req, found)`` becomes ``rt.get(req, found)`` (likewise
``lookup``, ``forward``) and this module is deleted.
"""

from __future__ import annotations

import re
import time
from typing import Any, cast

from . import readthrough as old
from . import states
from .states import Failed, Fetched, Final, FreshHit, Lookup, Relayed, StaleHit

__all__ = ["forward", "get", "lookup"]

_FWD = re.compile(r"fwd=([a-z-]+)")
_DETAIL = re.compile(r'detail="((?:[^"\\]|\\.)*)"')


def _fwd(cache_status: str) -> str:
    match = _FWD.search(cache_status)
    return match.group(1) if match else "miss"


def _detail(cache_status: str) -> str | None:
    match = _DETAIL.search(cache_status)
    return match.group(1).replace('\\"', '"').replace("\\\\", "\\") if match else None


def _final(result: old.Result) -> Final:
    if isinstance(result, old.Cached):
        x_cache, member = result.x_cache, result.cache_status
        if x_cache.startswith("HIT-"):
            return FreshHit(x_cache[4:].lower(), result.entry)
        if x_cache.startswith("STALE-"):
            return StaleHit(x_cache[6:].lower(), result.entry, _detail(member) or "")
        return Fetched(
            result.entry, _fwd(member), x_cache == "REVALIDATED", member.endswith("; collapsed")
        )
    if isinstance(result, old.Forwarded):
        return Relayed(result.response, _fwd(result.cache_status), _detail(result.cache_status))
    return Failed(result.status, result.reason, _fwd(result.cache_status))


async def lookup(rt: old.ReadThrough, req: states.ProxyRequest) -> Lookup:
    found = await rt.lookup(cast(Any, req))
    result: states.FreshHit | states.NeedsRevalidation | states.Miss = states.MISS
    if found.hit is not None:
        hit = _final(found.hit)
        assert isinstance(hit, FreshHit)
        result = hit
    elif found.stale is not None:
        result = states.NeedsRevalidation(rt.tiers[found.stale_index].name, found.stale)
    return Lookup(result, found.generation, found.since)


def _old_lookup(rt: old.ReadThrough, found: Lookup) -> old.Lookup:
    names = [tier.name for tier in rt.tiers]
    match found.found:
        case FreshHit(tier, entry):
            x_cache, member = states.labels(found.found, time.time())
            return old.Lookup(
                old.Cached(entry, x_cache, member), None, 0, found.generation, found.since
            )
        case states.NeedsRevalidation(tier, entry):
            return old.Lookup(None, entry, names.index(tier), found.generation, found.since)
        case _:
            return old.Lookup(None, None, 0, found.generation, found.since)


async def get(rt: old.ReadThrough, req: states.ProxyRequest, found: Lookup | None = None) -> Final:
    old_found = None if found is None else _old_lookup(rt, found)
    return _final(await rt.get(cast(Any, req), old_found))


async def forward(rt: old.ReadThrough, req: states.ProxyRequest) -> Relayed | Failed:
    final = _final(await rt.forward(cast(Any, req)))
    assert isinstance(final, (Relayed, Failed))
    return final
