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
import re
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
    "Trace",
    "Unstorable",
    "after_fetch",
    "cache_status_members",
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

#: What each tier a request reached said, in lookup order (fastest first): ``(tier name,
#: outcome)``. Outcomes: ``hit`` (a fresh copy), ``stale`` (a stale copy that may still be
#: used), ``uri-miss``, ``vary-miss`` (only copies for other Vary values), the reasons a tier
#: did not answer (``timeout``, ``error``, ``breaker-open``, ``skipped``, ``corrupt``;
#: ``cancelled``: a hedged lookup whose other tier answered first), or, for a request the
#: cache does not answer, ``bypass`` / ``method`` on the first tier alone. A tier the
#: request did not reach is absent. Rendered by :func:`cache_status_members`.
Trace = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class FreshHit:
    """A fresh copy from ``tier`` (``"l1"``, ``"l2"``, ...): served as it is.
    ``tiers``: the lookup's trace (empty: ``tier`` alone was asked)."""

    tier: str
    entry: Entry
    tiers: Trace = ()


@dataclass(frozen=True, slots=True)
class NeedsRevalidation:
    """A copy from ``tier`` past its freshness but not expired: what to do with it is
    :func:`on_stale`'s decision; when the origin is asked, it is asked conditionally."""

    tier: str
    entry: Entry
    tiers: Trace = ()


@dataclass(frozen=True, slots=True)
class Miss:
    """No usable copy in any tier."""

    tiers: Trace = ()


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
    tiers: Trace = ()


@dataclass(frozen=True, slots=True)
class Fetched:
    """The origin's answer, stored (``revalidated``: a 304 that freshened the stored copy).
    ``fwd`` is ``miss`` or ``stale`` (RFC 9211 §2.2: why the origin was asked). ``stored``
    False: a 304 that could not freshen the copy (served, the stored copy invalidated)."""

    entry: Entry
    fwd: str
    revalidated: bool = False
    collapsed: bool = False  # shared with a fetch another request made
    tiers: Trace = ()
    stored: bool = True


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
    tiers: Trace = ()


@dataclass(frozen=True, slots=True)
class Failed:
    """Nothing to serve: ``status`` with a plain-text reason (``origin-timeout`` 504,
    ``origin-error`` 502, ``origin-busy`` 503, ``shed`` 503, ``local-error`` 500)."""

    status: int
    reason: str
    fwd: str
    tiers: Trace = ()


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
        return StaleHit(copy.tier, entry, "revalidating", copy.tiers)
    if not origin_allowed and stale_usable(entry, now):
        return StaleHit(copy.tier, entry, "origin-down", copy.tiers)
    if not key_allowed and stale_usable(entry, now):
        return StaleHit(copy.tier, entry, "origin-backoff", copy.tiers)
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
    outcome: Outcome,
    stale: NeedsRevalidation | None,
    now: float,
    collapsed: bool = False,
    tiers: Trace = (),
) -> Final:
    """What the client gets from a fetch's ``outcome``; ``stale`` is the copy the request held
    (its trace goes on), ``tiers`` the lookup's trace when it held none.

    A stored answer is served; an unstorable one is relayed. When the origin failed, a stale
    copy still within its stale limits beats an error (RFC 9111 §4.2.4, RFC 5861 §4); else the
    origin's 5xx is relayed, or the request fails with the reason's status.
    """
    fwd = "miss" if stale is None else "stale"
    if stale is not None:
        tiers = stale.tiers
    match outcome:
        case Stored(entry, revalidated, keep, own_headers):
            if own_headers is not None and not collapsed:
                entry = replace(entry, headers=own_headers)
            return Fetched(entry, fwd, revalidated, collapsed, tiers, keep)
        case Unstorable(response, reason, _):
            return Relayed(response, fwd, reason, tiers)
        case OriginFailed(reason, response):
            if stale is not None and stale_usable(stale.entry, now):
                return StaleHit(stale.tier, stale.entry, reason, tiers)
            if response is not None:
                return Relayed(response, fwd, reason, tiers)
            return Failed(FAILED_STATUS.get(reason, 502), reason, fwd, tiers)
        case _:
            assert_never(outcome)


# ---- Cache-Status (RFC 9211) ----------------------------------------------------------------

#: Each tier's member is named ``tierproxy-<tier>``.
MEMBER_PREFIX = "tierproxy-"

