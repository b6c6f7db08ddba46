"""Coalescing across replicas (TIERPROXY_COALESCE=cluster): one origin fetch per key for
every replica sharing the Redis, not one per replica.

The local single flight (:mod:`tierproxy.coalescer`) picks one request per replica to fetch a
key (or one Vary variant of it). With ``cluster`` that request first takes the key's fetch
lease in Redis (:mod:`tierproxy.tiers.redis_leases`, ``SET NX PX``, about the origin timeout
plus the L2 write timeout long):

* **Taken** (``acquired``): it reads L2 once more (the last holder may have just stored the
  entry this request's lookup missed; then that is served, ``waited-hit``), else fetches;
  once the answer's L2 write has landed it releases the lease (only its own) and publishes
  ``stored`` - or ``unstored`` at once when the answer is not stored (private, Set-Cookie,
  an error, a failed write), so nobody waits for nothing. A release that deleted nothing
  (the lease ran out; it may be another replica's now) publishes nothing.
* **Held by another replica**: it reads L2 (the entry may have landed meanwhile), else waits
  for the leaseholder's message on the channel - with a fallback re-check (try the lease
  again, read L2) every quarter lease, at most a second apart, so a lost message or a
  leaseholder that died (its lease runs out) costs at most that. On ``stored`` it serves what
  it reads back from L2 through the normal tier lookup (``waited-hit``): Vary-checked, fresh,
  and never a copy a purge since the wait began may have been for. On ``unstored`` or an
  entry not usable here it tries the lease once more (so one replica leads the next fetch,
  ``acquired``, and the others wait for it); told so a second time it fetches itself at once
  (``waited-unstored``). It also fetches itself when its wait ends (``waited-timeout``): as
  a local waiter, it waits up to the request's deadline (the leaseholder's fetch is bounded
  by the origin timeout). Each Redis round trip of the wait (the lease, the L2 read) is
  bounded by what is left of it. A channel lost during the wait does not end it: the waiter
  looks at the lease and L2 again and goes on waiting.
* **Redis failing** (an error or no answer within the L2 write timeout, the L2 breaker open,
  the channel not subscribed when the request starts): it fetches, as with ``local``
  (``error``). Never an error to the client.

Once the lease may be this request's (its SET sent), it is released whatever happens next:
no answer in time, a cancellation, an error. A lease held under this process's own id is
taken as its own (:mod:`tierproxy.tiers.redis_leases`): a replica never waits on itself.

Outcomes are counted in ``tierproxy_coalesce_leases_total{outcome}``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .backfill import Backfiller
from .entry import Entry
from .metrics import Metrics
from .purge import Purges
from .states import Outcome, ProxyRequest, Stored
from .tiers.base import GuardedTier
from .tiers.redis_leases import LOST, STORED, UNSTORED, FetchLeases

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["OUTCOMES", "ClusterCoalescing"]

log = logging.getLogger("tierproxy.cluster_coalesce")

OUTCOMES = ("acquired", "waited-hit", "waited-unstored", "waited-timeout", "error")

# Rounds of (try the lease, read L2, wait) per request; its deadline ends it long before.
_MAX_ROUNDS = 1000


class ClusterCoalescing:
    """The fetch lease around a local leader's origin fetch (see module)."""

    def __init__(
        self,
        settings: Settings,
        leases: FetchLeases,
        l2: GuardedTier,
        read: Callable[[ProxyRequest], Awaitable[Entry | None]],
        purges: Purges,
        backfiller: Backfiller,
        metrics: Metrics,
    ) -> None:
        self.leases = leases
        self.l2 = l2
        self.read = read
        self.purges = purges
        self.backfiller = backfiller
        backfiller.track_shared = True  # its L2 writes' futures: the release awaits them
        self.origin_timeout = settings.origin_timeout
        self.write_timeout = settings.l2_write_timeout
        lease = settings.origin_timeout + settings.l2_write_timeout
        self.lease_ms = max(1, int(lease * 1000))
        self.recheck = max(0.05, min(1.0, lease / 4))
        self._counted = {o: metrics.coalesce_leases.labels(o) for o in OUTCOMES}
        self._releases: set[asyncio.Task[bool]] = set()

    def start(self) -> None:
        self.leases.start()

    async def stop(self) -> None:
        for task in list(self._releases):  # a few, each bounded by the L2 write timeout
            await asyncio.wait([task], timeout=self.write_timeout + 1.0)
        await self.leases.stop()

    async def fetch(
        self, req: ProxyRequest, flight: str, fetch: Callable[[], Awaitable[Outcome]]
    ) -> Outcome:
        """``fetch()`` under the fetch lease of ``flight`` (the local coalescer's flight name),
        or the entry another replica's fetch stored in L2 (see module)."""
        if not self.leases.connected or self.l2.breaker.is_open:
            self._counted["error"].inc()
            return await fetch()
        loop = asyncio.get_running_loop()
        lease = self.leases.lease_name(flight)
        generation = self.purges.generation
        # As a local waiter: while another replica's fetch runs (bounded by the origin
        # timeout), wait for it up to the request's deadline.
        wait_until = req.deadline
        told = False  # told stored/unstored once, without an entry for this request
        with self.leases.watch(lease) as note:  # before the lease is looked at: nothing missed
            for _ in range(_MAX_ROUNDS):
                left = wait_until - loop.time()
                if left <= 0:
                    break
                token = self.leases.token()
                taken = await self._acquire(lease, token, left)
                if taken is None:
                    self._counted["error"].inc()
                    return await fetch()
                if taken:
                    return await self._taken(req, lease, token, generation, wait_until, fetch)
                # Held by another replica: its entry may have landed since this one missed.
                entry = await self._read(req, generation, wait_until)
                if entry is not None:
                    self._counted["waited-hit"].inc()
                    return Stored(entry, False)
                left = wait_until - loop.time()
                if left <= 0:
                    break
                try:
                    async with asyncio.timeout(min(left, self.recheck)):
                        await note.event.wait()
                except TimeoutError:
                    continue  # the fallback re-check: the lease again (its holder may be gone)
                if note.what == LOST:  # the channel, not the fetch: look again, wait on
                    note.clear()
                    continue
                if note.what == STORED:
                    entry = await self._read(req, generation, wait_until)
                    if entry is not None:
                        self._counted["waited-hit"].inc()
                        return Stored(entry, False)
                # Not stored, or not for this request (purged since, a failed read). The
                # first time: the lease once more, so that one replica leads the next fetch
                # and the others wait for it; the second time: fetch at once.
                if not told:
                    told = True
                    note.clear()
                    continue
                self._counted["waited-unstored"].inc()
                return await fetch()
        self._counted["waited-timeout"].inc()
        return await fetch()

    async def _acquire(self, lease: str, token: str, left: float) -> bool | None:
        """The lease under ``token``; a SET that may have landed (no answer, cancelled) is
        released (compare-and-delete: only that token's lease goes) before this returns."""
        taken: bool | None = None
        try:
            taken = await self.leases.acquire(lease, token, self.lease_ms, timeout=left)
        finally:
            if taken is None:
                self._spawn_release(lease, token, None)
        return taken

    async def _taken(
        self,
        req: ProxyRequest,
        lease: str,
        token: str,
        generation: int,
        until: float,
        fetch: Callable[[], Awaitable[Outcome]],
    ) -> Outcome:
        """This request holds the lease: serve L2's entry or fetch; released either way."""
        led = False
        try:
            # The lease may be free because its last holder just stored the entry this
            # request's lookup missed: one more L2 read saves that fetch.
            entry = await self._read(req, generation, until)
            if entry is not None:
                self._spawn_release(lease, token, None, stored=True)  # it is there: say so
                led = True
                self._counted["waited-hit"].inc()
                return Stored(entry, False)
            self._counted["acquired"].inc()
            led = True
            return await self._lead(req, lease, token, fetch)
        finally:
            if not led:  # cancelled before either
                self._spawn_release(lease, token, None)

    async def _read(self, req: ProxyRequest, generation: int, until: float) -> Entry | None:
        """The entry in L2 for ``req``, unless a purge that may have been for it ran since
        ``generation`` (a copy read then may be the one purged); None past ``until``."""
        left = until - asyncio.get_running_loop().time()
        if left <= 0:
            return None
        try:
            async with asyncio.timeout(left):
                entry = await self.read(req)
        except TimeoutError:
            return None
        if entry is None or self.purges.purged_since(generation, req.key):
            return None
        return entry

    async def _lead(
        self, req: ProxyRequest, lease: str, token: str, fetch: Callable[[], Awaitable[Outcome]]
    ) -> Outcome:
        """Fetch as the key's leaseholder; the lease is released (and the outcome published)
        once the answer's L2 write has landed - in an owned task, so the client does not
        wait for it and a leader cancelled meanwhile (its client gone) still releases."""
        landed: asyncio.Future[bool] | None = None
        try:
            outcome = await fetch()
            if isinstance(outcome, Stored) and outcome.keep:
                landed = self.backfiller.shared_write(req.key)
            return outcome
        finally:
            self._spawn_release(lease, token, landed)

    def _spawn_release(
        self, lease: str, token: str, landed: asyncio.Future[bool] | None, *, stored: bool = False
    ) -> None:
        release = self._release(lease, token, landed, stored)
        task = asyncio.get_running_loop().create_task(release)
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(
        self, lease: str, token: str, landed: asyncio.Future[bool] | None, stored: bool = False
    ) -> bool:
        what = STORED if stored else UNSTORED
        if landed is not None:
            try:
                async with asyncio.timeout(self.write_timeout + 0.5):
                    if await asyncio.shield(landed):
                        what = STORED
            except TimeoutError:
                pass
        return await self.leases.release(lease, token, what)
