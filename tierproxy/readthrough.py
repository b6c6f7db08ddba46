"""The read-through orchestrator: the request path, top to bottom.

    lookup   L1 -> L2 -> L3, each under its budget (tiers.base.GuardedTier); hedged
             (TIERPROXY_HEDGE=on): L3 asked alongside an L2 slower than its p95
             FreshHit ──────────────────────────────────────────► served (backfilled)
             NeedsRevalidation ─► states.on_stale(): StaleHit, or ask the origin
             Miss ─► ask the origin
    fetch    one per key at a time (coalescer), conditional for a stale copy (upstream);
             a stale copy that may serve is served at the stale deadline (origin-slow)
    store    backfill the tiers (backfill), or invalidate the key (purge)
    answer   states.after_fetch(): Fetched | Relayed | StaleHit (origin failed) | Failed

It knows tiers only through :class:`~tierproxy.tiers.base.GuardedTier` and the origin only
through :class:`~tierproxy.upstream.Upstream`; it returns a final state
(:mod:`tierproxy.states`) that the response writer turns into an HTTP response.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, assert_never

from multidict import CIMultiDict, CIMultiDictProxy

from .backfill import Backfiller
from .background import BackgroundTasks
from .clock import SYSTEM, Clock
from .cluster_coalesce import ClusterCoalescing
from .coalescer import Coalescer
from .entry import Entry
from .keys import CacheKey, KeySpace
from .lookups import hedged, tier_get
from .metrics import Metrics
from .origin import OriginClient
from .purge import Purges
from .states import (
    MISS,
    Failed,
    Final,
    FreshHit,
    Lookup,
    Miss,
    NeedsRevalidation,
    OriginFailed,
    Outcome,
    ProxyRequest,
    Relayed,
    StaleHit,
    Stored,
    Trace,
    Unstorable,
    after_fetch,
    freshness,
    on_stale,
    stale_at_deadline,
    stale_usable,
)
from .tiers import redis_leases
from .tiers.base import MISS_REASON, GuardedTier, LocalTrust, TierLookup
from .upstream import Upstream

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["Failed", "Lookup", "ProxyRequest", "ReadThrough", "TierWalk"]

# RFC 9110 §9.2.1: a successful request with any other method invalidates (RFC 9111 §4.4).
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS", "TRACE")
# Location / Content-Location values of one answer looked at (a trusted origin sends one each).
_MAX_REFERENCES = 8

log = logging.getLogger("tierproxy.readthrough")


class ReadThrough:
    def __init__(
        self,
        settings: Settings,
        tiers: list[GuardedTier],
        origin: OriginClient,
        background: BackgroundTasks,
        metrics: Metrics,
        *,
        clock: Clock = SYSTEM,
        keys: KeySpace | None = None,
    ) -> None:
        self.settings, self.tiers, self.metrics, self.clock = settings, tiers, metrics, clock
        self.background = background
        self.keys = KeySpace(settings.origin, query=settings.query) if keys is None else keys
        #: How a successful unsafe request's keys are purged (awaited): this process's tiers;
        #: tierproxy.invalidation makes it every replica's.
        self.invalidate_everywhere: Callable[[Sequence[CacheKey]], Coroutine[Any, Any, object]] = (
            self._purge_here
        )
        self._index = {tier.name: index for index, tier in enumerate(tiers)}
        self.purges = Purges(tiers, background)
        self.backfill = Backfiller(tiers, background, metrics, self.purges)
        self.upstream = Upstream.from_settings(settings, origin, metrics, clock=clock)
        self.origin_breaker = self.upstream.breaker
        self.coalescer = Coalescer(
            settings,
            metrics,
            self.purges,
            self.backfill,
            clock=clock,
            remember=any(not tier.synchronous for tier in tiers),
            background=background,
        )
        self._trust: LocalTrust | None = None
        #: TIERPROXY_COALESCE=cluster: the fetch leases shared with the other replicas.
        self.cluster: ClusterCoalescing | None = None
        if settings.coalesce == "cluster":
            self.cluster = self._cluster_coalescing()
            self.coalescer.cluster = self.cluster

    def _cluster_coalescing(self) -> ClusterCoalescing | None:
        index = next((i for i, tier in enumerate(self.tiers) if tier.shared), None)
        if index is None:
            return None
        l2 = self.tiers[index]
        leases = redis_leases.for_tier(l2, self.settings.l2_write_timeout)
        if leases is None:
            return None

        async def read(req: ProxyRequest) -> Entry | None:
            # The normal L2 lookup (Vary-checked); only a fresh copy, backfilled like a hit.
            generation = self.purges.generation
            entry, _ = await tier_get(req, l2, asyncio.get_running_loop())
            if entry is None or freshness(entry, self.clock.wall()) != "fresh":
                return None
            self.backfill.backfill(req.key, entry, index, generation)
            return entry

        return ClusterCoalescing(
            self.settings, leases, l2, read, self.purges, self.backfill, self.metrics
        )

    @property
    def trust(self) -> LocalTrust | None:
        """With replicas (Redis), set by tierproxy.invalidation: shared tiers are written and
        remembered fetches shared only while this replica holds its purge lease. None: always."""
        return self._trust

    @trust.setter
    def trust(self, trust: LocalTrust | None) -> None:
        self._trust = self.backfill.trust = self.coalescer.trust = trust

    async def lookup(
        self, req: ProxyRequest, loop: asyncio.AbstractEventLoop | None = None
    ) -> Lookup:
        """The tiers in order, each under its budget: a fresh hit (backfilled into the tiers
        before it), else the first stale copy still usable, else a miss.

        With ``TIERPROXY_HEDGE=on`` a tier that has not answered by its recent p95 gets the
        next tier asked alongside (:func:`tierproxy.lookups.hedged`): a fresh copy from the
        next tier may answer first; everything else keeps this order. Otherwise this is
        :meth:`lookup_soon`, awaited.

        What each tier reached said is the found state's trace (``tiers``, for Cache-Status):
        a tier's position in it is its index in ``self.tiers``. ``loop``: the running loop,
        when the caller holds it (spares a system call on Python 3.11: tierproxy.deadlines)."""
        if loop is None:
            loop = asyncio.get_running_loop()
        if not self.settings.hedge:
            found: asyncio.Future[Lookup] = loop.create_future()
            walk = self.lookup_soon(req, loop, functools.partial(_settle, found))
            try:
                return await found
            except asyncio.CancelledError:
                walk.cancel()
                raise
        generation = self.purges.generation  # copies read before a purge are not written back
        since = self.coalescer.completed  # fetches completed later may hold what this misses
        tiers, index = self.tiers, 0
        trace: list[tuple[str, str]] = []
        while index < len(tiers):
            tier = tiers[index]
            asked = index
            del trace[index:]  # (a hedged tier asked again after an expired copy)
            # The tier returns only a copy usable for these request headers (Vary).
            if tier.synchronous:
                entry = tier.get_now(req.key, req.headers)
                said: tuple[str, ...] = ("" if entry is not None else MISS_REASON.get(),)
            else:
                after = tier.hedge_after
                if (
                    after is not None
                    and index + 1 < len(tiers)
                    and not tiers[index + 1].synchronous
                ):
                    entry, second, said = await hedged(
                        req, tier, tiers[index + 1], after, self.clock, self.metrics.hedges
                    )
                    index += second
                else:
                    entry, why = await tier_get(req, tier, loop)
                    said = (why,)
            trace.extend((tiers[asked + offset].name, what) for offset, what in enumerate(said))
            if entry is None:
                index += 1
                continue
            judged = self.judge(req, index, entry, trace, generation, since)
            if judged is not None:
                return judged
            index += 1
        return Lookup(Miss(tuple(trace)) if trace else MISS, generation, since)

    def lookup_soon(
        self, req: ProxyRequest, loop: asyncio.AbstractEventLoop, done: WalkDone
    ) -> TierWalk:
        """:meth:`lookup` with no task and no hedging (the tiers strictly in order), its
        outcome given to ``done`` - at once if no tier needs awaiting; the exception instead
        if the walk itself failed (a bug: it is logged). Cancel the walk returned when the
        caller gives up: the tier lookup in flight is abandoned, uncounted, and ``done`` is
        not called."""
        walk = TierWalk(self, req, loop, done)
        walk.step()
        return walk

    def judge(
        self,
        req: ProxyRequest,
        index: int,
        entry: Entry,
        trace: list[tuple[str, str]],
        generation: int,
        since: int,
    ) -> Lookup | None:
        """The lookup's outcome when tier ``index`` gave ``entry``: a fresh hit (backfilled
        into the tiers before it) or a stale copy, its trace entry set; None when the copy
        expired since the tier looked (nothing usable there: the lookup goes on)."""
        name = self.tiers[index].name
        match freshness(entry, self.clock.wall()):
            case "fresh":
                trace[index] = (name, "hit")
                self.backfill.backfill(req.key, entry, index, generation)
                return Lookup(FreshHit(name, entry, tuple(trace)), generation, since)
            case "stale":
                trace[index] = (name, "stale")
                return Lookup(NeedsRevalidation(name, entry, tuple(trace)), generation, since)
            case _:
                trace[index] = (name, "uri-miss")
                return None

    async def get(self, req: ProxyRequest, found: Lookup | None = None) -> Final:
        """Answer a cacheable GET/HEAD. ``found`` is :meth:`lookup`'s outcome for this very
        request when it was already run (tierproxy.hits looks up before handing over)."""
        if found is None:
            found = await self.lookup(req)
        match found.found:
            case FreshHit() as hit:
                return hit
            case NeedsRevalidation() as copy:
                return await self._stale(req, copy, found)
            case Miss() as miss:
                return await self._fetch(req, None, found.since, tiers=miss.tiers)
            case _:
                assert_never(found.found)

    async def _stale(self, req: ProxyRequest, copy: NeedsRevalidation, found: Lookup) -> Final:
        now = self.clock.wall()
        # Only for a copy that may stand in for the origin: the key's backoff first (asking
        # it has no side effect), then the breaker - asked only when the key may go (asking
        # may make this request its probe), else only looked at.
        may_stand_in = now >= copy.entry.swr_until and stale_usable(copy.entry, now)
        key_allowed = not may_stand_in or self.upstream.backoff.allow(req.key.material)
        breaker = self.origin_breaker
        allowed = not may_stand_in or (breaker.allow() if key_allowed else not breaker.is_open)
        match on_stale(copy, now, allowed, key_allowed):
            case StaleHit(reason="revalidating") as hit:  # RFC 5861 §3
                index = self._index[copy.tier]
                self.backfill.backfill(req.key, copy.entry, index, found.generation)
                self._refresh_in_background(req, copy.entry)
                self.metrics.stale_served.labels("revalidating").inc()
                return hit
            case StaleHit() as hit:  # the origin's breaker is open, or the key backs off
                self.metrics.stale_served.labels(hit.reason).inc()
                return hit
            case NeedsRevalidation():
                stale_at = None
                if stale_at_deadline(copy.entry, now, self.settings.stale_deadline):
                    # Counted from the request's start (its deadline is start + the budget).
                    start = req.deadline - self.settings.request_deadline
                    stale_at = start + self.settings.stale_deadline
                return await self._fetch(req, copy, found.since, stale_at)
            case _ as decision:
                assert_never(decision)

    async def _fetch(
        self,
        req: ProxyRequest,
        stale: NeedsRevalidation | None,
        since: int,
        stale_at: float | None = None,
        tiers: Trace = (),
    ) -> Final:
        held = None if stale is None else stale.entry
        outcome, collapsed = await self.coalescer.fetch(
            req, since, lambda: self._fetch_and_store(req, held), stale_at
        )
        final = after_fetch(outcome, stale, self.clock.wall(), collapsed, tiers)
        if isinstance(final, StaleHit):  # the origin failed: the stale copy stands in
            if isinstance(outcome, OriginFailed) and outcome.response is not None:
                outcome.response.release()
            self.metrics.stale_served.labels(final.reason).inc()
        return final

    async def _fetch_and_store(self, req: ProxyRequest, stale: Entry | None) -> Outcome:
        """One origin fetch, and what it means for the tiers: a stored answer is backfilled
        into every tier; a copy that may no longer be served is invalidated."""
        generation = self.purges.generation
        outcome = await self.upstream.fetch(req, stale)
        match outcome:
            case Stored(entry, _, True):
                self.backfill.backfill(req.key, entry, len(self.tiers), generation)
            case Stored(keep=False) | Unstorable(invalidates=True):
                await self._invalidate(req.key)
        return outcome

    def _refresh_in_background(self, req: ProxyRequest, stale: Entry) -> None:
        deadline = asyncio.get_running_loop().time() + self.settings.origin_timeout
        background_req = ProxyRequest(
            method="GET",
            key=req.key,
            headers=CIMultiDictProxy(CIMultiDict(req.headers)),
            peer=req.peer,
            scheme=req.scheme,
            deadline=deadline,
        )

        async def refresh() -> None:
            await self.coalescer.fetch(
                background_req,
                self.coalescer.completed,
                lambda: self._fetch_and_store(background_req, stale),
            )

        self.background.spawn("revalidate", refresh)

    async def forward(self, req: ProxyRequest) -> Relayed | Failed:
        """A request the cache does not answer: send it on, stream the answer back."""
        final = await self.upstream.forward(req)
        if self.tiers:  # Cache-Status: the cache sent it on from its first tier
            final = dataclasses.replace(final, tiers=((self.tiers[0].name, final.fwd),))
        # RFC 9111 §4.4: a non-error answer to an unsafe method (any method not known to be
        # safe) invalidates the target URI and same-origin Location / Content-Location URIs.
        if (
            isinstance(final, Relayed)
            and req.method not in _SAFE_METHODS
            and final.response.status < 400
        ):
            await self._invalidate_unsafe(req.key, final.response.headers)
        return final

    async def _invalidate_unsafe(self, target: CacheKey, headers: CIMultiDictProxy[str]) -> None:
        """Every tier and every replica, before the answer goes out (so no copy from before
        the change is served after it): L1 now, then the purge as required work, waited for
        even when its lane is full, and not stopped if this request is cancelled. A tier too
        slow to be purged within both write timeouts (Redis frozen, a full disk) stops
        holding up the answer then; its purge goes on in the background."""
        references = [*headers.getall("Location", ()), *headers.getall("Content-Location", ())]
        del references[_MAX_REFERENCES:]
        keys = {target.material: target}
        for key in self.keys.same_origin_keys(target.target, references):
            keys.setdefault(key.material, key)
        invalidated = list(keys.values())
        for key in invalidated:
            self.coalescer.forget(key)
        self.purges.remove_now(invalidated)

        settings = self.settings

        async def invalidate() -> None:
            # The purge returns once a backfill write it overtook has been undone (bounded;
            # Purges.purge), so the answer never goes out before that.
            await self.invalidate_everywhere(invalidated)

        wait = settings.l2_write_timeout + settings.l3_write_timeout
        done = await self.background.run_required("invalidate", invalidate, wait=wait)
        if not done:
            log.info(
                "invalidation of %r not done after %.1fs; answered, it goes on in the background",
                target.material[:200],
                wait,
            )

    async def _purge_here(self, keys: Sequence[CacheKey]) -> None:
        await self.purges.purge(keys, ())

    async def _invalidate(self, key: CacheKey) -> None:
        """Forget ``key``: any remembered fetch of it now, then every tier (tierproxy.purge)."""
        self.coalescer.forget(key)
        await self.purges.invalidate(key)

    async def purge(
        self,
        keys: Sequence[CacheKey],
        tags: Sequence[str],
        soft_at: float | None = None,
        *,
        shared: bool = True,
        local: bool = True,
    ) -> dict[str, int | str]:
        """Purge this process's tiers (see :meth:`tierproxy.purge.Purges.purge`)."""
        return await self.purges.purge(keys, tags, soft_at, shared=shared, local=local)

    def distrust_local(self) -> None:
        """Local copies may have missed purges: nothing read or fetched before now is written
        back anywhere (tierproxy.purge)."""
        self.purges.distrust_local()


