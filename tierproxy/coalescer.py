"""Single flight per cache key, covering lookup -> fetch -> store.

For a URL whose last response varied (RFC 9111 §4.1), the flight is per variant: its name is
the record material of the variant the request would get (tierproxy.variants), so requests for
different variants fetch side by side while requests for one variant still share one fetch.

A request gets, in this order: the entry of a fetch of its key that completed after its
lookup began (:meth:`Coalescer._recent_outcome`); else the outcome of the fetch in flight for
its key, when it can be shared; else it fetches, as the key's single flight.

The leader fetches in its own task (so it can stream to its client). A waiter whose shared
outcome is not its own (private, Set-Cookie, another Vary variant; or the leader gave up)
waits for the next fetch of the key: one waiter leads it, the others wait on it - so the
origin sees one fetch per key at a time, never a burst. Each waiter is bounded by its own
deadline.

A request holding a stale copy it may serve (TIERPROXY_STALE_DEADLINE) waits only until its
stale deadline (``stale_at``) and then gets ``OriginFailed("origin-slow")`` - its stale copy
is served. The fetch is not cancelled: a leader with a stale deadline fetches in an owned
background task (:class:`~tierproxy.background.BackgroundTasks`, drained at shutdown) that
goes on up to the origin timeout, stores what it gets and answers the waiters still on it.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from multidict import CIMultiDictProxy

from . import policy, variants
from .backfill import Backfiller
from .background import BackgroundTasks
from .clock import SYSTEM, Clock
from .keys import CacheKey
from .metrics import Metrics
from .purge import Purges
from .states import OriginFailed, Outcome, ProxyRequest, Stored, Unstorable
from .tiers.base import LocalTrust

if TYPE_CHECKING:
    from .cluster_coalesce import ClusterCoalescing
    from .config import Settings

__all__ = ["Coalescer"]

# Fetches that ended with an entry to share, remembered for the requests whose lookup began
# before the fetch completed (see Coalescer._recent_outcome): at most this many records,
# holding at most this many bytes of entries, each for at most the request deadline.
_RECENT_FETCHES = 1024
_RECENT_FETCH_BYTES = 64 * 1024 * 1024
# A waiter whose shared answer was not its own waits for the next fetch of the key, one fetch
# at a time; past this many rounds (its deadline comes first in practice) it fetches alone.
_MAX_WAIT_ROUNDS = 256
# URLs whose last fetched response varied, with the fields it varied on (most recent last).
_VARYING_URLS = 4096


@dataclass(slots=True)
class _Flight:
    """The origin fetch in flight for one key: its waiters' future, and the purge generation
    it began under (a fetch a purge of its key overtook is never joined)."""

    future: asyncio.Future[Outcome | None]
    generation: int


@dataclass(slots=True)
class _Recent:
    """A fetch of one key that ended with an entry every matching request may have."""

    outcome: Stored
    seq: int  # its number in Coalescer.completed (the fetches remembered so far)
    generation: int  # the purge generation when the fetch began
    at: float  # loop clock, when it completed


def _shareable(
    outcome: Outcome, leader_headers: CIMultiDictProxy[str], targeted_fields: tuple[str, ...]
) -> bool:
    if isinstance(outcome, Stored):
        return True  # each waiter still checks the entry's Vary against its own request
    if isinstance(outcome, OriginFailed):
        if outcome.reason == "local-error":
            return False  # may come from this request's own input: the others try for themselves
        if outcome.reason == "shed":
            return False  # the origin was not asked: a waiter asks for itself (or is shed)
        if outcome.response is None:
            return True
        # An unstored 5xx fetched with the leader's credentials may be the leader's alone.
        return outcome.response.stream is None and policy.may_share_unstored(
            leader_headers, outcome.response.headers, targeted_fields
        )
    return False  # may be private to the requester, or a stream only one client can read


def _release(outcome: Outcome) -> None:
    """Close a response no client will read (its leader stopped waiting for it)."""
    if isinstance(outcome, (Unstorable, OriginFailed)) and outcome.response is not None:
        outcome.response.release()


def _usable_by(outcome: Outcome, req: ProxyRequest) -> bool:
    """A shared outcome is a waiter's answer only if its Vary values match (RFC 9111 §4.1)."""
    if isinstance(outcome, Stored) and outcome.entry.vary:
        return variants.entry_matches(outcome.entry, req.headers)
    return True


