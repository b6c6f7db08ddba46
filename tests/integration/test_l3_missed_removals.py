"""Removals the L3 tier missed while its file was unavailable are applied when it reopens.

Workers share one SQLite file. A worker whose file went away under it (another worker moved a
corrupt file aside and started a new one) and that was asked to purge meanwhile used to
discard the file on reopen - the new file every other worker was filling. It now applies the
removals it missed to the file it opens, and discards only when it missed more than it keeps.
A real SQLiteTier on a file in tmp_path, closed (unusable, as while its file is replaced)
while a second tier fills the file, as another worker would, and purges reach the first.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from support.records import long_lived
from support.wait import wait_for_condition

from tierproxy import codec
from tierproxy.keys import KeySpace
from tierproxy.tiers.base import Blob, TierUnavailable
from tierproxy.tiers.sqlite import MAX_MISSED_REMOVALS, SQLiteTier

KEYS = KeySpace("http://origin.test")


def _tier(path: Path) -> SQLiteTier:
    return SQLiteTier(str(path), max_bytes=10**8, read_timeout=1.0, write_timeout=1.0, keys=KEYS)


async def _store(tier: SQLiteTier, material: str, tags: tuple[str, ...] = ()) -> None:
    entry = long_lived(material, material.encode(), tags)
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


def _fill(path: Path, tags: list[str], per_tag: int) -> None:
    """``per_tag`` entries under each of ``tags`` written straight into the file (as another
    worker's tier would write them, far faster)."""
    now = time.time()
    rows = []
    for tag in tags:
        for i in range(per_tag):
            material = f"/{tag}/{i}"
            record = codec.encode(long_lived(material, material.encode(), (tag,)))
            digest = KEYS.key(f"/{tag}/{i}").digest
            rows.append((digest, record, len(record), 4e9, now, json.dumps([KEYS.tag_id(tag)])))
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO entries (key, value, size, expires_at, accessed_at, tags)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


async def _reopened_after_missing_soft_purges(
    path: Path, tags: list[str], per_tag: int
) -> tuple[SQLiteTier, float]:
    """A tier that missed a soft purge of each of ``tags`` (filled by another worker while it
    was unusable), reopened with a 0.2 s open timeout and back within 30 s."""
    first = _tier(path)
    await first.open()
    await first.close()
    other = _tier(path)
    await other.open()
    await other.close()
    _fill(path, tags, per_tag)
    soft_at = time.time()
    for tag in tags:
        with pytest.raises(TierUnavailable):
            await first.purge([], [tag], soft_at)
    first._open_timeout = 0.2
    first.retry_max = 0.25
    await first.open()
    await wait_for_condition(lambda: first.available, timeout=30, message="L3 reopened")
    return first, soft_at


async def _nothing_purged_is_fresh(
    tier: SQLiteTier, tags: list[str], per_tag: int, soft_at: float
) -> int:
    """How many of a sample of the purged entries the tier still holds (stale: checked)."""
    held = 0
    for tag in tags:
        for i in (0, per_tag // 2, per_tag - 1):
            data = await tier.get_bytes(KEYS.key(f"/{tag}/{i}"))
            if data is not None:
                held += 1
                assert codec.decode(data, f"/{tag}/{i}").fresh_until <= soft_at, (tag, i)
    return held


async def test_a_replay_longer_than_the_open_timeout_still_ends_with_the_removals_applied(
    tmp_path: Path,
) -> None:
    """The missed removals are applied inside the open, under its timeout. A replay that
    takes longer (soft purges rewriting many entries, a slow disk) used to be undone whole
    and begun again at every retry, none ever finishing: the tier stayed unavailable for
    good. Each applied removal is now kept, so retries go on from where the last stopped.
    The whole replay here (32,000 entries rewritten) takes far longer than the 0.2 s open
    timeout; one tag's does not, on an ordinary machine (if it does, the next test's
    discarding makes this pass all the same)."""
    tags = [f"t{i}" for i in range(8)]
    tier, soft_at = await _reopened_after_missing_soft_purges(tmp_path / "l3.sqlite3", tags, 4000)
    try:
        await _nothing_purged_is_fresh(tier, tags, 4000, soft_at)
    finally:
        await tier.close()


async def test_a_missed_removal_that_never_fits_in_an_open_has_the_file_discarded(
    tmp_path: Path,
) -> None:
    """One removal that cannot be applied within the open timeout by itself (a soft purge of
    a tag on 32,000 entries, 0.2 s): after two opens that applied nothing, the file is
    discarded, as when too many removals were missed, and the tier comes back empty."""
    tier, soft_at = await _reopened_after_missing_soft_purges(tmp_path / "l3.sqlite3", ["t"], 32000)
    try:
        assert await _nothing_purged_is_fresh(tier, ["t"], 32000, soft_at) == 0
        assert tier.entries == 0
    finally:
        await tier.close()
