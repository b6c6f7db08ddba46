"""Purging this process's tiers, and remembering that it happened.

* **Generations.** A purge bumps the purge generation before and after it runs. A copy read or
  fetched under an older generation is served to its client but not written back anywhere
  (:meth:`Purges.purged_since`), so a purge cannot be undone by a response already on its way
  or a backfill still pending. The log says what each bump was for - the keys of a key purge,
  or None (tags, or too many keys: any key) - so a purge of one key does not stop copies of
  every other key in flight from being stored.
* **The local purge** (:meth:`Purges.purge`): every tier, slowest first, each under its write
  timeout (at least :data:`PURGE_MIN_TIMEOUT`).
* **Invalidation** of one key (RFC 9111 §4.4, :meth:`Purges.invalidate`): required work,
  never dropped.
* **Writes it overtook.** A backfill write on its way while a purge of its key runs is undone
  by its writer once it lands (:mod:`tierproxy.backfill`; an L2 write that got no reply is
  withdrawn: Redis refuses it if it arrives later, :mod:`tierproxy.tiers.redis`); a purge
  waits for those writes (bounded by twice the slowest tier's write timeout) before it
  answers, so what it purged is not found again once it has answered - another variant of a
  URL included.
* **Held while it runs** (:meth:`Purges.holding`): until those writes are undone no copy of a
  key it covers (an entry carrying one of its tags) is written anywhere, whenever it was read
  - a lookup may find an overtaken write's copy in a tier already purged, before its undo.

The replicas' fan-out (the purge log in Redis, leases) is :mod:`tierproxy.invalidation`'s.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Collection, Iterator, Sequence

from .background import BackgroundTasks
from .keys import CacheKey
from .tiers.base import GuardedTier, PurgeUnsupported

__all__ = ["PURGE_LOG", "PURGE_MIN_TIMEOUT", "Purges"]

log = logging.getLogger("tierproxy.readthrough")

# A purge is an operator's request, not the client path: it gets at least this long per tier.
PURGE_MIN_TIMEOUT = 5.0
# Purge generations remembered with their keys; a copy older than them is not stored. A key
# purge of more keys than _PURGE_SCOPE_KEYS is remembered as "any key" (bounded memory).
PURGE_LOG = 1024
_PURGE_SCOPE_KEYS = 256


class Purges:
    """The purge generations, and purges of this process's tiers (see module)."""

    def __init__(self, tiers: Sequence[GuardedTier], background: BackgroundTasks) -> None:
        self.tiers = tiers
        self.background = background
        #: Bumped before and after every purge (and by :meth:`distrust_local`).
        self.generation = 0
        self._log: collections.deque[tuple[int, frozenset[str] | None]] = collections.deque(
            maxlen=PURGE_LOG
        )
        # The purges running now (:meth:`holding`): (keys, tags) each.
        self._active: list[tuple[frozenset[str], frozenset[str]]] = []
        # Backfill writes on their way per key material, and the purges waiting for them.
        self._writing: dict[str, int] = {}
        self._settled: list[tuple[frozenset[str] | None, asyncio.Future[None]]] = []

    def write_began(self, material: str) -> None:
        """A backfill write of ``material`` is on its way (see :meth:`write_ended`)."""
        self._writing[material] = self._writing.get(material, 0) + 1

    def write_ended(self, material: str) -> None:
        """That write has landed, failed or been undone: purges waiting for it may answer."""
        left = self._writing.pop(material, 1) - 1
        if left > 0:
            self._writing[material] = left
        if self._settled:
            waiting, self._settled = self._settled, []
            for scope, future in waiting:
                if future.done():
                    continue
                if self._pending(scope):
                    self._settled.append((scope, future))
                else:
                    future.set_result(None)

    def _pending(self, scope: frozenset[str] | None) -> bool:
        if scope is None:
            return bool(self._writing)
        return not scope.isdisjoint(self._writing)

    async def _writes_settled(self, scope: frozenset[str] | None, timeout: float) -> None:
        """Wait (at most ``timeout``) for the backfill writes of ``scope`` (None: any key)
        that were on their way: each is undone by its writer, the purge having overtaken it."""
        if not self._pending(scope):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._settled.append((scope, future))
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            log.warning("purge answered with backfill writes still on their way")
        finally:
            if not future.done():
                future.cancel()

    def bump(self, scope: frozenset[str] | None) -> None:
        """A purge of the keys in ``scope`` (None: of any key) begins or ends."""
        self.generation += 1
        self._log.append((self.generation, scope))

    def purged_since(self, generation: int, key: CacheKey) -> bool:
        """Whether a purge that began after ``generation`` may have been for ``key``."""
        if generation == self.generation:
            return False
        bumps = self._log
        if not bumps or bumps[0][0] > generation + 1:
            return True  # bumps older than the log remembers: assume they were for this key
        for bumped_to, scope in reversed(bumps):
            if bumped_to <= generation:
                break
            if scope is None or key.material in scope:
                return True
        return False

    @contextlib.contextmanager
    def holding(self, keys: Sequence[CacheKey], tags: Sequence[str]) -> Iterator[None]:
        """A purge of ``keys`` and ``tags`` runs for as long as this is held: no copy of a
        key it covers (an entry carrying one of its tags) is written anywhere meanwhile
        (:meth:`refuses`), whenever that copy was read - a lookup may find one in a tier the
        purge already went through (a write it overtook has landed there and is not undone
        yet, another replica wrote it before it heard of the purge). On release the
        generation moves: a copy read before is refused by :meth:`purged_since`."""
        hold = (frozenset(key.material for key in keys), frozenset(tags))
        scope = _scope(keys, tags)
        self.bump(scope)
        self._active.append(hold)
        try:
            yield
        finally:
            self._active.remove(hold)
            self.bump(scope)

    def refuses(self, generation: int, key: CacheKey, tags: Collection[str] = ()) -> bool:
        """Whether a copy of ``key`` (carrying ``tags``) read or fetched at ``generation``
        must not be written anywhere: a purge that may have been for it ran since, or is
        running now (:meth:`holding`)."""
        if generation == self.generation and not self._active:
            return False  # (every backfill asks: the common case first)
        for keys, purged_tags in self._active:
            if key.material in keys or not purged_tags.isdisjoint(tags):
                return True
        return self.purged_since(generation, key)

    def distrust_local(self) -> None:
        """Local copies may have missed purges: a copy read or fetched before now is not
        written back anywhere (as after a purge of every key)."""
        self.bump(None)

    async def purge(
        self,
        keys: Sequence[CacheKey],
        tags: Sequence[str],
        soft_at: float | None = None,
        *,
        shared: bool = True,
        local: bool = True,
        synchronous_only: bool = False,
    ) -> dict[str, int | str]:
        """Purge ``keys`` and every entry tagged with one of ``tags`` now.

        Hard purge deletes; ``soft_at`` (wall clock) marks the entries stale as of then
        instead, so they are revalidated and can still be served on origin failure.
        ``shared=False`` (a purge heard from another replica) skips tiers every replica shares;
        ``local=False`` purges only those; ``synchronous_only`` only the tiers that answer at
        once (L1: the second round of a purge between replicas, tierproxy.invalidation).
        Returns {tier: entries changed, or "error" / "timeout" / "unsupported"}.

        Slowest tier first: a lookup that runs during the purge can then only find an old copy
        in a tier that is still to be purged, never backfill a purged tier from an unpurged one.
        Held (:meth:`holding`) until the backfill writes it overtook have been undone: a copy
        such a write put into a purged tier meanwhile is written nowhere else.
        """
        with self.holding(keys, tags):
            return await self._purge(keys, tags, soft_at, shared, local, synchronous_only)

    async def _purge(
        self,
        keys: Sequence[CacheKey],
        tags: Sequence[str],
        soft_at: float | None,
        shared: bool,
        local: bool,
        synchronous_only: bool,
    ) -> dict[str, int | str]:
        results: dict[str, int | str] = {}
        for tier in reversed(self.tiers):
            if not (shared if tier.shared else local):
                continue
            if synchronous_only and not tier.synchronous:
                continue
            timeout = max(tier.write_timeout, PURGE_MIN_TIMEOUT)
            try:
                results[tier.name] = await tier.purge(keys, tags, soft_at, timeout)
            except PurgeUnsupported:
                results[tier.name] = "unsupported"
            except TimeoutError:
                log.warning("purge in %s timed out after %.1fs", tier.name, timeout)
                results[tier.name] = "timeout"
            except Exception as exc:  # noqa: BLE001 - one tier's failure is reported per tier; the others proceed
                log.warning("purge in %s failed: %r", tier.name, exc)
                results[tier.name] = "error"
        writes = [2 * tier.write_timeout for tier in self.tiers if not tier.synchronous]
        if writes and not synchronous_only:
            await self._writes_settled(
                frozenset(key.material for key in keys) if not tags else None, max(writes)
            )
        return dict(reversed(results.items()))

    def remove_now(self, keys: Sequence[CacheKey]) -> None:
        """Drop ``keys`` from the tiers that answer at once (L1), before any await."""
        for tier in self.tiers:
            if tier.synchronous:
                for key in keys:
                    tier.remove_now(key)

    async def invalidate(self, key: CacheKey) -> None:
        """Forget ``key`` everywhere (RFC 9111 §4.4): L1 now, then every tier as a purge of
        the key does (slowest first, between generation bumps: a backfill on its way is not
        written or is undone, and a lookup meanwhile cannot refill L1 from a copy still in L2)
        - as required work, never dropped: when that lane is full, the caller waits for it."""
        self.remove_now((key,))

        async def purge() -> None:
            await self.purge([key], ())

        await self.background.run_required("invalidate", purge)


def _scope(keys: Sequence[CacheKey], tags: Sequence[str]) -> frozenset[str] | None:
    """What the generation log remembers of a purge: its keys, or None (any key)."""
    if tags or len(keys) > _PURGE_SCOPE_KEYS:
        return None
    return frozenset(key.material for key in keys)
