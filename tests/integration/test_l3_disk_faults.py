"""Disk faults under L3: it degrades, it never takes the proxy down (issue 10, section 7).

Real SQLite files in tmp_path, real processes; a full disk is a real small tmpfs (the tests
that need one skip when it cannot be mounted).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
from support.disk import fill, small_disk
from support.fixture_types import MakeProxy, SpawnProxy
from support.origin import Origin
from support.proxy import fetch
from support.storage import sqlite_exclusive_lock, sqlite_row
from support.wait import wait_for_condition

from tierproxy.admin import readiness

CACHEABLE = {"Cache-Control": "max-age=300"}


def _sample(proxy: Any, name: str, **labels: str) -> float:
    value = proxy.state.metrics.registry.get_sample_value(name, labels)
    return float(value or 0.0)


def _l3_state(proxy: Any) -> str:
    return str(readiness(proxy.state)[1]["tiers"]["l3"])  # type: ignore[index]


def _on_disk(path: Path) -> int:
    """Bytes the L3 file and its WAL take on disk now."""
    total = 0
    for suffix in ("", "-wal"):
        try:
            total += os.path.getsize(str(path) + suffix)
        except FileNotFoundError:
            pass
    return total


async def _readyz(admin_url: str) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession() as session,
        session.get(admin_url + "/readyz", timeout=timeout) as resp,
    ):
        body: dict[str, Any] = await resp.json()
        body["status"] = resp.status
        return body


# -- the size bound covers the WAL --------------------------------------------------------


async def test_l3_file_and_wal_stay_within_max_bytes(
    origin: Origin, make_proxy: MakeProxy, sqlite_path: Path
) -> None:
    bound, size = 2_000_000, 20_000
    origin.set_default(size=size, headers=CACHEABLE)
    proxy = await make_proxy(L1_MAX_BYTES=0, L3_MAX_BYTES=bound)
    peak = 0
    paths = [f"/w{i}" for i in range(300)]  # 6 MB of bodies: three times the bound
    for start in range(0, len(paths), 10):
        batch = paths[start : start + 10]
        responses = await asyncio.gather(*(proxy.get(p) for p in batch))
        assert all(r.status == 200 for r in responses), responses
        await proxy.settle()
        peak = max(peak, _on_disk(sqlite_path))

    # Honest slack: one entry in flight plus SQLite's page granularity.
    assert peak <= bound + size + 65_536, f"L3 file + WAL reached {peak} bytes (bound {bound})"
    assert (await proxy.get(paths[-1])).x_cache == "HIT-L3"  # it still caches
    assert proxy.state.tier("l3").backend.bytes <= bound


# -- disk full: writes are skipped and counted, reads go on ------------------------------


async def test_disk_full_skips_l3_writes_and_keeps_serving_stored_entries(
    origin: Origin, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    size = 50_000
    origin.set_default(size=size, headers=CACHEABLE)
    with small_disk(tmp_path / "disk", 3_000_000) as disk:
        path = disk / "cache.sqlite3"
        proxy = await make_proxy(
            L1_MAX_BYTES=0, SQLITE_PATH=path, BREAKER_FAILURES=3, BREAKER_COOLDOWN=2
        )
        stored = ["/a", "/b", "/c"]
        for p in stored:
            assert (await proxy.get(p)).x_cache == "MISS"
        await proxy.settle()
        for p in stored:
            assert (await proxy.get(p)).x_cache == "HIT-L3"

        filler = fill(disk)
        for start in range(0, 40, 10):  # 2 MB of new entries on a full disk, 10 at a time
            responses = await asyncio.gather(
                *(proxy.get(f"/new{i}") for i in range(start, start + 10))
            )
            assert all(r.status == 200 for r in responses), responses
            await proxy.settle()

        # Counted: a write that found no room (after trying to make some) is "full"; the
        # writes' own breaker then skips them for a cool-down.
        full = _sample(proxy, "tierproxy_tier_writes_total", tier="l3", op="set", outcome="full")
        assert full > 0, "the disk never filled up: the test proves nothing"
        assert proxy.state.tier("l3").write_breaker.state() != "closed"
        assert _l3_state(proxy) == "degraded"
        for p in stored:
            hit = await proxy.get(p)
            assert hit.x_cache == "HIT-L3", hit
            assert hit.body == origin.body_for(p)
        assert _sample(proxy, "tierproxy_tier_lookups_total", tier="l3", outcome="error") == 0
        assert _sample(proxy, "tierproxy_tier_lookups_total", tier="l3", outcome="skipped") == 0
        assert _l3_state(proxy) != "breaker-open"

        filler.unlink()  # space again: writes resume (after the write cool-down at most)

        async def stored_again() -> bool:
            await proxy.get("/after")
            await proxy.settle()
            return sqlite_row(path, "/after", origin.url) is not None

        await wait_for_condition(
            stored_again,
            timeout=10,
            interval=0.2,
            message="L3 writes to resume once there is space",
        )
        await proxy.close()


# -- start-up never exits because of the L3 file -----------------------------------------


async def test_start_up_with_a_locked_l3_file_serves_without_l3_then_recovers(
    origin: Origin, spawn_proxy: SpawnProxy, sqlite_path: Path
) -> None:
    origin.set_default(headers=CACHEABLE)
    sqlite3.connect(sqlite_path).close()  # an empty file, held locked by another process
    with sqlite_exclusive_lock(sqlite_path):
        proc = await spawn_proxy(
            L1_MAX_BYTES=0, L3_TIMEOUT=0.2, L3_WRITE_TIMEOUT=0.2, BREAKER_COOLDOWN=1
        )
        body = await _readyz(proc.admin_url)
        assert body["status"] == 200, body
        assert body["tiers"]["l3"] == "unavailable", body
        async with aiohttp.ClientSession() as session:
            response = await fetch(session, "GET", proc.url + "/x")
        assert response.status == 200, response

    async def l3_hit() -> bool:
        async with aiohttp.ClientSession() as session:
            response = await fetch(session, "GET", proc.url + "/y")
        return response.x_cache == "HIT-L3"

    await wait_for_condition(
        l3_hit, timeout=15, interval=0.2, message="L3 reopened after the lock went away"
    )
    assert (await _readyz(proc.admin_url))["tiers"]["l3"] == "up"
    assert proc.stderr.count("L3 unavailable") == 1, proc.stderr  # said once, not per retry
    assert proc.returncode is None


async def test_start_up_on_a_full_disk_serves_without_l3_then_recovers(
    origin: Origin, spawn_proxy: SpawnProxy, tmp_path: Path
) -> None:
    origin.set_default(headers=CACHEABLE)
    with small_disk(tmp_path / "disk", 1_000_000) as disk:
        filler = fill(disk)
        path = disk / "cache.sqlite3"
        proc = await spawn_proxy(L1_MAX_BYTES=0, SQLITE_PATH=path, BREAKER_COOLDOWN=1)
        body = await _readyz(proc.admin_url)
        assert (body["status"], body["tiers"]["l3"]) == (200, "unavailable"), body
        async with aiohttp.ClientSession() as session:
            response = await fetch(session, "GET", proc.url + "/x")
        assert response.status == 200, response

        filler.unlink()

        async def l3_hit() -> bool:
            async with aiohttp.ClientSession() as session:
                response = await fetch(session, "GET", proc.url + "/y")
            return response.x_cache == "HIT-L3"

        await wait_for_condition(
            l3_hit, timeout=15, interval=0.2, message="L3 created once the disk had space"
        )
        proc.terminate()
        assert await proc.wait(15) == 0, proc.stderr


async def test_start_up_with_a_garbage_l3_file_moves_it_aside(
    origin: Origin, spawn_proxy: SpawnProxy, sqlite_path: Path
) -> None:
    origin.set_default(headers=CACHEABLE)
    sqlite_path.write_bytes(os.urandom(8192))
    proc = await spawn_proxy(L1_MAX_BYTES=0)
    async with aiohttp.ClientSession() as session:
        await fetch(session, "GET", proc.url + "/g")
        await wait_for_condition(
            lambda: sqlite_row(sqlite_path, "/g", origin.url), message="L3 fill"
        )
        assert (await fetch(session, "GET", proc.url + "/g")).x_cache == "HIT-L3"
    assert list(sqlite_path.parent.glob(sqlite_path.name + ".corrupt-*")), proc.stderr


async def test_a_directory_at_the_l3_path_is_a_clear_start_up_error(
    spawn_proxy: SpawnProxy, tmp_path: Path
) -> None:
    # A path that can never work as configured (and must not be moved aside): exit 2.
    directory = tmp_path / "cache.sqlite3"
    directory.mkdir()
    proc = await spawn_proxy(wait_healthy=False, SQLITE_PATH=directory)

    code = await proc.wait(15)

    assert code == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "TIERPROXY_SQLITE_PATH" in proc.stderr, proc.stderr


# -- the file deleted or corrupted under a running proxy ---------------------------------


async def _recovers(proxy: Any, path: Path, probe: str) -> None:
    async def l3_hit_again() -> bool:
        first = await proxy.get(probe)
        await proxy.settle()
        return first.x_cache == "HIT-L3" and path.exists()

    # In use again within the breaker cool-down (2 s in these tests), plus slack for load.
    await wait_for_condition(
        l3_hit_again, timeout=2 + 2, interval=0.1, message="L3 recreated and hitting again"
    )


async def test_l3_file_deleted_at_run_time_is_recreated_without_a_restart(
    origin: Origin, make_proxy: MakeProxy, sqlite_path: Path
) -> None:
    origin.set_default(headers=CACHEABLE)
    proxy = await make_proxy(L1_MAX_BYTES=0, BREAKER_COOLDOWN=2)
    assert (await proxy.get("/before")).x_cache == "MISS"
    await proxy.settle()
    assert (await proxy.get("/before")).x_cache == "HIT-L3"

    for suffix in ("", "-wal", "-shm"):
        Path(str(sqlite_path) + suffix).unlink(missing_ok=True)

    # Never "up" while the file is gone; then back, with a fresh file, within the cool-down.
    states: list[str] = []

    def recreated() -> bool:
        states.append(_l3_state(proxy))
        return sqlite_path.exists()

    await wait_for_condition(
        recreated, timeout=2 + 1, interval=0.02, message="the deleted L3 file recreated"
    )
    assert "up" not in states[:-1] or len(states) == 1, states
    await _recovers(proxy, sqlite_path, "/after")
    assert sqlite_row(sqlite_path, "/after", origin.url) is not None
    assert _sample(proxy, "tierproxy_l3_recoveries_total", reason="missing") >= 1


async def test_l3_file_overwritten_with_garbage_at_run_time_is_moved_aside_and_recreated(
    origin: Origin, make_proxy: MakeProxy, sqlite_path: Path
) -> None:
    origin.set_default(headers=CACHEABLE)
    proxy = await make_proxy(L1_MAX_BYTES=0, BREAKER_COOLDOWN=2)
    for p in ("/x", "/y"):
        await proxy.get(p)
    await proxy.settle()
    assert (await proxy.get("/x")).x_cache == "HIT-L3"

    size = sqlite_path.stat().st_size
    sqlite_path.write_bytes(os.urandom(size))  # the same inode, garbage from the first byte

    await wait_for_condition(
        lambda: list(sqlite_path.parent.glob(sqlite_path.name + ".corrupt-*")),
        timeout=2 + 1,
        message="the corrupt L3 file moved aside",
    )
    await _recovers(proxy, sqlite_path, "/z")
    with sqlite3.connect(sqlite_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert _sample(proxy, "tierproxy_l3_recoveries_total", reason="corrupt") == 1


# -- a client that goes away never interrupts another request's read ---------------------


async def test_disconnecting_clients_never_interrupt_other_clients_l3_reads(
    origin: Origin, make_proxy: MakeProxy, sqlite_path: Path
) -> None:
    origin.set_default(size=200_000, headers=CACHEABLE)
    proxy = await make_proxy(L1_MAX_BYTES=0, BREAKER_FAILURES=5)
    paths = [f"/r{i}" for i in range(20)]
    for p in paths:
        await proxy.get(p)
    await proxy.settle()
    host, port = "127.0.0.1", proxy.port

    async def disconnector(n: int) -> None:
        for i in range(n):
            _, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {paths[i % len(paths)]} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            await writer.drain()
            await asyncio.sleep(0.0005 * (i % 4))  # vary the moment within the lookup
            writer.transport.abort()

    async def reader(n: int) -> list[str | None]:
        seen = []
        async with aiohttp.ClientSession() as session:
            for i in range(n):
                response = await fetch(session, "GET", f"http://{host}:{port}{paths[i % 20]}")
                seen.append(response.x_cache)
        return seen

    results = await asyncio.gather(
        *(disconnector(60) for _ in range(10)), *(reader(30) for _ in range(4))
    )
    seen = [x for r in results if r is not None for x in r]

    assert set(seen) == {"HIT-L3"}, {x: seen.count(x) for x in set(seen)}
    assert _sample(proxy, "tierproxy_tier_lookups_total", tier="l3", outcome="error") == 0
    assert proxy.state.tier("l3").breaker.state() == "closed"


# -- housekeeping never scans the whole table --------------------------------------------


async def test_eviction_and_expiry_sweep_use_their_indexes(
    origin: Origin, make_proxy: MakeProxy, sqlite_path: Path
) -> None:
    from tierproxy.tiers.sqlite import EVICT_SQL, SWEEP_SQL

    origin.set_default(headers=CACHEABLE)
    proxy = await make_proxy(L1_MAX_BYTES=0)
    await proxy.get("/p")
    await proxy.settle()
    with sqlite3.connect(sqlite_path) as db:
        plans = {
            sql: " | ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", args))
            for sql, args in ((EVICT_SQL, (10,)), (SWEEP_SQL, (0.0, 10)))
        }
    # An index walked in order and stopped by LIMIT; never the table scanned and sorted.
    assert "INDEX entries_accessed" in plans[EVICT_SQL], plans
    assert "USING INDEX entries_expires" in plans[SWEEP_SQL], plans
    for plan in plans.values():
        assert "TEMP B-TREE" not in plan, plans
        assert "SCAN entries" not in plan or "SCAN entries USING" in plan, plans


async def test_an_entry_purged_while_l3_was_unavailable_is_not_served_when_it_returns(
    origin: Origin, make_proxy: MakeProxy, sqlite_path: Path
) -> None:
    origin.set_default(headers=CACHEABLE)
    first = await make_proxy(L1_MAX_BYTES=0)
    await first.get("/p")
    await first.settle()
    await first.close()
    assert sqlite_row(sqlite_path, "/p", origin.url) is not None

    with sqlite_exclusive_lock(sqlite_path):  # the next proxy starts without L3
        proxy = await make_proxy(L1_MAX_BYTES=0, L3_WRITE_TIMEOUT=0.2, BREAKER_COOLDOWN=1)
        assert _l3_state(proxy) == "unavailable"
        # A purge heard from another replica while this one's L3 cannot be written.
        await proxy.state.readthrough.purge([proxy.state.keys.key("/p")], [], shared=False)

    await wait_for_condition(
        lambda: _l3_state(proxy) == "up", timeout=10, message="L3 back after the lock went away"
    )
    response = await proxy.get("/p")
    assert response.x_cache == "MISS", response
    assert response.body == b"origin body for /p (request 2)"
