"""L3 rows whose value is not a record: a TEXT, INTEGER or REAL where the BLOB should be.

A damaged record header leaves one (BLOB and TEXT serial types differ in their lowest bit, and
the length stays the same, so SQLite cannot tell), and so can a foreign writer. A real
SQLiteTier on a file in tmp_path; the rows are written by a second connection, as another
process sharing the file (or damage to it) would leave them.

Found by a review: ``bytes(value)`` raised inside the callback that settles a batch of lookups,
so every caller after that row in the batch was never answered; read alone, the lookup was
never settled and every L3 lookup behind it waited; a purge of the key waited its whole
timeout and left the row. Now such a row is a corrupt copy: a miss, deleted and counted.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from support.storage import open_l3

from tierproxy.entry import Entry
from tierproxy.keys import KeySpace
from tierproxy.metrics import Metrics
from tierproxy.tiers.base import Blob, Breaker, GuardedTier
from tierproxy.tiers.sqlite import SQLiteTier

KEYS = KeySpace("http://origin.test")
BAD = "a text value, valid UTF-8"  # what SQLite hands back as str


def _store(path: Path, values: dict[str, object]) -> None:
    """Rows as they are in the file; a value that is not a BLOB is what a damaged record
    header (BLOB and TEXT serial types differ in their lowest bit) or a foreign writer leaves."""
    conn = sqlite3.connect(str(path), timeout=2.0, isolation_level=None)
    try:
        now = time.time()
        conn.executemany(
            "INSERT INTO entries (key, value, size, expires_at, accessed_at) VALUES (?,?,?,?,?)",
            [(KEYS.key(m).digest, v, 1, now + 600, now) for m, v in values.items()],
        )
    finally:
        conn.close()


def _rows_of(path: Path, material: str) -> int:
    conn = sqlite3.connect(str(path), timeout=2.0, isolation_level=None)
    try:
        return int(
            conn.execute(
                "SELECT COUNT(*) FROM entries WHERE key = ?", (KEYS.key(material).digest,)
            ).fetchone()[0]
        )
    finally:
        conn.close()


async def _open(path: Path, read_timeout: float) -> SQLiteTier:
    return await open_l3(path, KEYS, read_timeout)


@pytest.mark.parametrize("bad", [BAD, -1, 1.5])
async def test_a_row_whose_value_is_not_a_blob_does_not_strand_the_rest_of_its_batch(
    tmp_path: Path, bad: object
) -> None:
    """Every lookup of the batch is answered (before the fix, the callers after the damaged
    row waited for ever), the good keys with their values."""
    path = tmp_path / "l3.sqlite3"
    tier = await _open(path, 1.0)
    try:
        good = {f"/k{i}": f"value {i}".encode() for i in range(8)}
        _store(path, {**good, "/bad": bad})
        materials = ["/first", "/bad", *good]  # /first goes alone, the rest in one batch
        tasks = [asyncio.create_task(tier.get_bytes(KEYS.key(m))) for m in materials]
        _, pending = await asyncio.wait(tasks, timeout=3.0)
        for task in pending:
            task.cancel()
        answered = {
            m: (t.exception() or t.result())
            for m, t in zip(materials, tasks, strict=True)
            if t.done()
        }
        stranded = [m for m, t in zip(materials, tasks, strict=True) if not t.done()]
        assert not stranded, f"never answered after 3 s (read timeout 1 s): {stranded}"
        for material, value in good.items():
            assert answered[material] == value
    finally:
        await tier.close()


async def test_purging_a_row_whose_value_is_not_a_blob_neither_hangs_nor_holds_other_lookups(
    tmp_path: Path,
) -> None:
    """A PURGE of the damaged key reads it alone first (GuardedTier._with_variants). Before the
    fix that read was never settled: the purge waited its whole timeout, reported L3
    ``timeout`` with the row left in place, and every lookup of a good key meanwhile timed out.
    Now the purge ends, the row is gone, and the good keys are hits."""
    path = tmp_path / "l3.sqlite3"
    backend = await _open(path, 0.5)
    tier = GuardedTier(backend, 0.5, 1.0, Breaker(3, 60.0), Metrics())
    try:
        good = {f"/k{i}": f"value {i}".encode() for i in range(4)}
        now = time.time()
        for material, body in good.items():
            entry = Entry(
                key=material,
                status=200,
                headers=(("content-type", "text/plain"),),
                body=body,
                stored_at=now,
                fresh_until=now + 600,
                stale_until=now + 600,
                swr_until=now + 600,
                expires_at=now + 600,
            )
            assert await tier.set(KEYS.key(material), entry, Blob(entry))
        _store(path, {"/bad": BAD})
        loop = asyncio.get_running_loop()
        purge = asyncio.ensure_future(tier.purge([KEYS.key("/bad")], (), None, 2.0))
        await asyncio.sleep(0.05)  # the purge's lone read of /bad is back (never settled)
        found = await asyncio.gather(*(tier.get(KEYS.key(m), 0.5, None, loop) for m in good))
        outcome: object
        try:
            outcome = await purge
        except Exception as exc:  # noqa: BLE001 - what the purge reported
            outcome = exc
        bodies = [e.body if e is not None else None for e in found]
        left = _rows_of(path, "/bad")
        assert (bodies, isinstance(outcome, int), left) == (list(good.values()), True, 0), (
            f"good keys got {bodies}; purge of /bad gave"
            f" {outcome!r}, its row still there: {bool(left)}"
        )
    finally:
        await tier.close()


async def test_a_damaged_row_is_a_miss_and_is_deleted_and_a_soft_purge_ends(
    tmp_path: Path,
) -> None:
    """A lookup of a damaged row (here TEXT that is not even UTF-8, which SQLite refused to
    hand back at all) is a miss counted as corrupt, and deletes it; a soft purge of one ends
    (its read of the key drops the row) instead of failing on it."""
    path = tmp_path / "l3.sqlite3"
    backend = await _open(path, 0.5)
    metrics = Metrics()
    tier = GuardedTier(backend, 0.5, 1.0, Breaker(3, 60.0), metrics)
    try:
        _store(path, {"/soft": 7, "/bad": b"\xff\xfe not utf-8"})
        conn = sqlite3.connect(str(path), timeout=2.0, isolation_level=None)
        try:  # the same bytes, typed TEXT: what a flipped serial-type bit makes of a BLOB
            conn.execute(
                "UPDATE entries SET value = CAST(value AS TEXT) WHERE key = ?",
                (KEYS.key("/bad").digest,),
            )
            assert conn.execute(
                "SELECT typeof(value) FROM entries WHERE key = ?", (KEYS.key("/bad").digest,)
            ).fetchone() == ("text",)
        finally:
            conn.close()
        assert await tier.purge([KEYS.key("/soft")], (), time.time(), 2.0) == 0
        assert _rows_of(path, "/soft") == 0
        loop = asyncio.get_running_loop()
        assert await tier.get(KEYS.key("/bad"), 0.5, None, loop) is None
        assert _rows_of(path, "/bad") == 0
        assert metrics.tier_lookups.labels(backend.name, "corrupt").value == 1
    finally:
        await tier.close()
