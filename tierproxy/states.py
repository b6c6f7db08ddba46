"""The states of a cacheable request, and the pure decisions between them.

Nothing here does I/O or reads a clock: every function takes ``now`` (wall clock, seconds).
The orchestrator (:mod:`tierproxy.readthrough`) moves a request through these states; the
response writer turns the final one into ``X-Cache`` and ``Cache-Status`` (:func:`labels`).

    lookup ─► FreshHit(tier) ─────────────────────────────────────────► final
           ├► NeedsRevalidation(tier, stale copy) ─► on_stale():
           │      StaleHit("revalidating")    within stale-while-revalidate (RFC 5861 §3)
           │      StaleHit("origin-down")     the origin's breaker is open
           │      StaleHit("origin-backoff")  this key's fetches keep failing: backing off
           │      NeedsRevalidation           ask the origin, conditionally (RFC 9111 §4.3.1)
           └► Miss ─► fetch
    fetch ─► Fetched (stored, or freshened by a 304) | Relayed (not stored)
          ├► still no answer at TIERPROXY_STALE_DEADLINE ─► StaleHit("origin-slow")
          ├► shed: too many requests need the origin (TIERPROXY_MAX_INFLIGHT) ─► the stale
          │        copy (StaleHit("shed")) when it may serve, else Failed(503, "shed")
          └► origin failed ─► StaleHit(reason) when the copy may serve (RFC 9111 §4.2.4,
                              RFC 5861 §4) ─ else Relayed (its 5xx) or Failed
    not cacheable ─► forwarded ─► Relayed | Failed
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, assert_never

from multidict import CIMultiDictProxy

if TYPE_CHECKING:
    from .entry import Entry, Headers
    from .keys import CacheKey
    from .origin import OriginResponse

__all__ = [
    "FAILED_STATUS",
    "Failed",
    "Fetched",
    "Final",
    "FreshHit",
    "Lookup",
    "Miss",
    "NeedsRevalidation",
    "OriginFailed",
    "Outcome",
    "ProxyRequest",
    "Relayed",
    "StaleHit",
    "Stored",
    "Unstorable",
    "after_fetch",
    "cache_status_member",
    "freshness",
    "labels",
    "on_stale",
    "stale_at_deadline",
    "stale_usable",
]


@dataclass(slots=True)
class ProxyRequest:
    """One client request as the orchestrator sees it."""

    method: str
    key: CacheKey
    headers: CIMultiDictProxy[str]
    peer: str | None
    scheme: str
    deadline: float  # event-loop clock: the request's whole budget ends here
    body: bytes | None = None
    timings: dict[str, float] = field(default_factory=dict)  # tier/origin -> seconds
    request_id: str = ""  # X-Request-ID, forwarded to the origin


# ---- what the tiers held ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FreshHit:
    """A fresh copy from ``tier`` (``"l1"``, ``"l2"``, ...): served as it is."""

    tier: str
    entry: Entry


@dataclass(frozen=True, slots=True)
class NeedsRevalidation:
    """A copy from ``tier`` past its freshness but not expired: what to do with it is
    :func:`on_stale`'s decision; when the origin is asked, it is asked conditionally."""

    tier: str
    entry: Entry


@dataclass(frozen=True, slots=True)
class Miss:
    """No usable copy in any tier."""


