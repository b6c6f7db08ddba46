"""TIERPROXY_L1_MAX_BYTES bounds what L1 really holds: the resident memory a spawned proxy
gains by filling L1 (many small entries; a few large ones) stays within the bound plus an
honest overhead, however much is requested."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.origin import Origin
from support.scrape import metric_value

pytestmark = pytest.mark.asyncio

MB = 1024 * 1024

# Twelve header lines of a typical size, on every response (headers were held three times).
HEADERS = {
    "Cache-Control": "public, max-age=600",
    "Content-Type": "text/html; charset=utf-8",
    "ETag": '"5f1e2d3c4b5a69788796a5b4c3d2e1f0"',
    "Last-Modified": "Tue, 24 Nov 2026 10:00:00 GMT",
    "Vary": "Accept-Encoding",
    "X-Frame-Options": "SAMEORIGIN",
    "X-Content-Type-Options": "nosniff",
    "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
    "Link": "</static/app.css>; rel=preload; as=style",
    "X-Served-By": "cache-origin-node-0042",
    "Access-Control-Allow-Origin": "*",
    "Content-Language": "en",
}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def fetch_all(base: str, paths: list[str], concurrency: int = 16) -> None:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for path in paths:
        queue.put_nowait(path)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            path = queue.get_nowait()
            async with session.get(base + path) as response:
                assert response.status == 200, (path, response.status)
                await response.read()

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with asyncio.timeout(240):
            await asyncio.gather(*(worker(session) for _ in range(concurrency)))


async def l1_bytes(admin: str) -> float:
    return await metric_value(admin, "tierproxy_l1_bytes")


@pytest.mark.parametrize(
    ("bound", "body", "count", "concurrency"),
    [
        # Many small entries: under the old accounting (~1.1 kB charged, ~5 kB held each) these
        # fill the nominal bound about twice over (and would hold ~35 MB: far over what is
        # allowed).
        pytest.param(4 * MB, 200, 7_000, 16, id="many-small"),
        # A few large entries (an entry may take an eighth of L1), one request at a time so the
        # transient buffers of a response in flight are the same in the baseline and after.
        pytest.param(16 * MB, 1_500_000, 40, 1, id="few-large"),
    ],
)
async def test_resident_memory_stays_within_the_l1_bound(
    spawn_proxy: Any,
    origin: Origin,
    bound: int,
    body: int,
    count: int,
    concurrency: int,
) -> None:
    origin.set_default(headers=HEADERS, size=body)
    warm_up = [f"/warm/{i}" for i in range(200)]
    for path in warm_up:
        origin.set(path, headers={"Cache-Control": "no-store"}, size=body)
    proxy = await spawn_proxy(
        L1_MAX_BYTES=bound,
        SQLITE_PATH="off",
        ACCESS_LOG="off",
        MAX_ENTRY_BYTES=max(body * 2, 1 * MB),
    )
    # Warm up the connection machinery (pools, buffers) with requests that are not stored.
    await fetch_all(proxy.url, warm_up, concurrency)
    baseline = rss_bytes(proxy.pid)
    await fetch_all(proxy.url, [f"/a/{i}" for i in range(count)], concurrency)
    held = await l1_bytes(proxy.admin_url)
    assert 0 < held <= bound
    grown = rss_bytes(proxy.pid) - baseline
    # Honest overhead: allocator fragmentation and free lists (Python keeps freed small blocks
    # for reuse), and the transient buffers of the requests in flight.
    allowed = int(bound * 1.25) + 6 * MB
    assert grown <= allowed, (
        f"RSS grew {grown / MB:.1f} MB with L1 bound {bound / MB:.0f} MB "
        f"(L1 counts {held / MB:.1f} MB; allowed {allowed / MB:.1f} MB)"
    )
    # Going on evicting does not grow it further than the same allowance.
    await fetch_all(proxy.url, [f"/b/{i}" for i in range(count)], concurrency)
    grown = rss_bytes(proxy.pid) - baseline
    assert grown <= allowed, f"RSS grew {grown / MB:.1f} MB after a second round"
