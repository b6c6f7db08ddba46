"""``TIERPROXY_WORKERS=2``: real worker processes behind one port, supervised by the parent.

Which worker answered is told by the workers themselves: their pids come from the group's
``/readyz``, the CPU each used from ``/proc``, and what each holds in L1 from the group's
``/metrics`` (``tierproxy_l1_entries`` is summed over the live workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.fixture_types import SpawnProxy
from support.origin import Origin
from support.proxy import SpawnedProxy
from support.storage import sqlite_exclusive_lock, sqlite_row
from support.wait import wait_for_condition

from tierproxy.config import load_settings

pytestmark = pytest.mark.slow

CACHEABLE = {"Cache-Control": "max-age=300"}


async def _admin(proxy: SpawnedProxy, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(proxy.admin_url + path, timeout=aiohttp.ClientTimeout(total=5)) as resp,
    ):
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.text()


async def _worker_pids(proxy: SpawnedProxy) -> list[int]:
    status, body = await _admin(proxy, "/readyz")
    assert status == 200, body
    return [int(worker["pid"]) for worker in body["workers"]]


async def _metric(proxy: SpawnedProxy, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    _, text = await _admin(proxy, "/metrics")
    total = 0.0
    for line in str(text).splitlines():
        match = re.match(r"^([a-zA-Z0-9_:]+)(\{[^}]*\})? (\S+)$", line)
        if match is None or match.group(1) != name:
            continue
        sample = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(sample.get(k) == v for k, v in (labels or {}).items()):
            total += float(match.group(3))
    return total


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def _blast(
    proxy: SpawnedProxy, paths: list[str], concurrency: int = 16
) -> list[tuple[int, str | None, bytes]]:
    """Every path once, ``concurrency`` at a time, each on a new connection (so the kernel
    hands connections to both workers)."""
    results: list[tuple[int, str | None, bytes]] = []
    queue = list(reversed(paths))
    connector = aiohttp.TCPConnector(force_close=True, limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            while queue:
                path = queue.pop()
                async with session.get(
                    proxy.url + path, timeout=aiohttp.ClientTimeout(total=10)
                ) as resp:
                    results.append((resp.status, resp.headers.get("X-Cache"), await resp.read()))

        await asyncio.gather(*(one() for _ in range(concurrency)))
    return results


def test_auto_is_the_cpus_this_process_may_use() -> None:
    origin = "http://127.0.0.1:9"
    settings = load_settings({"TIERPROXY_ORIGIN": origin, "TIERPROXY_WORKERS": "auto"})

    assert settings.workers == len(os.sched_getaffinity(0))
    assert load_settings({"TIERPROXY_ORIGIN": origin}).workers == 1


async def test_bad_worker_count_exits_2_with_one_line(spawn_proxy: SpawnProxy) -> None:
    proc = await spawn_proxy(wait_healthy=False, WORKERS="lots")

    code = await proc.wait(15)

    assert code == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "TIERPROXY_WORKERS" in lines[0] and "lots" in lines[0], lines[0]


async def test_two_workers_both_serve_under_load_and_metrics_sum_them(
    spawn_proxy: SpawnProxy, origin: Origin
) -> None:
    origin.set("/hot", headers=CACHEABLE, body=b"hot")
    proxy = await spawn_proxy(WORKERS=2, ACCESS_LOG="off")
    pids = await _worker_pids(proxy)
    assert len(set(pids)) == 2 and proxy.pid not in pids
    before = {pid: _cpu_ticks(pid) for pid in pids}

    results = await _blast(proxy, ["/hot"] * 3000, concurrency=32)

    assert all(status == 200 and body == b"hot" for status, _, body in results)
    used = {pid: _cpu_ticks(pid) - before[pid] for pid in pids}
    total = sum(used.values())
    assert total > 0
    for pid in pids:  # each worker did a real share of the work
        assert used[pid] >= total * 0.15, used
    # The group's /metrics counts every worker's responses (each writes its own about once a
    # second): exactly the requests sent.
    await wait_for_condition(
        lambda: _metric(proxy, "tierproxy_responses_total"),
        timeout=10,
        message="no responses counted",
    )
    counted = await wait_for_condition(
        lambda: _equal(_metric(proxy, "tierproxy_responses_total"), len(results)),
        timeout=10,
        message=lambda: f"responses counted != {len(results)}",
    )
    assert counted
    assert origin.count("/hot") <= 2  # at most one miss per worker; every other answer a hit


async def _equal(value: Any, expected: float) -> bool:
    return bool(await value == expected)


async def _both_hold(proxy: SpawnedProxy, path: str, entries: float) -> bool:
    await _blast(proxy, [path] * 40, concurrency=8)
    return await _metric(proxy, "tierproxy_l1_entries") == entries


async def _purge_empties_every_l1(proxy: SpawnedProxy, origin: Origin) -> None:
    origin.set("/p", headers=CACHEABLE, body=b"old")
    # Both workers hold /p in L1: the summed L1 entry count is 2 (one per worker).
    await wait_for_condition(
        lambda: _both_hold(proxy, "/p", 2.0),
        timeout=20,
        interval=0.5,
        message="both workers never held /p in L1",
    )
    origin.set("/p", headers=CACHEABLE, body=b"new")

    async with (
        aiohttp.ClientSession() as session,
        session.request(
            "PURGE",
            proxy.url + "/p",
            headers={"Authorization": "Bearer purge-token-for-workers-0123"},
        ) as r,
    ):
        assert r.status == 200, await r.text()

    # Every answer now is the new body, on every worker: no L1 kept the purged copy.
    results = await _blast(proxy, ["/p"] * 60, concurrency=8)
    assert {body for _, _, body in results} == {b"new"}, results[:3]
    assert all(status == 200 for status, _, _ in results)


async def test_purge_reaches_every_worker_l1_without_redis(
    spawn_proxy: SpawnProxy, origin: Origin
) -> None:
    proxy = await spawn_proxy(
        WORKERS=2, PURGE_TOKEN="purge-token-for-workers-0123", SQLITE_PATH="off", REDIS_URL=None
    )

    await _purge_empties_every_l1(proxy, origin)


async def test_purge_reaches_every_worker_l1_with_redis(
    spawn_proxy: SpawnProxy, origin: Origin, redis_url: str
) -> None:
    proxy = await spawn_proxy(
        WORKERS=2, PURGE_TOKEN="purge-token-for-workers-0123", SQLITE_PATH="off"
    )

    await _purge_empties_every_l1(proxy, origin)


async def test_admin_purge_empties_every_worker_l1_without_redis(
    spawn_proxy: SpawnProxy, origin: Origin
) -> None:
    proxy = await spawn_proxy(
        WORKERS=2, PURGE_TOKEN="purge-token-for-workers-0123", SQLITE_PATH="off", REDIS_URL=None
    )
    origin.set("/a", headers=CACHEABLE, body=b"old")
    await wait_for_condition(
        lambda: _both_hold(proxy, "/a", 2.0), timeout=20, interval=0.5, message="not in both L1"
    )
    origin.set("/a", headers=CACHEABLE, body=b"new")

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.admin_url + "/purge",
            json={"keys": ["/a"]},
            headers={"Authorization": "Bearer purge-token-for-workers-0123"},
        ) as r,
    ):
        body = await r.json()
        assert r.status == 200, body
    assert body["workers_acked"] == 2 and body["workers_unconfirmed"] == 0, body
    results = await _blast(proxy, ["/a"] * 40, concurrency=8)
    assert {b for _, _, b in results} == {b"new"}


async def test_a_killed_worker_is_replaced_and_the_port_keeps_answering(
    spawn_proxy: SpawnProxy, origin: Origin
) -> None:
    origin.set("/k", headers=CACHEABLE, body=b"k")
    proxy = await spawn_proxy(WORKERS=2)
    pids = await _worker_pids(proxy)

    os.kill(pids[0], signal.SIGKILL)
    await wait_for_condition(lambda: not _running(pids[0]), timeout=5)
    results = await _blast(proxy, ["/k"] * 50, concurrency=4)

    assert all(status == 200 and body == b"k" for status, _, body in results)

    async def replaced() -> list[int] | None:
        status, body = await _admin(proxy, "/readyz")
        if status != 200:
            return None
        return [int(w["pid"]) for w in body["workers"]]

    now = await wait_for_condition(replaced, timeout=20, message="worker not replaced")
    assert now is not None
    assert pids[0] not in now and pids[1] in now and len(set(now)) == 2
    assert await _metric(proxy, "tierproxy_worker_restarts_total") == 1


async def test_sigterm_stops_every_worker_within_the_shutdown_timeout(
    spawn_proxy: SpawnProxy, origin: Origin
) -> None:
    origin.set("/s", headers=CACHEABLE, body=b"s")
    proxy = await spawn_proxy(WORKERS=2, SHUTDOWN_TIMEOUT=3)
    pids = await _worker_pids(proxy)
    await _blast(proxy, ["/s"] * 20, concurrency=4)
    loop = asyncio.get_running_loop()
    started = loop.time()

    proxy.terminate()
    code = await proxy.wait(3 + 2)

    assert code == 0, proxy.stderr
    assert loop.time() - started < 3 + 2
    await wait_for_condition(lambda: not any(_running(pid) for pid in pids), timeout=2)
    assert "Traceback" not in proxy.stderr


async def test_a_worker_gets_its_whole_drain_before_the_supervisor_kills_it(
    spawn_proxy: SpawnProxy, origin: Origin, sqlite_path: Path
) -> None:
    """A worker's shutdown is the proxy's: TIERPROXY_SHUTDOWN_TIMEOUT for the request in
    flight, then as long again for background writes. The supervisor killed a worker still
    running one timeout after SIGTERM, so a worker whose request held the first timeout lost
    the backfills it was draining (here: an L3 write waiting on a lock released 2.5 s in)."""
    origin.set("/kept", headers=CACHEABLE, body=b"kept")
    origin.set("/hang", hang=True, headers=CACHEABLE)
    proxy = await spawn_proxy(
        WORKERS=2, REDIS_URL=None, SHUTDOWN_TIMEOUT=2, L3_WRITE_TIMEOUT=10, REQUEST_DEADLINE=30
    )
    await _worker_pids(proxy)
    loop = asyncio.get_running_loop()
    # One connection: both requests reach the same worker.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        with sqlite_exclusive_lock(sqlite_path):
            async with session.get(proxy.url + "/kept") as kept:
                assert (kept.status, await kept.read()) == (200, b"kept")  # its backfill waits
            hanging = asyncio.ensure_future(
                session.get(proxy.url + "/hang", timeout=aiohttp.ClientTimeout(total=20))
            )
            await wait_for_condition(lambda: origin.count("/hang") == 1, message="in flight")
            proxy.terminate()
            started = loop.time()
            await asyncio.sleep(2.5)  # the request is cut at 2 s; the drain goes on
        with contextlib.suppress(aiohttp.ClientError):
            (await hanging).release()
        code = await proxy.wait(15)

    assert code == 0, proxy.stderr
    assert loop.time() - started < 2 * 2 + 2
    assert "killed" not in proxy.stderr, proxy.stderr
    assert sqlite_row(sqlite_path, "/kept", origin.url) is not None, proxy.stderr


async def test_both_workers_write_sqlite_concurrently_without_errors(
    spawn_proxy: SpawnProxy, origin: Origin, sqlite_path: Path
) -> None:
    origin.set_default(headers=CACHEABLE)
    proxy = await spawn_proxy(WORKERS=2, REDIS_URL=None)
    pids = await _worker_pids(proxy)
    before = {pid: _cpu_ticks(pid) for pid in pids}
    paths = [f"/w/{i}" for i in range(400)]

    results = await _blast(proxy, paths, concurrency=32)

    assert all(status == 200 for status, _, _ in results)
    assert all(_cpu_ticks(pid) > before[pid] for pid in pids)  # both took requests

    def stored() -> int:
        with sqlite3.connect(sqlite_path, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    await wait_for_condition(lambda: stored() == len(paths), timeout=20, interval=0.2)
    errors = await _metric(proxy, "tierproxy_backfills_total", {"tier": "l3", "outcome": "error"})
    assert errors == 0
    assert "locked" not in proxy.stderr, proxy.stderr[-2000:]
    # Every answer is served from L3 now, by either worker.
    results = await _blast(proxy, paths[:50], concurrency=8)
    assert all(status == 200 for status, _, _ in results)