MISS = Miss()


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the tiers held for one request, and when the lookup began.

    ``generation`` is the purge generation then (a copy read before a purge is not written
    back); ``since`` the count of completed fetches then (one completed later may hold the
    entry the lookup missed).
    """

    found: FreshHit | NeedsRevalidation | Miss
    generation: int
    since: int


# ---- final states: what the client gets ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class StaleHit:
    """A copy past its freshness, served. ``reason``: ``revalidating`` (refreshed in the
    background), ``origin-down`` (breaker open), ``origin-backoff`` (this key's fetches keep
    failing), ``origin-slow`` (no answer by TIERPROXY_STALE_DEADLINE; the fetch goes on), or
    the origin's failure (``origin-timeout``, ``origin-error``, ``origin-5xx``,
    ``origin-busy``, ``shed``, ``local-error``)."""

    tier: str
    entry: Entry
    reason: str


@dataclass(frozen=True, slots=True)
class Fetched:
    """The origin's answer, stored (``revalidated``: a 304 that freshened the stored copy).
    ``fwd`` is ``miss`` or ``stale`` (RFC 9211 §2.2: why the origin was asked)."""

    entry: Entry
    fwd: str
    revalidated: bool = False
    collapsed: bool = False  # shared with a fetch another request made


@dataclass(frozen=True, slots=True)
class Relayed:
    """The origin's response, passed on without being stored.

    ``fwd``: ``miss`` / ``stale`` (cacheable, but this response was not stored), or
    ``bypass`` / ``method`` (a request the cache does not answer). ``detail``: why it was
    not stored (a policy reason, or ``origin-5xx``), None for a bypassed request.
    """

    response: OriginResponse
    fwd: str
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    """Nothing to serve: ``status`` with a plain-text reason (``origin-timeout`` 504,
    ``origin-error`` 502, ``origin-busy`` 503, ``shed`` 503, ``local-error`` 500)."""

    status: int
    reason: str
    fwd: str


Final = FreshHit | StaleHit | Fetched | Relayed | Failed


# ---- what one origin fetch ended with (shared between coalesced requests) ----------------


@dataclass(frozen=True, slots=True)
class Stored:
    """The origin's answer as an entry every matching request may have.

    ``revalidated``: a 304 answered a conditional request for a stored copy. ``keep``: the
    entry is to be written to the tiers; False for a copy a 304 could not freshen (it is still
    this request's answer, but the stored copy is invalidated instead).
    """

    entry: Entry
    revalidated: bool
    keep: bool = True
    # The origin's headers for the request that made the fetch, when the stored copy left
    # fields out (a qualified private / no-cache, RFC 9111 §5.2.2.4, §5.2.2.7): that client
    # gets them; every other request gets the stored copy.
    own_headers: Headers | None = None


@dataclass(frozen=True, slots=True)
class Unstorable:
    """A response the cache may not store: passed on to the one client that asked.
    ``invalidates``: the stored copy it replaces must go (RFC 9111 §4.4)."""

    response: OriginResponse
    reason: str
    invalidates: bool = False


@dataclass(frozen=True, slots=True)
class OriginFailed:
    """The origin did not answer usably: ``reason`` is ``origin-timeout``, ``origin-error``,
    ``origin-5xx`` (``response`` holds that 5xx), ``origin-busy`` or ``local-error``; or
    ``origin-slow``: this request stopped waiting at its stale deadline (the fetch goes on);
    or ``shed``: the origin was not asked, too many requests needed it (TIERPROXY_MAX_INFLIGHT).
    """

    reason: str
    response: OriginResponse | None = None


Outcome = Stored | Unstorable | OriginFailed

#: An :class:`OriginFailed` reason -> the status when no stale copy can stand in (else 502).
FAILED_STATUS = {
    "origin-timeout": 504,
    "origin-slow": 504,
    "origin-busy": 503,
    "shed": 503,
    "local-error": 500,
}


# ---- pure decisions -----------------------------------------------------------------------


def freshness(entry: Entry, now: float) -> str:
    """``fresh``, ``stale`` (past its freshness, still usable: RFC 9111 §4.2.4) or ``expired``."""
    if now < entry.fresh_until:
        return "fresh"
    if now < entry.expires_at:
        return "stale"
    return "expired"


def on_stale(
    copy: NeedsRevalidation, now: float, origin_allowed: bool, key_allowed: bool = True
) -> StaleHit | NeedsRevalidation:
    """A stale copy in hand: serve it now, or ask the origin.

    Within stale-while-revalidate the copy is served and refreshed in the background
    (RFC 5861 §3). While the origin's breaker is open (``origin_allowed`` False), or while
    this key's fetches keep failing and its backoff interval runs (``key_allowed`` False), it
    is served if it may be on an error (stale-if-error or the configured max-stale: RFC 5861
    §4), without asking the origin again. Otherwise the origin is asked.
    """
    entry = copy.entry
    if now < entry.swr_until:
        return StaleHit(copy.tier, entry, "revalidating")
    if not origin_allowed and stale_usable(entry, now):
        return StaleHit(copy.tier, entry, "origin-down")
    if not key_allowed and stale_usable(entry, now):
        return StaleHit(copy.tier, entry, "origin-backoff")
    return copy


def stale_at_deadline(entry: Entry, now: float, stale_deadline: float) -> bool:
    """Whether a request asking the origin to revalidate ``entry`` stops waiting at its
    stale deadline (TIERPROXY_STALE_DEADLINE, 0 = off) and is served the stale copy: only
    a copy that may stand in for a failed origin (RFC 5861 §4) may stand in for a slow one.
    """
    return stale_deadline > 0 and stale_usable(entry, now)


def stale_usable(entry: Entry, now: float) -> bool:
    """Whether a stale copy may stand in for an origin that failed (RFC 5861 §4)."""
    return now < entry.stale_until


def after_fetch(
    outcome: Outcome, stale: NeedsRevalidation | None, now: float, collapsed: bool = False
) -> Final:
    """What the client gets from a fetch's ``outcome``; ``stale`` is the copy the request held.

    A stored answer is served; an unstorable one is relayed. When the origin failed, a stale
    copy still within its stale limits beats an error (RFC 9111 §4.2.4, RFC 5861 §4); else the
    origin's 5xx is relayed, or the request fails with the reason's status.
    """
    fwd = "miss" if stale is None else "stale"
    match outcome:
        case Stored(entry, revalidated, _, own_headers):
            if own_headers is not None and not collapsed:
                entry = replace(entry, headers=own_headers)
            return Fetched(entry, fwd, revalidated, collapsed)
        case Unstorable(response, reason, _):
            return Relayed(response, fwd, reason)
        case OriginFailed(reason, response):
            if stale is not None and stale_usable(stale.entry, now):
                return StaleHit(stale.tier, stale.entry, reason)
            if response is not None:
                return Relayed(response, fwd, reason)
            return Failed(FAILED_STATUS.get(reason, 502), reason, fwd)
        case _:
            assert_never(outcome)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cache_status_member(final: Final, now: float) -> str:
    """tierproxy's own ``Cache-Status`` member for ``final`` (RFC 9211 §2)."""
    match final:
        case FreshHit(tier, entry):
            # Fresh when it was found; the response may be written a moment later (the full
            # path reads the clock again), past its freshness: a hit's ttl is never negative.
            ttl = max(0, math.floor(entry.fresh_until - now))
            return f"tierproxy; hit; ttl={ttl}; detail={tier}"
        case StaleHit(_, entry, reason):
            ttl = math.floor(entry.fresh_until - now)
            return f"tierproxy; hit; ttl={ttl}; detail={_quote(reason)}"
        case Fetched(entry, fwd, revalidated, collapsed):
            status = 304 if revalidated else entry.status
            extra = "; collapsed" if collapsed else ""
            return f"tierproxy; fwd={fwd}; fwd-status={status}; stored{extra}"
        case Relayed(response, fwd, detail):
            member = f"tierproxy; fwd={fwd}; fwd-status={response.status}"
            return member if detail is None else f"{member}; detail={_quote(detail)}"
        case Failed(_, reason, fwd):
            return f"tierproxy; fwd={fwd}; detail={_quote(reason)}"
        case _:
            assert_never(final)


def x_cache(final: Final) -> str:
    """The ``X-Cache`` value for ``final``: where the answer came from, in one word."""
    match final:
        case FreshHit(tier, _):
            return f"HIT-{tier.upper()}"
        case StaleHit(tier, _, _):
            return f"STALE-{tier.upper()}"
        case Fetched(_, _, revalidated, _):
            return "REVALIDATED" if revalidated else "MISS"
        case Relayed(_, fwd, detail):
            # A cacheable request whose origin failed with a 5xx is a miss; anything else
            # passed on unstored was not the cache's to answer.
            return "MISS" if detail == "origin-5xx" else "BYPASS"
        case Failed(_, _, fwd):
            return "BYPASS" if fwd in ("bypass", "method") else "MISS"
        case _:
            assert_never(final)


def labels(final: Final, now: float) -> tuple[str, str]:
    """``(X-Cache, tierproxy's Cache-Status member)`` for ``final``."""
    return x_cache(final), cache_status_member(final, now)