#: Where a walk's outcome goes (:meth:`ReadThrough.lookup_soon`): what the tiers held, or
#: what went wrong in the walk itself.
WalkDone = Callable[["Lookup | Exception"], object]


def _settle(future: asyncio.Future[Lookup], found: Lookup | Exception) -> None:
    if future.done():  # (cancelled with its task, the walk ending in the same iteration)
        return
    if isinstance(found, Exception):
        future.set_exception(found)
    else:
        future.set_result(found)


class TierWalk:
    """One request's walk down the tiers with no task (:meth:`ReadThrough.lookup_soon`): a
    memory tier is read at once, the others through :meth:`GuardedTier.lookup_soon`, each
    under min(its timeout, what is left of the request's deadline), its duration in the
    request's timings - as :meth:`ReadThrough.lookup` walks them without hedging."""

    __slots__ = (
        "_done",
        "_generation",
        "_index",
        "_loop",
        "_pending",
        "_readthrough",
        "_req",
        "_since",
        "_started",
        "_trace",
        "over",
    )

    def __init__(
        self,
        readthrough: ReadThrough,
        req: ProxyRequest,
        loop: asyncio.AbstractEventLoop,
        done: WalkDone,
    ) -> None:
        self._readthrough = readthrough
        self._req = req
        self._loop = loop
        self._done = done
        # The purge generation now: copies read before a purge are not written back; and
        # the fetches completed by now: one completed later may hold what this misses.
        self._generation = readthrough.purges.generation
        self._since = readthrough.coalescer.completed
        self._index = 0
        self._trace: list[tuple[str, str]] = []
        self._pending: TierLookup | None = None
        self._started = 0.0
        #: The outcome was given, or the caller gave up.
        self.over = False

    def cancel(self) -> None:
        if not self.over:
            self.over = True
            pending = self._pending
            if pending is not None:
                self._pending = None
                pending.cancel()

    def step(self) -> None:
        """Ask the tiers from the current one on, until one must be awaited or all were."""
        try:
            self._step()
        except Exception as exc:  # noqa: BLE001 - a bug: its caller must still hear of it
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        log.exception("tier lookup failed")
        if not self.over:
            self.cancel()  # (the tier lookup in flight, if any, is abandoned)
            self._done(exc)

    def _step(self) -> None:
        readthrough, req = self._readthrough, self._req
        tiers = readthrough.tiers
        while self._index < len(tiers):
            tier = tiers[self._index]
            if tier.synchronous:
                # The tier returns only a copy usable for these request headers (Vary).
                entry = tier.get_now(req.key, req.headers)
                if self._found(tier, entry, "" if entry is not None else MISS_REASON.get()):
                    return
                continue
            loop = self._loop
            budget = min(tier.read_timeout, req.deadline - loop.time())
            self._started = time.perf_counter()  # (uvloop's loop clock has ms resolution)
            pending = tier.lookup_soon(req.key, budget, req.headers, loop, self._answered)
            if pending is not None and not pending.over:
                self._pending = pending
            return  # _answered goes on (it may already have)
        self._finish(
            Lookup(Miss(tuple(self._trace)) if self._trace else MISS, self._generation, self._since)
        )

    def _answered(self, entry: Entry | None, why: str) -> None:
        self._pending = None
        if self.over:
            return
        try:
            tier = self._readthrough.tiers[self._index]
            self._req.timings[tier.name] = time.perf_counter() - self._started
            if self._found(tier, entry, why):
                return
        except Exception as exc:  # noqa: BLE001 - as step()
            self._failed(exc)
            return
        self.step()

    def _found(self, tier: GuardedTier, entry: Entry | None, why: str) -> bool:
        """Tier ``self._index`` said ``why`` / gave ``entry``: whether the walk is over."""
        self._trace.append((tier.name, why))
        if entry is not None:
            judged = self._readthrough.judge(
                self._req, self._index, entry, self._trace, self._generation, self._since
            )
            if judged is not None:
                self._finish(judged)
                return True
        self._index += 1
        return False

    def _finish(self, found: Lookup) -> None:
        self.over = True
        self._done(found)
