"""The read-through orchestrator: tiers in order under timeouts, origin, backfill, stale.

It knows tiers only through :class:`~tierproxy.tiers.base.GuardedTier` and the origin only
through :class:`~tierproxy.origin.OriginClient`; it returns a result value that the server
turns into an HTTP response. Caching decisions come from :mod:`tierproxy.policy`.

    lookup L1 -> L2 -> L3 ──fresh──────────────────────────────► Cached(HIT-Lx)
          │                └─stale─► swr window? ─yes─► Cached(STALE-Lx) + background refresh
          │                                      └─no──► fetch (conditional) ─┐
          └─miss──────────────────────────────────────► fetch ─────────────────┤
                                     304 ► Cached(REVALIDATED)   200 ► Cached(MISS, stored)
                       timeout/error/5xx ► stale copy usable? ► Cached(STALE-Lx) : 504/502/5xx
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from multidict import CIMultiDict, CIMultiDictProxy

from . import policy
from .background import BackgroundTasks
from .entry import Entry
from .keys import CacheKey
from .metrics import Metrics
from .origin import (
    OriginBusy,
    OriginClient,
    OriginError,
    OriginResponse,
    OriginTimeout,
    upstream_headers,
)
from .tiers.base import Blob, Breaker, GuardedTier, LocalTrust, PurgeUnsupported

if TYPE_CHECKING:
    from .config import Settings

__all__ = [
    "ReadThrough",
    "ProxyRequest",
    "Cached",
    "Forwarded",
    "Failed",
    "Lookup",
    "Result",
]

log = logging.getLogger("tierproxy.readthrough")

# Surrogate keys kept per entry, and the longest one (Fastly's limits): the tag indexes are
# bounded by entries x tags, so both are capped; anything past them is not indexed.
MAX_TAGS_PER_ENTRY = 64
MAX_TAG_LENGTH = 1024
# A purge is an operator's request, not the client path: it gets at least this long per tier.
PURGE_MIN_TIMEOUT = 5.0
# Purge generations remembered with their keys; a copy older than them is not stored. A key
# purge of more keys than _PURGE_SCOPE_KEYS is remembered as "any key" (bounded memory).
_PURGE_LOG = 1024
_PURGE_SCOPE_KEYS = 256
# Fetches that ended with an entry to share, remembered for the requests whose lookup began
# before the fetch completed (see ReadThrough._recent_outcome): at most this many records,
# holding at most this many bytes of entries, each for at most the request deadline.
_RECENT_FETCHES = 1024
_RECENT_FETCH_BYTES = 64 * 1024 * 1024
# A waiter whose shared answer was not its own waits for the next fetch of the key, one fetch
# at a time; past this many rounds (its deadline comes first in practice) it fetches alone.
_MAX_WAIT_ROUNDS = 256

# origin_fetches outcome -> the origin's row in the per-tier view (tier_lookups).
_ORIGIN_LOOKUP = {"ok": "hit", "5xx": "error", "error": "error", "timeout": "timeout",
                  "skipped": "skipped"}


# _OriginFailed reason -> the status when no stale copy can be served (default 502).
_FAILED_STATUS = {"origin-timeout": 504, "origin-busy": 503, "local-error": 500}


def parse_tags(header: str | None) -> tuple[str, ...]:
    """``Surrogate-Key: a b c`` -> ("a", "b", "c"): space-separated, de-duplicated, capped."""
    if not header:
        return ()
    tags: dict[str, None] = {}
    for tag in header.split():
        if len(tag) <= MAX_TAG_LENGTH:
            tags[tag] = None
            if len(tags) >= MAX_TAGS_PER_ENTRY:
                break
    return tuple(tags)


@dataclass(slots=True)
class ProxyRequest:
    method: str
    key: CacheKey
    headers: CIMultiDictProxy[str]
    peer: str | None
    scheme: str
    deadline: float  # loop clock
    body: bytes | None = None
    timings: dict[str, float] = field(default_factory=dict)
    request_id: str = ""  # X-Request-ID, forwarded to the origin


# ---- results: what the server turns into a response ---------------------------------------


@dataclass(slots=True)
class Cached:
    """Serve this entry."""

    entry: Entry
    x_cache: str
    cache_status: str


@dataclass(slots=True)
class Forwarded:
    """Serve the origin's response as it came (not stored)."""

    response: OriginResponse
    x_cache: str
    cache_status: str


