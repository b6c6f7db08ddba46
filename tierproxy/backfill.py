"""Writing a copy into the tiers before the one it came from: L1 at once, the others as
owned, bounded background tasks (:class:`~tierproxy.background.BackgroundTasks`).

A backfill yields to purges: a copy read or fetched before a purge that may have been for its
key is not written, and a write a purge overtook is undone (:mod:`tierproxy.purge`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from .background import BackgroundTasks
from .entry import Entry
from .keys import CacheKey
from .metrics import Metrics
from .purge import Purges
from .tiers.base import Blob, GuardedTier, LocalTrust

__all__ = ["Backfiller"]


class Backfiller:
    def __init__(
        self,
        tiers: Sequence[GuardedTier],
        background: BackgroundTasks,
        metrics: Metrics,
        purges: Purges,
    ) -> None:
        self.tiers = tiers
        self.background = background
        self.purges = purges
        self._counters = metrics.backfills
        # Keys with backfills into L2/L3 still on their way (bounded by the background tasks):
        # a lookup may miss there until they land (see tierproxy.coalescer).
        self._storing: dict[str, int] = {}
        # The latest write of each key into the shared tier (L2) still on its way: its future
        # says whether it landed. Awaited by a replica that holds the key's fetch lease
        # (tierproxy.cluster_coalesce) before it tells the others the entry is there.
        # Kept only when set (TIERPROXY_COALESCE=cluster): otherwise nobody awaits them.
        self._shared: dict[str, asyncio.Future[bool]] = {}
        #: Whether to keep those futures (:class:`~tierproxy.cluster_coalesce.ClusterCoalescing`
        #: sets it).
        self.track_shared = False
        #: With replicas (Redis): write to a shared tier only while this replica holds its
        #: purge lease (see LocalTrust). None = always.
        self.trust: LocalTrust | None = None
        #: Called with a key's material when its last backfill into L2/L3 has ended (landed
        #: or not): the coalescer then counts the key's fetch as completed anew, since a
        #: lookup that began before may have missed the copy (tierproxy.coalescer).
        self.on_settled: Callable[[str], None] | None = None

    def storing(self, key: CacheKey) -> bool:
        """Whether a backfill of ``key`` into an awaited tier has yet to land."""
        return key.material in self._storing

    def shared_write(self, key: CacheKey) -> asyncio.Future[bool] | None:
        """The write of ``key`` into the shared tier still on its way (its result: whether it
        landed), or None when none is."""
        return self._shared.get(key.material)

    def backfill(self, key: CacheKey, entry: Entry, upto: int, generation: int) -> None:
        """Fill the tiers before index ``upto``: L1 now (memory), the others in the background.

        ``generation`` is the purge generation when ``entry`` was read or fetched: if a purge
        that may have been for this key (a purge of it, or by tag) ran since, the copy may be
        what was purged, and it is not written back anywhere (the client that asked still
        gets it). A purge is rare; a skipped backfill costs a miss.
        """
        if not upto or self.purges.refuses(generation, key, entry.tags):
            return  # (the first tier has no faster one to fill)
        blob: Blob | None = None
        for tier in self.tiers[:upto]:
            if tier.synchronous:
                tier.set_now(key, entry)
                continue
            if blob is None:
                blob = Blob(entry)
            self._spawn_store(tier, key, entry, blob, generation)

    def _spawn_store(
        self, tier: GuardedTier, key: CacheKey, entry: Entry, blob: Blob, generation: int
    ) -> None:
        counters, purges = self._counters, self.purges
        storing, material = self._storing, key.material
        landed: asyncio.Future[bool] | None = None
        if tier.shared and self.track_shared:
            landed = asyncio.get_running_loop().create_future()
            self._shared[material] = landed

        async def store() -> None:
            ok = False
            try:
                ok = await write()
            finally:
                _release(storing, material)
                purges.write_ended(material)
                _landed(self._shared, material, landed, ok)
                if material not in storing and self.on_settled is not None:
                    self.on_settled(material)

        async def write() -> bool:
            # A purge since this copy was read (or running now) may have been for it: don't
            # write it back, and undo a write that was on its way while the purge ran.
            if purges.refuses(generation, key, entry.tags):
                counters.labels(tier.name, "superseded").inc()
                return False
            # A replica that may have missed purges (its lease ran out) writes nothing that
            # every replica reads: a PURGE that counted it as fenced will not look again.
            if tier.shared and self.trust is not None and not self.trust.held():
                counters.labels(tier.name, "fenced").inc()
                return False
            ok = await tier.set(key, entry, blob)
            if purges.refuses(generation, key, entry.tags):
                # Also when the write timed out: it may still land (a statement already sent
                # to Redis, or queued on SQLite's writer thread). SQLite's writer runs them in
                # order, so this delete lands after it; Redis refuses a timed-out write once
                # its delete has run (RedisTier.delete), whichever connection it arrives on.
                await tier.delete(key)
                counters.labels(tier.name, "superseded").inc()
                return False
            if not ok and tier.write_may_land(key):
                # No reply: it may still land - after a purge this replica has not heard of
                # yet (the PURGE waits for this replica only until it applied it, and then
                # purges L2 once more: a write that lands later would stay). Withdraw it.
                await tier.delete(key)
            counters.labels(tier.name, "completed" if ok else "failed").inc()
            return ok

        storing[material] = storing.get(material, 0) + 1
        purges.write_began(material)
        if self.background.spawn(f"backfill-{tier.name}", store):
            counters.labels(tier.name, "started").inc()
        else:
            _release(storing, material)
            purges.write_ended(material)
            _landed(self._shared, material, landed, False)
            counters.labels(tier.name, "dropped").inc()


def _release(storing: dict[str, int], material: str) -> None:
    left = storing.pop(material) - 1
    if left:
        storing[material] = left


def _landed(
    shared: dict[str, asyncio.Future[bool]],
    material: str,
    landed: asyncio.Future[bool] | None,
    ok: bool,
) -> None:
    if landed is None:
        return
    if not landed.done():
        landed.set_result(ok)
    if shared.get(material) is landed:
        del shared[material]
