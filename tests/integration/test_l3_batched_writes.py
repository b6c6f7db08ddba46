"""L3 writes that overlap go to the file together (SQLiteTier.set batches, _write_rows).

A real SQLiteTier on a file in tmp_path; what landed is read back by the tier and by a
connection of our own, as another process sharing the file would read it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sqlite3
from pathlib import Path

from support.records import long_lived
from support.storage import sqlite_count

from tierproxy.keys import KeySpace
from tierproxy.tiers.base import Blob, TierUnavailable
from tierproxy.tiers.sqlite import MAX_WAITING_WRITES, WRITE_BATCH, SQLiteTier

KEYS = KeySpace("http://origin.test")


async def _set(tier: SQLiteTier, material: str, body: bytes, tags: tuple[str, ...] = ()) -> None:
    entry = long_lived(material, body, tags)
    await tier.set(KEYS.key(material), entry, Blob(entry))


async def _open(path: Path) -> SQLiteTier:
    tier = SQLiteTier(str(path), max_bytes=10**8, read_timeout=1.0, write_timeout=1.0, keys=KEYS)
    await tier.open()
    return tier


async def test_overlapping_writes_land_together_each_exact(tmp_path: Path) -> None:
    path = tmp_path / "l3.sqlite3"
    tier = await _open(path)
    try:
        count = 300
        await asyncio.gather(
            *(
                _set(tier, f"/k/{i}", b"body %d " % i * 40, ("tag",) if i % 2 else ())
                for i in range(count)
            )
        )
        assert tier.rows_written == count
        # Begun together, they wait for the writer together: full batches (one statement
        # each), where each row took three trips of its own.
        assert tier.write_batches == math.ceil(count / WRITE_BATCH), tier.write_batches
        assert sqlite_count(path) == count and tier.entries == count
        for i in (0, 1, 150, count - 1):
            entry = await tier.get(KEYS.key(f"/k/{i}"))
            assert entry is not None and entry.body == b"body %d " % i * 40
        # The tags were indexed with the rows (triggers): a tag purge finds exactly them.
        assert await tier.purge([], ["tag"], None) == count // 2
        assert sqlite_count(path) == count - count // 2
    finally:
        await tier.close()


async def test_the_last_write_of_a_key_in_a_batch_wins(tmp_path: Path) -> None:
    tier = await _open(tmp_path / "l3.sqlite3")
    try:
        # Ten writes of one key begun together: one batch, one statement, the last one wins.
        await asyncio.gather(*(_set(tier, "/same", b"version %d" % n) for n in range(10)))
        assert tier.write_batches == 1 and tier.rows_written == 10
        entry = await tier.get(KEYS.key("/same"))
        assert entry is not None and entry.body == b"version 9"
    finally:
        await tier.close()


async def test_a_write_given_up_before_its_batch_goes_is_not_written(tmp_path: Path) -> None:
    path = tmp_path / "l3.sqlite3"
    tier = await _open(path)
    try:
        first = asyncio.ensure_future(_set(tier, "/first", b"x"))
        await asyncio.sleep(0)  # the first batch is on its way: the next waits for it
        given_up = asyncio.ensure_future(_set(tier, "/given-up", b"y"))
        kept = asyncio.ensure_future(_set(tier, "/kept", b"z"))
        await asyncio.sleep(0)
        given_up.cancel()  # (as its write timeout would)
        await asyncio.gather(first, kept)
        assert given_up.cancelled()
        assert await tier.get(KEYS.key("/given-up")) is None
        assert await tier.get(KEYS.key("/kept")) is not None
    finally:
        await tier.close()


async def test_writes_waiting_when_the_tier_closes_fail_as_unavailable(tmp_path: Path) -> None:
    tier = await _open(tmp_path / "l3.sqlite3")
    writes = [asyncio.ensure_future(_set(tier, f"/w/{i}", b"v")) for i in range(50)]
    await asyncio.sleep(0)
    await tier.close()
    outcomes = await asyncio.gather(*writes, return_exceptions=True)
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    # Some may have landed before the close; none hangs, and what failed says why.
    assert all(isinstance(o, TierUnavailable) for o in failed), failed
    assert not tier._rows and tier._row_writer is None


async def test_an_entry_read_since_the_last_flush_is_not_evicted_as_least_recently_used(
    tmp_path: Path,
) -> None:
    """Reads are written to the file (``accessed_at``, the order eviction goes by) once a
    second at most, after a batch. A batch that must make room first evicted by the order
    the file held: an entry read many times since the last flush, but stored first, went
    first."""
    path = tmp_path / "l3.sqlite3"
    tier = SQLiteTier(
        str(path), max_bytes=2 * 2**20, read_timeout=1.0, write_timeout=2.0, keys=KEYS
    )
    await tier.open()
    try:
        body = b"b" * 10_000
        for group in range(14):  # 140 entries of 10 kB, under the 1.75 MiB the data may use
            await asyncio.gather(*(_set(tier, f"/old/{group}/{i}", body) for i in range(10)))
        stored = sqlite_count(path)
        hot = "/old/0/0"  # among the first stored: the file holds it as least recently used
        for _ in range(3):
            assert await tier.get(KEYS.key(hot)) is not None
        # New entries past the bound: the batch makes room by evicting about a tenth.
        for group in range(6):
            await asyncio.gather(*(_set(tier, f"/new/{group}/{i}", body) for i in range(10)))
        assert sqlite_count(path) < stored + 60, "nothing was evicted: the test proves nothing"
        assert await tier.get(KEYS.key("/old/0/1")) is None  # stored with it, never read
        assert await tier.get(KEYS.key(hot)) is not None
    finally:
        await tier.close()


async def test_a_row_whose_values_fail_fails_alone(tmp_path: Path) -> None:
    """One statement writes a batch, so one row's bad value (here a lifetime SQLite stores as
    NULL, against the column's NOT NULL) fails the statement: the batch is then written a
    row at a time, and only that row's caller hears of it."""
    tier = await _open(tmp_path / "l3.sqlite3")
    try:
        bad = dataclasses.replace(long_lived("/bad", b"x"), expires_at=math.nan)
        outcomes = await asyncio.gather(
            *(_set(tier, f"/good/{i}", b"g") for i in range(5)),
            tier.set(KEYS.key("/bad"), bad, Blob(bad)),
            return_exceptions=True,
        )
        assert outcomes[:5] == [None] * 5, outcomes
        assert isinstance(outcomes[5], sqlite3.IntegrityError), outcomes
        assert tier.rows_written == 5
        assert await tier.get(KEYS.key("/good/4")) is not None
    finally:
        await tier.close()


async def test_writes_past_the_bound_are_skipped_and_a_given_up_row_is_let_go(
    tmp_path: Path,
) -> None:
    tier = await _open(tmp_path / "l3.sqlite3")
    try:
        await tier._write_lock.acquire()  # the writer busy with a slow write
        try:
            writes = [
                asyncio.ensure_future(_set(tier, f"/w/{i}", b"v"))
                for i in range(MAX_WAITING_WRITES + 10)
            ]
            await asyncio.sleep(0.05)
            refused = [w for w in writes if w.done()]
            assert len(refused) == 10, len(refused)
            assert all(isinstance(w.exception(), TierUnavailable) for w in refused)
            waiting = [w for w in writes if not w.done()]
            for w in waiting[-100:]:
                w.cancel()  # their write timeouts
            await asyncio.sleep(0)
            # What they gave up is not held while it waits to be dropped.
            assert sum(1 for r in tier._rows if r.row is None) == 100
        finally:
            tier._write_lock.release()
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        assert sum(1 for o in outcomes if o is None) == len(waiting) - 100
        assert tier.rows_written == len(waiting) - 100
    finally:
        await tier.close()
