"""Removals the L3 tier missed while its file was unavailable are applied when it reopens.

Workers share one SQLite file. A worker whose file went away under it (another worker moved a
corrupt file aside and started a new one) and that was asked to purge meanwhile used to
discard the file on reopen - the new file every other worker was filling. It now applies the
removals it missed to the file it opens, and discards only when it missed more than it keeps.
A real SQLiteTier on a file in tmp_path, closed (unusable, as while its file is replaced)
while a second tier fills the file, as another worker would, and purges reach the first.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tierproxy.entry import Entry
from tierproxy.keys import KeySpace
from tierproxy.tiers.base import Blob, TierUnavailable
from tierproxy.tiers.sqlite import MAX_MISSED_REMOVALS, SQLiteTier

KEYS = KeySpace("http://origin.test")


def _tier(path: Path) -> SQLiteTier:
    return SQLiteTier(str(path), max_bytes=10**8, read_timeout=1.0, write_timeout=1.0, keys=KEYS)


def _entry(material: str, tags: tuple[str, ...] = ()) -> Entry:
    return Entry(
        key=material,
        status=200,
        headers=(("Content-Type", "text/plain"),),
        body=material.encode(),
        stored_at=1.0,
        fresh_until=4e9,
        stale_until=4e9,
        swr_until=4e9,
        expires_at=4e9,
        tags=tags,
    )


async def _store(tier: SQLiteTier, material: str, tags: tuple[str, ...] = ()) -> None:
    entry = _entry(material, tags)
    await tier.set(KEYS.key(material), entry, Blob(entry))


async def test_removals_missed_while_unavailable_are_applied_not_the_file_discarded(
    tmp_path: Path,
) -> None:
    path = tmp_path / "l3.sqlite3"
    first = _tier(path)
    await first.open()
    await first.close()  # unusable from here on, as while its file is being replaced
    # Meanwhile another worker fills the shared file.
    other = _tier(path)
    await other.open()
    for material in ("/purged", "/kept", "/tagged"):
        await _store(other, material, ("t1",) if material == "/tagged" else ())
    await other.close()
    # Purges reach the first tier while it cannot apply them.
    with pytest.raises(TierUnavailable):
        await first.delete(KEYS.key("/purged"))
    with pytest.raises(TierUnavailable):
        await first.purge([], ["t1"], None)
    await first.open()
    try:
        assert await first.get_bytes(KEYS.key("/purged")) is None
        assert await first.get_bytes(KEYS.key("/tagged")) is None
        assert await first.get_bytes(KEYS.key("/kept")) is not None  # the file was kept
    finally:
        await first.close()


async def test_too_many_missed_removals_discard_the_file(tmp_path: Path) -> None:
    path = tmp_path / "l3.sqlite3"
    first = _tier(path)
    await first.open()
    await first.close()
    other = _tier(path)
    await other.open()
    await _store(other, "/kept")
    await other.close()
    keys = [KEYS.key(f"/many/{i}") for i in range(MAX_MISSED_REMOVALS + 1)]
    with pytest.raises(TierUnavailable):
        await first.purge(keys, [], None)
    await first.open()
    try:
        # More than it remembers: what the file holds may have been purged, so it is gone.
        assert await first.get_bytes(KEYS.key("/kept")) is None
    finally:
        await first.close()