@dataclass(slots=True)
class Failed:
    """Nothing usable: 502 or 504 with a plain-text reason."""

    status: int
    reason: str
    x_cache: str
    cache_status: str


Result = Cached | Forwarded | Failed


@dataclass(slots=True)
class Lookup:
    """What the tiers held for one request (:meth:`ReadThrough.lookup`)."""

    hit: Cached | None  # a fresh copy, already backfilled into the tiers before it
    stale: Entry | None  # else the first copy past its freshness but not expired
    stale_index: int  # the tier it came from
    generation: int  # the purge generation when the lookup began
    since: int  # ReadThrough._completed when it began: later fetches may hold its entry


# ---- fetch outcomes, shared between coalesced requests ------------------------------------


@dataclass(slots=True)
class _Stored:
    entry: Entry
    revalidated: bool


@dataclass(slots=True)
class _Unstorable:
    response: OriginResponse
    reason: str


@dataclass(slots=True)
class _OriginFailed:
    reason: str  # origin-timeout | origin-error | origin-5xx
    response: OriginResponse | None = None  # the 5xx, when the origin answered one


_Outcome = _Stored | _Unstorable | _OriginFailed


@dataclass(slots=True)
class _Flight:
    """The origin fetch in flight for one key: its waiters' future, and the purge generation
    it began under (a fetch a purge of its key overtook is never joined)."""

    future: asyncio.Future[_Outcome | None]
    generation: int


@dataclass(slots=True)
class _Recent:
    """A fetch of one key that ended with an entry every matching request may have."""

    outcome: _Stored
    seq: int  # its number in ReadThrough._completed (the fetches remembered so far)
    generation: int  # the purge generation when the fetch began
    at: float  # loop clock, when it completed


def _shareable(outcome: _Outcome, leader_headers: CIMultiDictProxy[str]) -> bool:
    if isinstance(outcome, _Stored):
        return True  # each waiter still checks the entry's Vary against its own request
    if isinstance(outcome, _OriginFailed):
        if outcome.reason == "local-error":
            return False  # may come from this request's own input: the others try for themselves
        if outcome.response is None:
            return True
        # An unstored 5xx fetched with the leader's credentials may be the leader's alone.
        return outcome.response.stream is None and policy.may_share_unstored(
            leader_headers, outcome.response.headers
        )
    return False  # may be private to the requester, or a stream only one client can read


