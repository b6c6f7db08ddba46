"""L3 lookups that overlap share trips to the reader's thread (SQLiteTier.get_bytes batches).

A real SQLiteTier on a file in tmp_path; entries written by a second connection, as another
process sharing the file would. A stalled read is made the real way: another process holds
the WAL-index's locks (support.storage.sqlite_readers_locked_out).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sqlite3
import time
from pathlib import Path

import pytest
from support.storage import open_l3, sqlite_readers_locked_out
from support.wait import wait_for_condition

from tierproxy.keys import KeySpace
from tierproxy.tiers.base import TierUnavailable
from tierproxy.tiers.sqlite import LOOKUP_BATCH, MAX_WAITING_LOOKUPS, SQLiteTier

KEYS = KeySpace("http://origin.test")
SLACK = 0.25  # a loaded CI machine's scheduling, on top of a budget


def _store(path: Path, values: dict[str, bytes]) -> None:
    conn = sqlite3.connect(str(path), timeout=2.0, isolation_level=None)
    try:
        now = time.time()
        conn.executemany(
            "INSERT INTO entries (key, value, size, expires_at, accessed_at) VALUES (?,?,?,?,?)",
            [(KEYS.key(m).digest, v, len(v), now + 600, now) for m, v in values.items()],
        )
    finally:
        conn.close()


@pytest.fixture
def l3_path(tmp_path: Path) -> Path:
    return tmp_path / "l3.sqlite3"


async def _open(path: Path, read_timeout: float) -> SQLiteTier:
    return await open_l3(path, KEYS, read_timeout)


@pytest.fixture
def values() -> dict[str, bytes]:
    return {f"/k{i}": f"value of /k{i} ".encode() * (1 + i % 50) for i in range(150)}


async def _in_flight(tier: SQLiteTier, hops: int) -> None:
    await wait_for_condition(lambda: tier.read_hops > hops, message="a batch sent")


async def _batch_in_flight(
    tier: SQLiteTier, materials: list[str]
) -> list[asyncio.Task[bytes | None]]:
    """Lookups of ``materials`` sent as one batch that the (stalled) reader's thread holds.

    On an idle tier a lookup goes alone; lookups begun while it is in flight wait for it, and
    its caller giving up sends them (queued in the thread behind it)."""
    hops = tier.read_hops
    alone = asyncio.create_task(tier.get_bytes(KEYS.key("/alone")))
    await _in_flight(tier, hops)
    tasks = [asyncio.create_task(tier.get_bytes(KEYS.key(m))) for m in materials]
    await asyncio.sleep(0)
    alone.cancel()
    await _in_flight(tier, hops + 1)
    with contextlib.suppress(asyncio.CancelledError):
        await alone
    return tasks


async def test_concurrent_lookups_get_their_own_bytes_in_fewer_thread_hops(
    l3_path: Path, values: dict[str, bytes]
) -> None:
    tier = await _open(l3_path, 1.0)
    try:
        _store(l3_path, values)
        materials = [*values, *(f"/missing{i}" for i in range(30))]
        hops = tier.read_hops
        found = await asyncio.gather(*(tier.get_bytes(KEYS.key(m)) for m in materials))
        assert found == [values.get(m) for m in materials]
        # Begun in one loop iteration, on an idle tier: the first is sent at once on its
        # own, the others wait for it and go in batches of at most LOOKUP_BATCH.
        assert tier.read_hops - hops == 1 + math.ceil((len(materials) - 1) / LOOKUP_BATCH)

        # A lone lookup is sent at once: a hop of its own, nothing waited for.
        hops = tier.read_hops
        assert await tier.get_bytes(KEYS.key("/k7")) == values["/k7"]
        assert tier.read_hops - hops == 1

        # Lookups begun while a batch is in flight make up the next one.
        hops = tier.read_hops
        first = [asyncio.create_task(tier.get_bytes(KEYS.key(f"/k{i}"))) for i in range(10)]
        await asyncio.sleep(0)  # all begun: the first one is in flight, the others wait
        later = [asyncio.create_task(tier.get_bytes(KEYS.key(f"/k{i}"))) for i in range(10, 40)]
        got = await asyncio.gather(*first, *later)
        assert got == [values[f"/k{i}"] for i in range(40)]
        assert tier.read_hops - hops < 40
    finally:
        await tier.close()


async def test_lookups_of_one_key_in_a_batch_read_its_row_once_each_with_its_own_fate(
    l3_path: Path, values: dict[str, bytes]
) -> None:
    """A hot key's lookups waiting together read its row once in their trip (they would
    have read it one after another in that trip), each caller still answered on its own: one
    gone does not take the others with it."""
    tier = await _open(l3_path, 2.0)
    try:
        _store(l3_path, values)
        statements = tier.read_statements
        hot = [asyncio.create_task(tier.get_bytes(KEYS.key("/k1"))) for _ in range(50)]
        others = [asyncio.create_task(tier.get_bytes(KEYS.key(m))) for m in ("/k2", "/gone")]
        await asyncio.sleep(0)  # all begun: the first went alone, the others wait
        hot[9].cancel()
        got = await asyncio.gather(*hot[:9], *hot[10:], *others)
        assert got == [values["/k1"]] * 49 + [values["/k2"], None]
        assert hot[9].cancelled()
        # The first /k1 alone; then one batch: /k1 once, /k2, /gone.
        assert tier.read_statements - statements == 4
    finally:
        await tier.close()


async def test_a_stalled_read_times_out_each_lookup_of_the_batch_within_its_budget(
    l3_path: Path, values: dict[str, bytes]
) -> None:
    budget = 0.3
    tier = await _open(l3_path, budget)
    try:
        _store(l3_path, values)

        async def bounded(material: str) -> tuple[BaseException | bytes | None, float]:
            # As GuardedTier bounds every lookup by the tier's budget.
            started = time.monotonic()
            try:
                async with asyncio.timeout(budget):
                    return await tier.get_bytes(KEYS.key(material)), time.monotonic() - started
            except TimeoutError as exc:
                return exc, time.monotonic() - started

        with sqlite_readers_locked_out(l3_path):
            hops = tier.read_hops
            in_flight = [asyncio.create_task(bounded(f"/k{i}")) for i in range(20)]
            await _in_flight(tier, hops)
            behind = [asyncio.create_task(bounded(f"/k{i}")) for i in range(20, 40)]
            outcomes = await asyncio.gather(*in_flight, *behind)
            # Also lookups nobody bounds: the stalled batch answers them when it ends.
            unbounded = [asyncio.create_task(tier.get_bytes(KEYS.key("/k1"))) for _ in range(5)]
            await asyncio.sleep(budget + 0.1)  # past every unbounded lookup's deadline
        for outcome, elapsed in outcomes:
            assert isinstance(outcome, TimeoutError), outcome
            assert elapsed <= budget + SLACK, elapsed
        # Queued behind the stalled statement past their deadlines: each its TimeoutError.
        late = await asyncio.gather(*unbounded, return_exceptions=True)
        assert all(isinstance(x, TimeoutError) for x in late), late

        # Unlocked: lookups work again, on the same file.
        assert await tier.get_bytes(KEYS.key("/k3")) == values["/k3"]
        found = await asyncio.gather(*(tier.get_bytes(KEYS.key(f"/k{i}")) for i in range(50)))
        assert found == [values[f"/k{i}"] for i in range(50)]
        assert tier.available
    finally:
        await tier.close()


async def test_a_cancelled_lookup_does_not_disturb_the_others_of_its_batch(
    l3_path: Path, values: dict[str, bytes]
) -> None:
    tier = await _open(l3_path, 5.0)
    try:
        _store(l3_path, values)
        # Cancelled before its batch is sent.
        tasks = [asyncio.create_task(tier.get_bytes(KEYS.key(f"/k{i}"))) for i in range(20)]
        await asyncio.sleep(0)
        tasks[3].cancel()
        tasks[11].cancel()
        got = await asyncio.gather(*tasks, return_exceptions=True)
        for i, outcome in enumerate(got):
            if i in (3, 11):
                assert isinstance(outcome, asyncio.CancelledError)
            else:
                assert outcome == values[f"/k{i}"], i

        # Cancelled while its batch is in flight (held in the reader's thread).
        with sqlite_readers_locked_out(l3_path):
            hops = tier.read_hops
            tasks = await _batch_in_flight(tier, [f"/k{i}" for i in range(20)])
            assert tier.read_hops - hops == 2  # the lone lookup, then these 20 in one batch
            for i in (0, 5, 19):
                tasks[i].cancel()
            await asyncio.sleep(0.2)
        got = await asyncio.gather(*tasks, return_exceptions=True)
        for i, outcome in enumerate(got):
            if i in (0, 5, 19):
                assert isinstance(outcome, asyncio.CancelledError)
            else:
                assert outcome == values[f"/k{i}"], i
        assert await tier.get_bytes(KEYS.key("/k0")) == values["/k0"]
    finally:
        await tier.close()


async def test_lookups_in_flight_or_waiting_when_the_file_is_reopened_are_unavailable(
    l3_path: Path, values: dict[str, bytes]
) -> None:
    tier = await _open(l3_path, 5.0)
    try:
        _store(l3_path, values)
        with sqlite_readers_locked_out(l3_path):
            in_flight = await _batch_in_flight(tier, [f"/k{i}" for i in range(8)])
            waiting = [
                asyncio.create_task(tier.get_bytes(KEYS.key(f"/k{i}"))) for i in range(8, 16)
            ]
            os.unlink(l3_path)  # the supervisor notices, closes the connections, reopens
            await wait_for_condition(lambda: not tier.available, message="recovery begun")
        got = await asyncio.gather(*in_flight, *waiting, return_exceptions=True)
        assert all(isinstance(x, TierUnavailable) for x in got), got
        await wait_for_condition(lambda: tier.available, message="reopened")
        assert await tier.get_bytes(KEYS.key("/k1")) is None  # a new, empty file
    finally:
        await tier.close()


async def test_lookups_past_the_waiting_bound_are_skipped_at_once(
    l3_path: Path, values: dict[str, bytes]
) -> None:
    tier = await _open(l3_path, 5.0)
    try:
        _store(l3_path, values)
        with sqlite_readers_locked_out(l3_path):
            hops = tier.read_hops
            first = asyncio.create_task(tier.get_bytes(KEYS.key("/k0")))
            await _in_flight(tier, hops)
            queued = [
                asyncio.create_task(tier.get_bytes(KEYS.key(f"/k{i % 150}")))
                for i in range(MAX_WAITING_LOOKUPS)
            ]
            await asyncio.sleep(0)  # all waiting now
            with pytest.raises(TierUnavailable, match="queue full"):
                await tier.get_bytes(KEYS.key("/k1"))
        got = await asyncio.gather(first, *queued)
        assert got == [values["/k0"], *(values[f"/k{i % 150}"] for i in range(MAX_WAITING_LOOKUPS))]
    finally:
        await tier.close()


def _break_overflow_chain(path: Path, value: bytes) -> None:
    """Point the middle of ``value``'s overflow chain at a page past the end of the file: a
    read of that row fails as malformed, every other row still reads."""
    conn = sqlite3.connect(str(path), timeout=2.0, isolation_level=None)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # its pages into the main file
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    finally:
        conn.close()
    data = bytearray(path.read_bytes())
    at = data.find(value[len(value) // 2 : len(value) // 2 + 64])
    assert at > 0
    page = at - at % page_size  # an overflow page: a 4-byte next-page number, then content
    data[page : page + 4] = (0x7FFFFFF0).to_bytes(4, "big")
    path.write_bytes(bytes(data))


async def test_a_lookup_that_fails_fails_alone_and_a_corrupt_file_is_reported(
    l3_path: Path, values: dict[str, bytes]
) -> None:
    tier = await _open(l3_path, 5.0)
    try:
        big = os.urandom(200_000)
        _store(l3_path, {**values, "/big": big})
        _break_overflow_chain(l3_path, big)
        materials = [f"/k{i}" for i in range(30)]
        materials.insert(15, "/big")
        hops = tier.read_hops
        got = await asyncio.gather(
            *(tier.get_bytes(KEYS.key(m)) for m in materials), return_exceptions=True
        )
        assert tier.read_hops - hops == 2  # one alone, then the 30 others in one batch
        for material, outcome in zip(materials, got, strict=True):
            if material == "/big":
                assert isinstance(outcome, sqlite3.DatabaseError), outcome
                assert "malformed" in str(outcome)
            else:
                assert outcome == values[material], material
        # Reported: the file is moved aside and a new one opened.
        await wait_for_condition(
            lambda: list(l3_path.parent.glob("l3.sqlite3.corrupt-*")), message="moved aside"
        )
        await wait_for_condition(lambda: tier.available, message="reopened")
    finally:
        await tier.close()