class Coalescer:
    """One origin fetch per key at a time (see module)."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        purges: Purges,
        backfiller: Backfiller,
        *,
        remember: bool,
        background: BackgroundTasks | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        self.origin_timeout = settings.origin_timeout
        self.targeted_fields = settings.targeted_fields  # (RFC 9213: see _shareable)
        self.request_deadline = settings.request_deadline
        # Records matter only when a lookup awaits (an L2/L3 tier): an L1-only lookup cannot
        # overlap a fetch.
        self.record_fetches = remember
        self.metrics = metrics
        self.purges = purges
        self.backfiller = backfiller
        backfiller.on_settled = self._settled
        self.background = background  # owns the fetches a leader stopped waiting for
        self.clock = clock
        # The fetch in flight per key (its future gets the outcome the waiters may share, or
        # None), and the recently completed ones that produced an entry. Both bounded: one
        # flight per key being fetched; _RECENT_* records.
        self._inflight: dict[str, _Flight] = {}
        # The fields the last response of a URL varied on: its fetches are then one flight
        # per variant (keyed by the variant's record material), so requests for different
        # variants fetch side by side instead of one after the other. Bounded, LRU.
        self._varies: collections.OrderedDict[str, tuple[str, ...]] = collections.OrderedDict()
        self._recent: collections.OrderedDict[str, _Recent] = collections.OrderedDict()
        self._recent_bytes = 0
        #: Fetches remembered so far: a lookup notes it (Lookup.since); a later one may hold
        #: the entry the lookup missed.
        self.completed = 0
        #: With replicas: a replica whose purge lease lapsed may have missed a purge, and
        #: shares no remembered fetch meanwhile. None = always trusted.
        self.trust: LocalTrust | None = None
        #: TIERPROXY_COALESCE=cluster: a leader's fetch also takes the key's fetch lease in
        #: Redis, or serves the entry another replica's fetch stored (cluster_coalesce).
        #: None (local): one fetch per key per replica.
        self.cluster: ClusterCoalescing | None = None

    async def fetch(
        self,
        req: ProxyRequest,
        since: int,
        fetch: Callable[[], Awaitable[Outcome]],
        stale_at: float | None = None,
    ) -> tuple[Outcome, bool]:
        """``fetch()`` for ``req`` as its key's single flight, or another fetch's shared
        outcome (see module). Returns (outcome, collapsed). ``stale_at`` (loop time): when
        ``req`` holds a stale copy it may serve, it stops waiting then (``origin-slow``)."""
        loop = asyncio.get_running_loop()
        patience = req.deadline if stale_at is None else min(req.deadline, stale_at)
        waited = False
        for _ in range(_MAX_WAIT_ROUNDS):
            recent = self._recent_outcome(req, since)
            if recent is not None:
                if not waited:
                    self.metrics.coalesced_waiters.inc()
                return recent, True
            name = self._flight_name(req)
            flight = self._inflight.get(name)
            if flight is None or self.purges.purged_since(flight.generation, req.key):
                # (A fetch begun before a purge of this key may bring back what was purged.)
                return await self._lead(req, name, fetch, stale_at), False
            if not waited:
                waited = True
                self.metrics.coalesced_waiters.inc()
            try:
                async with asyncio.timeout(max(0.0, patience - loop.time())):
                    # shield: one waiter's deadline must not cancel what the others wait on
                    shared = await asyncio.shield(flight.future)
            except TimeoutError:
                slow = patience < req.deadline  # its stale deadline, not its last moment
                return OriginFailed("origin-slow" if slow else "origin-timeout"), True
            if shared is not None and _usable_by(shared, req):
                return shared, True
            # The leader's flight is gone before its future is set: the first waiter to run
            # now leads the next fetch, the others find it in flight.
        return await fetch(), False

    def _flight_name(self, req: ProxyRequest) -> str:
        """The key's flight name: its material, or for a URL whose last response varied, the
        material of the variant this request would get (one flight per variant)."""
        material = req.key.material
        names = self._varies.get(material)
        if names is None:
            return material
        values = tuple((n, variants.normalise(n, req.headers.getall(n, ()))) for n in names)
        return variants.record_material(material, values)

    def _learn_vary(self, material: str, outcome: Outcome) -> None:
        if not isinstance(outcome, Stored):
            return
        varies = self._varies
        if not outcome.entry.vary:
            varies.pop(material, None)
            return
        varies.pop(material, None)
        varies[material] = tuple(name for name, _ in outcome.entry.vary)
        if len(varies) > _VARYING_URLS:
            varies.popitem(last=False)

    async def _lead(
        self,
        req: ProxyRequest,
        name: str,
        fetch: Callable[[], Awaitable[Outcome]],
        stale_at: float | None,
    ) -> Outcome:
        """Fetch for ``req`` as the key's single flight; share the outcome when it may be.

        With ``stale_at``, the fetch runs as an owned background task and ``req`` waits for
        it only until then (its stale copy is served: ``origin-slow``); else, or when the
        origin fetches' lane is full, it fetches in its own task."""
        loop = asyncio.get_running_loop()
        flight = _Flight(loop.create_future(), self.purges.generation)
        self._inflight[name] = flight
        if stale_at is None or self.background is None:
            return await self._fly(req, name, fetch, flight)
        mine: asyncio.Future[Outcome] = loop.create_future()

        async def fly() -> None:
            try:
                outcome = await self._fly(req, name, fetch, flight)
            except asyncio.CancelledError:  # shutdown's drain ran out of time
                if not mine.done():
                    mine.set_result(OriginFailed("origin-timeout"))
                raise
            except Exception as exc:
                if not mine.done():
                    mine.set_exception(exc)
                raise
            if mine.done():  # the leader stopped waiting: this answer is no client's
                _release(outcome)
            else:
                mine.set_result(outcome)

        if not self.background.spawn_fetch("origin-fetch", fly):
            # More fetches than a few times the origin's pool are pending: this one is the
            # request's own (it waits for the answer, as without a stale deadline).
            return await self._fly(req, name, fetch, flight)
        try:
            async with asyncio.timeout(max(0.0, stale_at - loop.time())):
                return await asyncio.shield(mine)
        except TimeoutError:
            if mine.cancel():  # the fetch goes on (fly): its outcome is stored, shared, released
                return OriginFailed("origin-slow")
            return mine.result()  # it came just in time
        except BaseException:
            # The leader itself was cancelled (its client gone, shutdown): the fetch goes on,
            # and an answer nobody reads is released when it comes (fly).
            mine.cancel()
            raise

    async def _fly(
        self,
        req: ProxyRequest,
        name: str,
        fetch: Callable[[], Awaitable[Outcome]],
        flight: _Flight,
    ) -> Outcome:
        """Run the key's (or its variant's) single flight: fetch, remember and share the
        outcome, end it."""
        loop = asyncio.get_running_loop()
        generation = flight.generation
        # A timeout of a fetch cut short by the leader's own deadline says nothing about the
        # origin to a waiter with more time left: that waiter fetches next.
        own_deadline = req.deadline - loop.time() < self.origin_timeout
        # None tells the waiters to go on without it (one of them leads the next fetch): also
        # when the fetch raised or was cancelled.
        shared: Outcome | None = None
        try:
            cluster = self.cluster
            outcome = await (fetch() if cluster is None else cluster.fetch(req, name, fetch))
            self._learn_vary(req.key.material, outcome)
            if _shareable(outcome, req.headers, self.targeted_fields) and not (
                own_deadline
                and isinstance(outcome, OriginFailed)
                and outcome.reason == "origin-timeout"
                and outcome.response is None
            ):
                shared = outcome
                if isinstance(outcome, Stored):
                    self._remember(req.key, outcome, generation)
        finally:
            # A purge may have let another fetch of the key begin meanwhile: remove only ours.
            if self._inflight.get(name) is flight:
                del self._inflight[name]
            flight.future.set_result(shared)
        return outcome

    def _remember(self, key: CacheKey, outcome: Stored, generation: int) -> None:
        """Keep a fetched entry for the requests whose lookup missed it (bounded)."""
        entry = outcome.entry
        self.forget(key)  # a newer fetch: the older record must not outlive it
        if not self.record_fetches or self.clock.wall() >= entry.fresh_until:
            return  # (a revalidated copy that could not be freshened is not fresh)
        if entry.size > _RECENT_FETCH_BYTES:
            return
        now = asyncio.get_running_loop().time()
        self.completed += 1
        self._recent[key.material] = _Recent(outcome, self.completed, generation, now)
        self._recent_bytes += entry.size
        self._prune_recent(now)

    def _settled(self, material: str) -> None:
        """The backfills of ``material``'s fetch into L2/L3 have all ended: a lookup that began
        before may have read those tiers before the copy landed, so the fetch counts as
        completed now (its record's number and time move on) - such a lookup still gets the
        fetch's entry instead of fetching again (:meth:`_recent_outcome`)."""
        record = self._recent.get(material)
        if record is not None:
            self.completed += 1
            record.seq = self.completed
            record.at = asyncio.get_running_loop().time()
            self._recent.move_to_end(material)  # (kept in completion order for pruning)

    def _prune_recent(self, now: float) -> None:
        """Drop the records no pending lookup can need (older than the request deadline: a
        lookup that began before them is over), then the oldest past the bounds."""
        recent = self._recent
        horizon = now - self.request_deadline
        while recent:
            oldest = next(iter(recent.values()))
            if (
                oldest.at >= horizon
                and len(recent) <= _RECENT_FETCHES
                and self._recent_bytes <= _RECENT_FETCH_BYTES
            ):
                break
            recent.popitem(last=False)
            self._recent_bytes -= oldest.outcome.entry.size

    def forget(self, key: CacheKey) -> None:
        """Drop the remembered fetch of ``key`` (it was invalidated, or a newer one came)."""
        record = self._recent.pop(key.material, None)
        if record is not None:
            self._recent_bytes -= record.outcome.entry.size

    def _recent_outcome(self, req: ProxyRequest, since: int) -> Stored | None:
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
        record = self._recent.get(req.key.material)
        if record is None or (record.seq <= since and not self.backfiller.storing(req.key)):
            return None
        if self.purges.purged_since(record.generation, req.key):
            self.forget(req.key)
            return None
        entry = record.outcome.entry
        if self.clock.wall() >= entry.fresh_until or not _usable_by(record.outcome, req):
            return None
        return record.outcome
