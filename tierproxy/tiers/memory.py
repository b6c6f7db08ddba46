"""L1: a byte-bounded in-process LRU of entries. Lookups never await."""

from __future__ import annotations

import time
from collections import OrderedDict

from ..entry import Entry
from ..keys import CacheKey
from .base import Blob, TierBackend

__all__ = ["MemoryTier"]


class MemoryTier(TierBackend):
    name = "l1"
    synchronous = True

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        # An entry may take at most an eighth of L1, so one large response can't flush it.
        self.max_entry_bytes = max(1, max_bytes // 8)
        self.bytes = 0
        self._entries: OrderedDict[str, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get_now(self, key: CacheKey) -> Entry | None:
        entry = self._entries.get(key.material)
        if entry is None:
            return None
        if entry.expires_at <= time.time():
            self._remove(key.material)
            return None
        self._entries.move_to_end(key.material)
        return entry

    def set_now(self, key: CacheKey, entry: Entry) -> bool:
        self._remove(key.material)
        if entry.size > self.max_entry_bytes:
            return False
        self._entries[key.material] = entry
        self.bytes += entry.size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.size
        return True

    def _remove(self, material: str) -> bool:
        old = self._entries.pop(material, None)
        if old is None:
            return False
        self.bytes -= old.size
        return True

    def remove_now(self, key: CacheKey) -> bool:
        return self._remove(key.material)

    def clear(self) -> int:
        count = len(self._entries)
        self._entries.clear()
        self.bytes = 0
        return count

    async def get(self, key: CacheKey) -> Entry | None:
        return self.get_now(key)

    async def set(self, key: CacheKey, entry: Entry, blob: Blob) -> None:
        self.set_now(key, entry)

    async def delete(self, key: CacheKey) -> bool:
        return self.remove_now(key)

    async def close(self) -> None:
        self.clear()