def _usable_by(outcome: _Outcome, req: ProxyRequest) -> bool:
    """A shared outcome is a waiter's answer only if its Vary values match (RFC 9111 §4.1)."""
    if isinstance(outcome, _Stored) and outcome.entry.vary:
        return policy.vary_matches(outcome.entry, req.headers)
    return True


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class ReadThrough:
    def __init__(
        self,
        settings: Settings,
        tiers: list[GuardedTier],
        origin: OriginClient,
        background: BackgroundTasks,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.tiers = tiers
        self.origin = origin
        self.background = background
        self.metrics = metrics
        self.policy = policy.CachePolicy(settings.default_ttl, settings.max_stale, settings.max_ttl)
        # Single flight per key: the fetch in flight (its future gets the outcome the waiters
        # may share, or None), and the recently completed ones that produced an entry (see
        # _recent_outcome). Both bounded: one flight per key being fetched; _RECENT_* records.
        self._inflight: dict[str, _Flight] = {}
        self._recent: collections.OrderedDict[str, _Recent] = collections.OrderedDict()
        self._recent_bytes = 0
        self._completed = 0
        # Keys with backfills into L2/L3 still on their way (bounded by the background tasks):
        # a lookup may miss there until they land, so a remembered fetch of such a key answers
        # every request, not only those whose lookup began before it completed.
        self._storing: dict[str, int] = {}
        # Records matter only when a lookup awaits (an L2/L3 tier): an L1-only lookup cannot
        # overlap a fetch.
        self._record_fetches = any(not tier.synchronous for tier in tiers)
        self._origin_outcomes = {
            name: metrics.origin_fetches.labels(name)
            for name in ("ok", "5xx", "timeout", "error")
        }
        self._origin_lookups = metrics.tier_lookup_counters("origin")
        self._origin_latency = metrics.tier_op_seconds.labels("origin", "get")
        # Opens after TIERPROXY_BREAKER_FAILURES consecutive origin failures: while open, a
        # request holding a stale copy it may serve gets it at once instead of waiting out
        # the origin timeout; misses still go to the origin, and one request per cooldown
        # probes it. Its failure count is also the origin's readiness state (degraded).
        self.origin_breaker = Breaker(settings.breaker_failures, settings.breaker_cooldown)
        # Bumped before and after every purge: a copy read or fetched before a purge is served
        # to its client but not stored, so a purge cannot be undone by a response already on
        # its way or a backfill still pending (see _backfill). The log says what each bump
        # was for - the keys of a key purge, or None (tags: any key) - so that a purge of one
        # key does not stop copies of every other key in flight from being stored.
        self._purge_generation = 0
        self._purge_log: collections.deque[tuple[int, frozenset[str] | None]] = (
            collections.deque(maxlen=_PURGE_LOG)
        )
        #: With replicas (Redis): this replica writes to a shared tier only while it holds
        #: its purge lease (see LocalTrust), set by tierproxy.invalidation. None = always.
        self.trust: LocalTrust | None = None

    def _origin_outcome(self, outcome: str) -> None:
        """Count one origin fetch's outcome; only what the origin did moves its breaker.

        ``skipped`` (the deadline was spent before asking), ``busy`` (no free origin
        connection within TIERPROXY_ORIGIN_QUEUE_TIMEOUT) and ``local-error`` (tierproxy's
        own bug) say nothing about the origin: they have their own counters and never count
        against its breaker.
        """
        if outcome in ("busy", "local-error", "skipped"):
            # Whatever the breaker let through as its probe did not reach the origin: the
            # next request probes instead (else a half-open breaker waits out a cooldown).
            self.origin_breaker.probing = False
        if outcome == "busy":
            self.metrics.origin_busy.inc()
            self._origin_lookups["skipped"].inc()
            return
        if outcome == "local-error":
            self.metrics.local_errors.labels("origin-fetch").inc()
            self._origin_lookups["error"].inc()
            return
        self._origin_outcomes["timeout" if outcome == "skipped" else outcome].inc()
        self._origin_lookups[_ORIGIN_LOOKUP[outcome]].inc()
        if outcome == "ok":
            self.origin_breaker.success()
        elif outcome != "skipped":  # a spent deadline says nothing about the origin
            self.origin_breaker.failure()

    # ---- lookup ---------------------------------------------------------------------------

    async def get(self, req: ProxyRequest, found: Lookup | None = None) -> Result:
        """Answer a cacheable GET/HEAD from the fastest tier with a usable copy.

        ``found`` is the outcome of :meth:`lookup` for this very request when it was already
        run (tierproxy.hits looks the tiers up before handing a request over).
        """
        if found is None:
            found = await self.lookup(req)
        if found.hit is not None:
            return found.hit
        stale, stale_index, generation = found.stale, found.stale_index, found.generation
        if stale is not None:
            label = f"STALE-{self.tiers[stale_index].name.upper()}"
            now = time.time()
            if now < stale.swr_until:
                # RFC 5861 §3: serve the stale copy now, refresh it in the background.
                self._backfill(req.key, stale, stale_index, generation)
                self._refresh_in_background(req, stale)
                self.metrics.stale_served.labels("revalidating").inc()
                ttl = math.floor(stale.fresh_until - now)
                return Cached(stale, label, f'tierproxy; hit; ttl={ttl}; detail="revalidating"')
        return await self._fetch_and_answer(req, stale, stale_index, found.since)

    async def lookup(self, req: ProxyRequest) -> Lookup:
        """The tiers in order, each under its budget: a fresh hit (backfilled into the tiers
        before it), else the first stale copy still usable, else nothing."""
        loop = asyncio.get_running_loop()
        generation = self._purge_generation  # copies read before a purge are not written back
        # Fetches completed from now on may have stored what this lookup misses (see
        # _recent_outcome); the number travels in the Lookup (also through tierproxy.hits).
        since = self._completed
        entry: Entry | None = None
        # Index 0 is L1 when present; ``hit_index`` is where the entry was found, so the tiers
        # before it are the ones to backfill.
        for index, tier in enumerate(self.tiers):
            # The tier returns only a copy usable for these request headers (Vary), and
            # counts the lookup as hit, stale or miss.
            if tier.synchronous:
                entry = tier.get_now(req.key, req.headers)
            else:
                budget = min(tier.read_timeout, req.deadline - loop.time())
                # Durations for logs and histograms use perf_counter: uvloop's loop clock has
                # millisecond resolution. Deadlines stay on the loop clock.
                started = time.perf_counter()
                entry = await tier.get(req.key, budget, req.headers)
                req.timings[tier.name] = time.perf_counter() - started
            if entry is None:
                continue
            now = time.time()
            if now < entry.fresh_until:
                self._backfill(req.key, entry, index, generation)
                ttl = math.floor(entry.fresh_until - now)
                return Lookup(Cached(entry, f"HIT-{tier.name.upper()}",
                                     f"tierproxy; hit; ttl={ttl}; detail={tier.name}"),
                              None, 0, generation, since)
            if now < entry.expires_at:
                return Lookup(None, entry, index, generation, since)
        return Lookup(None, None, 0, generation, since)

    # ---- fetch ----------------------------------------------------------------------------

    async def _fetch_and_answer(
        self, req: ProxyRequest, stale: Entry | None, stale_index: int, since: int
    ) -> Result:
        if stale is not None and time.time() < stale.stale_until and not self.origin_breaker.allow():
            self.metrics.stale_served.labels("origin-down").inc()
            ttl = math.floor(stale.fresh_until - time.time())
            return Cached(stale, f"STALE-{self.tiers[stale_index].name.upper()}",
                          f'tierproxy; hit; ttl={ttl}; detail="origin-down"')
        outcome, collapsed = await self._coalesced_fetch(req, stale, since)
        fwd = "stale" if stale is not None else "miss"
        extra = "; collapsed" if collapsed else ""
        if isinstance(outcome, _Stored):
            if outcome.revalidated:
                return Cached(outcome.entry, "REVALIDATED",
                              f"tierproxy; fwd={fwd}; fwd-status=304; stored{extra}")
            return Cached(outcome.entry, "MISS",
                          f"tierproxy; fwd={fwd}; fwd-status={outcome.entry.status}; stored{extra}")
        if isinstance(outcome, _Unstorable):
            status = outcome.response.status
            return Forwarded(outcome.response, "BYPASS",
                             f"tierproxy; fwd={fwd}; fwd-status={status}; detail={_quote(outcome.reason)}")
        # The origin failed: a stale copy within its stale limit beats an error.
        now = time.time()
        if stale is not None and now < stale.stale_until:
            if outcome.response is not None:
                outcome.response.release()
            self.metrics.stale_served.labels(outcome.reason).inc()
            label = f"STALE-{self.tiers[stale_index].name.upper()}"
            ttl = math.floor(stale.fresh_until - now)
            return Cached(stale, label, f"tierproxy; hit; ttl={ttl}; detail={_quote(outcome.reason)}")
        if outcome.response is not None:
            status = outcome.response.status
            return Forwarded(outcome.response, "MISS",
                             f"tierproxy; fwd={fwd}; fwd-status={status}; detail={_quote(outcome.reason)}")
        status = _FAILED_STATUS.get(outcome.reason, 502)
        return Failed(status, outcome.reason, "MISS",
                      f"tierproxy; fwd={fwd}; detail={_quote(outcome.reason)}")

    async def _coalesced_fetch(
        self, req: ProxyRequest, stale: Entry | None, since: int
    ) -> tuple[_Outcome, bool]:
        """One origin fetch per key at a time, covering lookup -> fetch -> store.

        A request gets, in this order: the entry of a fetch of its key that completed after
        its lookup began (_recent_outcome); else the outcome of the fetch in flight for its
        key, when it can be shared; else it fetches.
        The leader fetches in its own task (so it can stream to its client). A waiter whose
        shared outcome is not its own (private, Set-Cookie, another Vary variant; or the
        leader gave up) waits for the next fetch of the key: one waiter leads it, the others
        wait on it - so the origin sees one fetch per key at a time, never a burst. Each
        waiter is bounded by its own deadline. Returns (outcome, collapsed).
        """
        loop = asyncio.get_running_loop()
        material = req.key.material
        waited = False
        for _ in range(_MAX_WAIT_ROUNDS):
            recent = self._recent_outcome(req, since)
            if recent is not None:
                if not waited:
                    self.metrics.coalesced_waiters.inc()
                return recent, True
            flight = self._inflight.get(material)
            if flight is None or self._purged_since(flight.generation, req.key):
                # (A fetch begun before a purge of this key may bring back what was purged.)
                return await self._lead(req, stale), False
            if not waited:
                waited = True
                self.metrics.coalesced_waiters.inc()
            try:
                async with asyncio.timeout(max(0.0, req.deadline - loop.time())):
                    # shield: one waiter's deadline must not cancel what the others wait on
                    shared = await asyncio.shield(flight.future)
            except TimeoutError:
                return _OriginFailed("origin-timeout"), True
            if shared is not None and _usable_by(shared, req):
                return shared, True
            # The leader's flight is gone before its future is set: the first waiter to run
            # now leads the next fetch, the others find it in flight.
        return await self._fetch(req, stale), False

    async def _lead(self, req: ProxyRequest, stale: Entry | None) -> _Outcome:
        """Fetch for ``req`` as the key's single flight; share the outcome when it may be."""
        loop = asyncio.get_running_loop()
        material = req.key.material
        generation = self._purge_generation
        flight = _Flight(loop.create_future(), generation)
        self._inflight[material] = flight
        # A timeout of a fetch cut short by the leader's own deadline says nothing about the
        # origin to a waiter with more time left: that waiter fetches next.
        own_deadline = req.deadline - loop.time() < self.settings.origin_timeout
        # None tells the waiters to go on without it (one of them leads the next fetch): also
        # when the fetch raised or was cancelled.
        shared: _Outcome | None = None
        try:
            outcome = await self._fetch(req, stale)
            if _shareable(outcome, req.headers) and not (
                own_deadline and isinstance(outcome, _OriginFailed)
                and outcome.reason == "origin-timeout" and outcome.response is None
            ):
                shared = outcome
                if isinstance(outcome, _Stored):
                    self._remember(req.key, outcome, generation)
        finally:
            # A purge may have let another fetch of the key begin meanwhile: remove only ours.
            if self._inflight.get(material) is flight:
                del self._inflight[material]
            flight.future.set_result(shared)
        return outcome

    def _remember(self, key: CacheKey, outcome: _Stored, generation: int) -> None:
        """Keep a fetched entry for the requests whose lookup missed it (bounded)."""
        entry = outcome.entry
        self._forget_recent(key)  # a newer fetch: the older record must not outlive it
        if not self._record_fetches or time.time() >= entry.fresh_until:
            return  # (a revalidated copy that could not be freshened is not fresh)
        if entry.size > _RECENT_FETCH_BYTES:
            return
        now = asyncio.get_running_loop().time()
        self._completed += 1
        self._recent[key.material] = _Recent(outcome, self._completed, generation, now)
        self._recent_bytes += entry.size
        self._prune_recent(now)

    def _prune_recent(self, now: float) -> None:
        """Drop the records no pending lookup can need (older than the request deadline: a
        lookup that began before them is over), then the oldest past the bounds."""
        recent = self._recent
        horizon = now - self.settings.request_deadline
        while recent:
            oldest = next(iter(recent.values()))
            if (oldest.at >= horizon and len(recent) <= _RECENT_FETCHES
                    and self._recent_bytes <= _RECENT_FETCH_BYTES):
                break
            recent.popitem(last=False)
            self._recent_bytes -= oldest.outcome.entry.size

    def _forget_recent(self, key: CacheKey) -> None:
        record = self._recent.pop(key.material, None)
        if record is not None:
            self._recent_bytes -= record.outcome.entry.size

    def _recent_outcome(self, req: ProxyRequest, since: int) -> _Stored | None:
        """The entry of a fetch of ``req``'s key that completed after ``req``'s lookup began
        (``since``: the count of remembered fetches then), so the lookup may have looked in
        each tier before the entry was stored there - or whose backfills into L2/L3 have not
        all landed yet, so the lookup may have missed it there all the same. Like a waiter on
        that fetch, ``req`` gets it; but never an entry purged since, past its freshness or for
        other Vary values.
        """
        if not self._recent or (self.trust is not None and not self.trust.held()):
            return None  # (a replica whose purge lease lapsed may have missed a purge)
        now = asyncio.get_running_loop().time()
        self._prune_recent(now)
        material = req.key.material
        record = self._recent.get(material)
        if record is None or (record.seq <= since and material not in self._storing):
            return None
        if self._purged_since(record.generation, req.key):
            self._forget_recent(req.key)
            return None
        entry = record.outcome.entry
        if time.time() >= entry.fresh_until or not _usable_by(record.outcome, req):
            return None
        return record.outcome

    async def _fetch(self, req: ProxyRequest, stale: Entry | None) -> _Outcome:
        loop = asyncio.get_running_loop()
        budget = min(self.settings.origin_timeout, req.deadline - loop.time())
        if budget <= 0:
            self._origin_outcome("skipped")
            return _OriginFailed("origin-timeout")
        generation = self._purge_generation
        headers = upstream_headers(req.headers, req.peer, req.scheme,
                                   self.settings.unkeyed_denylist, cacheable=True)
        if req.request_id:
            headers["X-Request-ID"] = req.request_id
        if stale is not None:
            # RFC 9111 §4.3.1: validate the stored response.
            if stale.etag:
                headers["If-None-Match"] = stale.etag
            if stale.last_modified:
                headers["If-Modified-Since"] = stale.last_modified
        started = time.perf_counter()
        try:
            # A HEAD fills the cache too: fetch the GET it stands for.
            response = await self.origin.fetch("GET", req.key.material, headers, None, budget,
                                               self.settings.max_entry_bytes,
                                               deadline=req.deadline)
        except OriginTimeout:
            self._origin_outcome("timeout")
            req.timings["origin"] = time.perf_counter() - started
            return _OriginFailed("origin-timeout")
        except OriginError as exc:
            self._origin_outcome("error")
            req.timings["origin"] = time.perf_counter() - started
            log.info("origin error for %r: %s", req.key.material[:200], exc)
            return _OriginFailed("origin-error")
        except OriginBusy:
            self._origin_outcome("busy")
            req.timings["origin"] = time.perf_counter() - started
            return _OriginFailed("origin-busy")
        except Exception:  # tierproxy's own error, not the origin's: no breaker, no sharing
            self._origin_outcome("local-error")
            req.timings["origin"] = time.perf_counter() - started
            log.exception("local error while fetching %r from the origin", req.key.material[:200])
            return _OriginFailed("local-error")
        elapsed = time.perf_counter() - started
        req.timings["origin"] = elapsed
        self.metrics.origin_fetch_seconds.observe(elapsed)
        self._origin_latency.observe(elapsed)
        if response.status >= 500:
            self._origin_outcome("5xx")
            return _OriginFailed("origin-5xx", response)
        self._origin_outcome("ok")

        if response.status == 304 and stale is not None:
            refreshed = policy.freshen(stale, response.headers, req.headers,
                                       response.request_time, response.response_time, self.policy)
            if refreshed is None:
                await self._invalidate(req.key)
                # Still a valid answer for this client, just not storable any more.
                return _Stored(stale, revalidated=True)
            self._backfill(req.key, refreshed, len(self.tiers), generation)
            return _Stored(refreshed, revalidated=True)

        if response.body is None:
            return _Unstorable(response, "too-large")
        decision = policy.decide_storage("GET", req.headers, response.status, response.headers,
                                         response.request_time, response.response_time, self.policy)
        if not decision.storable:
            if stale is not None:
                await self._invalidate(req.key)
            return _Unstorable(response, decision.reason)
        entry = Entry(
            key=req.key.material,
            status=response.status,
            headers=policy.storable_headers(response.headers),
            body=response.body,
            stored_at=decision.stored_at,
            fresh_until=decision.fresh_until,
            stale_until=decision.stale_until,
            swr_until=decision.swr_until,
            expires_at=decision.expires_at,
            etag=response.headers.get("ETag"),
            last_modified=response.headers.get("Last-Modified"),
            vary=policy.vary_values(response.headers, req.headers),
            tags=parse_tags(response.headers.get("Surrogate-Key")),
        )
        self._backfill(req.key, entry, len(self.tiers), generation)
        return _Stored(entry, revalidated=False)

    def _refresh_in_background(self, req: ProxyRequest, stale: Entry) -> None:
        loop = asyncio.get_running_loop()
        background_req = ProxyRequest(
            method="GET", key=req.key, headers=CIMultiDictProxy(CIMultiDict(req.headers)),
            peer=req.peer, scheme=req.scheme,
            deadline=loop.time() + self.settings.origin_timeout,
        )

        async def refresh() -> None:
            await self._coalesced_fetch(background_req, stale, self._completed)

        self.background.spawn("revalidate", refresh)

    # ---- writes ---------------------------------------------------------------------------

    def _backfill(self, key: CacheKey, entry: Entry, upto: int, generation: int) -> None:
        """Fill the tiers before index ``upto``: L1 now (memory), the others in the background.

        ``generation`` is the purge generation when ``entry`` was read or fetched: if a purge
        that may have been for this key (a purge of it, or by tag) ran since, the copy may be
        what was purged, and it is not written back anywhere (the client that asked still
        gets it). A purge is rare; a skipped backfill costs a miss.
        """
        if self._purged_since(generation, key):
            return
        blob: Blob | None = None
        for tier in self.tiers[:upto]:
            if tier.synchronous:
                tier.backend.set_now(key, entry)
                continue
            if blob is None:
                blob = Blob(entry)
            self._spawn_store(tier, key, entry, blob, generation)

    def _spawn_store(
        self, tier: GuardedTier, key: CacheKey, entry: Entry, blob: Blob, generation: int
    ) -> None:
        counters = self.metrics.backfills
        storing, material = self._storing, key.material

        async def store() -> None:
            try:
                await write()
            finally:
                left = storing.pop(material) - 1
                if left:
                    storing[material] = left

        async def write() -> None:
            # A purge since this copy was read may have been for it: don't write it back, and
            # undo a write that was on its way while the purge ran.
            if self._purged_since(generation, key):
                counters.labels(tier.name, "superseded").inc()
                return
            # A replica that may have missed purges (its lease ran out) writes nothing that
            # every replica reads: a PURGE that counted it as fenced will not look again.
            if tier.backend.shared and self.trust is not None and not self.trust.held():
                counters.labels(tier.name, "fenced").inc()
                return
            ok = await tier.set(key, entry, blob)
            if self._purged_since(generation, key):
                # Also when the write timed out: it may still land (a statement already sent
                # to Redis, or queued on SQLite's writer thread), and this delete lands after it.
                await tier.delete(key)
                counters.labels(tier.name, "superseded").inc()
                return
            counters.labels(tier.name, "completed" if ok else "failed").inc()

        storing[material] = storing.get(material, 0) + 1
        if self.background.spawn(f"backfill-{tier.name}", store):
            counters.labels(tier.name, "started").inc()
        else:
            left = storing.pop(material) - 1
            if left:
                storing[material] = left
            counters.labels(tier.name, "dropped").inc()

    async def _invalidate(self, key: CacheKey) -> None:
        """Forget ``key`` everywhere (RFC 9111 §4.4): L1 and any remembered fetch now, then
        every tier as a purge of the key does (slowest first, between purge generation bumps:
        a backfill on its way is not written or is undone, and a lookup meanwhile cannot refill
        L1 from a copy still in L2) - as required work, never dropped: when that lane is full,
        the caller waits for it."""
        self._forget_recent(key)
        for tier in self.tiers:
            if tier.synchronous:
                tier.backend.remove_now(key)

        async def purge() -> None:
            await self.purge([key], ())

        await self.background.run_required("invalidate", purge)

    async def invalidate(self, key: CacheKey) -> None:
        await self._invalidate(key)

    async def purge(
        self,
        keys: Sequence[CacheKey],
        tags: Sequence[str],
        soft_at: float | None = None,
        *,
        shared: bool = True,
        local: bool = True,
    ) -> dict[str, int | str]:
        """Purge ``keys`` and every entry tagged with one of ``tags`` now.

        Hard purge deletes; ``soft_at`` (wall clock) marks the entries stale as of then
        instead, so they are revalidated and can still be served on origin failure.
        ``shared=False`` (a purge heard from another replica) skips tiers every replica shares;
        ``local=False`` purges only those. Returns {tier: entries changed, or "error" / "timeout" / "unsupported"}.

        Slowest tier first: a lookup that runs during the purge can then only find an old copy
        in a tier that is still to be purged, never backfill a purged tier from an unpurged one.
        """
        scope = (frozenset(key.material for key in keys)
                 if not tags and len(keys) <= _PURGE_SCOPE_KEYS else None)
        self._bump_purge_generation(scope)
        results: dict[str, int | str] = {}
        for tier in reversed(self.tiers):
            if not (shared if tier.backend.shared else local):
                continue
            timeout = max(tier.write_timeout, PURGE_MIN_TIMEOUT)
            try:
                results[tier.name] = await tier.purge(keys, tags, soft_at, timeout)
            except PurgeUnsupported:
                results[tier.name] = "unsupported"
            except TimeoutError:
                log.warning("purge in %s timed out after %.1fs", tier.name, timeout)
                results[tier.name] = "timeout"
            except Exception as exc:
                log.warning("purge in %s failed: %r", tier.name, exc)
                results[tier.name] = "error"
        self._bump_purge_generation(scope)
        return dict(reversed(results.items()))

    def distrust_local(self) -> None:
        """Local copies may have missed purges: a copy read or fetched before now is not
        written back anywhere (as after a purge of every key)."""
        self._bump_purge_generation(None)

    def _bump_purge_generation(self, scope: frozenset[str] | None) -> None:
        self._purge_generation += 1
        self._purge_log.append((self._purge_generation, scope))

    def _purged_since(self, generation: int, key: CacheKey) -> bool:
        """Whether a purge that began after ``generation`` may have been for ``key``."""
        if generation == self._purge_generation:
            return False
        log = self._purge_log
        if not log or log[0][0] > generation + 1:
            return True  # bumps older than the log remembers: assume they were for this key
        for bumped_to, scope in reversed(log):
            if bumped_to <= generation:
                break
            if scope is None or key.material in scope:
                return True
        return False

    # ---- pass-through ----------------------------------------------------------------------

    async def forward(self, req: ProxyRequest) -> Result:
        """A request the cache does not answer: send it on, stream the answer back."""
        loop = asyncio.get_running_loop()
        budget = min(self.settings.origin_timeout, req.deadline - loop.time())
        headers = upstream_headers(req.headers, req.peer, req.scheme,
                                   self.settings.unkeyed_denylist, cacheable=False)
        if req.request_id:
            headers["X-Request-ID"] = req.request_id
        reason = "method" if req.method not in ("GET", "HEAD") else "bypass"
        started = time.perf_counter()
        try:
            if budget <= 0:
                raise OriginTimeout("deadline spent")
            response = await self.origin.fetch(req.method, req.key.material, headers, req.body,
                                               budget, self.settings.max_entry_bytes,
                                               deadline=req.deadline)
        except OriginTimeout:
            self._origin_outcome("timeout")
            return Failed(504, "origin-timeout", "BYPASS", f'tierproxy; fwd={reason}; detail="origin-timeout"')
        except OriginError:
            self._origin_outcome("error")
            return Failed(502, "origin-error", "BYPASS", f'tierproxy; fwd={reason}; detail="origin-error"')
        except OriginBusy:
            self._origin_outcome("busy")
            return Failed(503, "origin-busy", "BYPASS", f'tierproxy; fwd={reason}; detail="origin-busy"')
        except Exception:  # tierproxy's own error, not the origin's
            self._origin_outcome("local-error")
            log.exception("local error while forwarding %s %r", req.method, req.key.material[:200])
            return Failed(500, "local-error", "BYPASS", f'tierproxy; fwd={reason}; detail="local-error"')
        finally:
            req.timings["origin"] = time.perf_counter() - started
        self._origin_outcome("5xx" if response.status >= 500 else "ok")
        self._origin_latency.observe(req.timings["origin"])
        # RFC 9111 §4.4: a successful unsafe request invalidates the stored response.
        if req.method not in ("GET", "HEAD", "OPTIONS", "TRACE") and response.status < 400:
            await self._invalidate(req.key)
        return Forwarded(response, "BYPASS",
                         f"tierproxy; fwd={reason}; fwd-status={response.status}")