# The RFC 8941 §3.3.4 token grammar: a detail that fits is written bare, else as a string.
_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
# Trace outcomes that say a tier did not answer usably: ``fwd=uri-miss; detail=<outcome>``.
_FWD_OUTCOMES = frozenset({"uri-miss", "vary-miss", "stale", "bypass", "method"})


def _sf_detail(value: str) -> str:
    """``value`` as an RFC 8941 bare item: a token when it is one, else a string (printable
    ASCII only: anything else becomes ``?``)."""
    if _TOKEN.fullmatch(value):
        return value
    printable = "".join(c if " " <= c <= "~" else "?" for c in value)
    return '"' + printable.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _joined(*details: str | None) -> str | None:
    words = [d for d in details if d]
    return " ".join(words) if words else None


def _source(tiers: Trace, fwd: str) -> int:
    """The index in ``tiers`` of the member a forwarded request's answer is told on: the tier
    holding the stale copy that was revalidated (``fwd`` ``stale``), else the last tier the
    request reached (the closest to the origin), which sent it on."""
    if fwd == "stale":
        for index, (_, outcome) in enumerate(tiers):
            if outcome == "stale":
                return index
    return len(tiers) - 1


def cache_status_members(final: Final, now: float) -> str:
    """tierproxy's ``Cache-Status`` members for ``final`` (RFC 9211): one per tier the request
    reached (:data:`Trace`), listed from the origin towards the user agent (§2: L3, L2, L1).

    The member of the tier that answered - or, for a forwarded request, of the tier it was
    forwarded from (:func:`_source`) - says how: ``hit; ttl=N`` (fresh), ``hit; ttl=-N;
    detail=<why stale>``, or ``fwd=<why>`` with ``fwd-status`` (the origin's status),
    ``collapsed`` and the answer's ``detail``. Every other member says what its tier held
    (``fwd=uri-miss`` / ``vary-miss`` / ``stale``) or why it did not answer
    (``fwd=uri-miss; detail=timeout`` ...). ``stored`` marks each listed tier the answer is
    written into: every one for a stored origin answer, the tiers before the one that held
    a hit (a fresh one, or a stale one being revalidated in the background). Empty when the
    request reached no tier.
    """
    tiers = final.tiers
    detail: str | None = None
    fwd_status: int | None = None
    collapsed = False
    match final:
        case FreshHit(tier, entry, _) | StaleHit(tier, entry, _, _):
            if not any(name == tier for name, _ in tiers):
                tiers = (*tiers, (tier, "hit"))
            source = next(i for i, (name, _) in enumerate(tiers) if name == tier)
            if isinstance(final, FreshHit):
                # Fresh when it was found; the response may be written a moment later (the
                # full path reads the clock again), past its freshness: never negative.
                answer = f"hit; ttl={max(0, math.floor(entry.fresh_until - now))}"
                stored = source
            else:
                answer = f"hit; ttl={math.floor(entry.fresh_until - now)}"
                detail = final.reason
                stored = source if final.reason == "revalidating" else 0
        case Fetched(entry, fwd, revalidated, collapsed, _, keep):
            source, answer = _source(tiers, fwd), ""
            fwd_status = 304 if revalidated else entry.status
            stored = len(tiers) if keep else 0
        case Relayed(response, fwd, detail, _):
            source, answer, stored = _source(tiers, fwd), "", 0
            fwd_status = response.status
        case Failed(_, reason, fwd, _):
            source, answer, stored, detail = _source(tiers, fwd), "", 0, reason
        case _:
            assert_never(final)
    members: list[str] = []
    for index in range(len(tiers) - 1, -1, -1):
        name, outcome = tiers[index]
        tier_detail = None
        if outcome == "hit":
            params = "hit"
        elif outcome in _FWD_OUTCOMES:
            params = f"fwd={outcome}"
        else:
            params, tier_detail = "fwd=uri-miss", outcome
        if index == source:
            if answer:
                params, tier_detail = answer, None
            if fwd_status is not None:
                params += f"; fwd-status={fwd_status}"
            tier_detail = _joined(tier_detail, detail)
        if index < stored:
            params += "; stored"
        if index == source and collapsed:
            params += "; collapsed"
        if tier_detail is not None:
            params += f"; detail={_sf_detail(tier_detail)}"
        members.append(f"{MEMBER_PREFIX}{name}; {params}")
    return ", ".join(members)


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
    """``(X-Cache, tierproxy's Cache-Status members)`` for ``final``."""
    return x_cache(final), cache_status_members(final, now)
