"""L1: a byte-bounded in-process LRU of entries. Lookups never await.

A tag -> keys index serves surrogate-key purges. It holds only keys of entries that are in L1
(every removal and eviction goes through :meth:`MemoryTier._remove`), and each entry's tags
are counted in the byte bound, so the index is bounded with the entries.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..clock import SYSTEM, Clock
from ..entry import Entry
from ..keys import CacheKey
from .base import Blob, Configured, TierBackend, mark_stale

if TYPE_CHECKING:
    from ..config import Settings
    from ..keys import KeySpace
    from ..metrics import Metrics

__all__ = ["MemoryTier", "configured"]

# Bytes charged per tag of an entry on top of the tag's length: the index's set slot and the
# dict entry, roughly. Untagged entries cost exactly ``entry.size``.
_TAG_OVERHEAD = 64


def _cost(entry: Entry) -> int:
    if not entry.tags:
        return entry.size
    return entry.size + sum(len(tag) + _TAG_OVERHEAD for tag in entry.tags)


def configured(
    settings: Settings, metrics: Metrics, keys: KeySpace, *, clock: Clock = SYSTEM
) -> Configured | None:
    """L1, unless TIERPROXY_L1_MAX_BYTES=0."""
    if settings.l1_max_bytes <= 0:
        return None
    return Configured(
        MemoryTier(settings.l1_max_bytes, clock=clock), settings.l1_timeout, settings.l1_timeout
    )


class MemoryTier(TierBackend):
    name = "l1"
    synchronous = True

    def __init__(self, max_bytes: int, *, clock: Clock = SYSTEM) -> None:
        self.clock = clock  # an expired entry is dropped when it is looked up
        self.max_bytes = max_bytes
        # An entry may take at most an eighth of L1, so one large response can't flush it.
        self.max_entry_bytes = max(1, max_bytes // 8)
        self.bytes = 0
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._tags: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get_now(self, key: CacheKey) -> Entry | None:
        entry = self._entries.get(key.material)
        if entry is None:
            return None
        if entry.expires_at <= self.clock.wall():
            self._remove(key.material)
            return None
        self._entries.move_to_end(key.material)
        return entry

    def set_now(self, key: CacheKey, entry: Entry) -> bool:
        self._remove(key.material)
        cost = _cost(entry)
        if cost > self.max_entry_bytes:
            return False
        self._entries[key.material] = entry
        self.bytes += cost
        for tag in entry.tags:
            members = self._tags.get(tag)
            if members is None:
                self._tags[tag] = {key.material}
            else:
                members.add(key.material)
        while self.bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)
        return True

    def _remove(self, material: str) -> bool:
        old = self._entries.pop(material, None)
        if old is None:
            return False
        self.bytes -= _cost(old)
        for tag in old.tags:
            members = self._tags.get(tag)
            if members is not None:
                members.discard(material)
                if not members:
                    del self._tags[tag]
        return True

    def remove_now(self, key: CacheKey) -> bool:
        return self._remove(key.material)

    def watch(self, metrics: Metrics) -> None:
        metrics.l1_bytes.set_function(lambda: self.bytes)
        metrics.l1_entries.set_function(lambda: len(self))

    def tagged(self, tag: str) -> int:
        """How many L1 entries carry ``tag``."""
        return len(self._tags.get(tag, ()))

    def clear(self) -> int:
        count = len(self._entries)
        self._entries.clear()
        self._tags.clear()
        self.bytes = 0
        return count

    async def purge(
        self, keys: Sequence[CacheKey], tags: Sequence[str], soft_at: float | None
    ) -> int:
        materials = {key.material for key in keys}
        for tag in tags:
            materials.update(self._tags.get(tag, ()))
        changed = 0
        for material in materials:
            if soft_at is None:
                changed += self._remove(material)
                continue
            entry = self._entries.get(material)
            marked = mark_stale(entry, soft_at) if entry is not None else None
            if marked is not None:
                # Same size and tags: swap in place, keeping the LRU position.
                self._entries[material] = marked
                changed += 1
        return changed

    async def get(self, key: CacheKey) -> Entry | None:
        return self.get_now(key)

    async def set(self, key: CacheKey, entry: Entry, blob: Blob) -> None:
        self.set_now(key, entry)

    async def delete(self, key: CacheKey) -> bool:
        return self.remove_now(key)

    async def close(self) -> None:
        self.clear()
