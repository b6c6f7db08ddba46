"""L3 fills under load: misses over many keys are stored, so each key costs the origin once.

A real proxy process with L1 off and L3 on (a file in tmp_path), the test's origin, and a
load of 64 concurrent clients asking for 400 keys in turn, bounded in time and count.

Each L3 write used to take three trips to the writer's thread (make room, insert, tidy up),
one write at a time, and the writes of a loaded proxy queued behind each other past their
timeout: under wrk (64 clients over 2,000 keys) 1,000 keys were stored after 30 s, 7,026
backfills had failed, 43,759 were dropped, and the origin answered 53,000 requests. Writes
now go in batches: the rows waiting when the writer is free go in one trip.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from support.fixture_types import SpawnProxy
from support.origin import Origin
from support.storage import sqlite_count

KEYS = 400
CLIENTS = 64
PASSES = 8  # each key asked for this many times in all (a key whose backfills were all
# dropped in the cold burst is asked for again after it)
CACHEABLE = {"Cache-Control": "max-age=600"}

pytestmark = pytest.mark.timeout(120)


async def _metrics(admin_url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(admin_url + "/metrics") as resp:
        text = await resp.text()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def _load(url: str, deadline: float) -> dict[str, int]:
    """CLIENTS clients, each asking for the keys in turn from its own offset, PASSES times
    over in all; stops at ``deadline`` (loop time) if not done. What each X-Cache was."""
    seen: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client(n: int) -> None:
            for i in range(KEYS * PASSES // CLIENTS):
                if loop.time() > deadline:
                    return
                key = (n * (KEYS // CLIENTS) + i) % KEYS
                async with session.get(f"{url}/k/{key}") as resp:
                    await resp.read()
                    assert resp.status == 200, resp.status
                    label = resp.headers.get("X-Cache", "")
                    seen[label] = seen.get(label, 0) + 1

        await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    return seen


async def test_misses_over_many_keys_under_load_are_all_stored_once(
    spawn_proxy: SpawnProxy, origin: Origin, sqlite_path: Path
) -> None:
    origin.set_default(headers=CACHEABLE, size=1024)
    # A write timeout a loaded machine still meets by far, when writes do not queue.
    proxy = await spawn_proxy(L1_MAX_BYTES=0, L3_WRITE_TIMEOUT=0.5)
    loop = asyncio.get_running_loop()
    seen = await _load(proxy.url, loop.time() + 60)
    assert sum(seen.values()) == KEYS * PASSES, seen

    # Every key is in the file (read by a connection of our own, as another process would).
    stored = 0
    for _ in range(50):  # the last backfills may still be on their way (bounded: 5 s)
        stored = sqlite_count(sqlite_path)
        if stored >= KEYS:
            break
        await asyncio.sleep(0.1)
    metrics = await _metrics(proxy.admin_url)
    backfills = {
        outcome: metrics.get(f'tierproxy_backfills_total{{outcome="{outcome}",tier="l3"}}', 0.0)
        for outcome in ("started", "completed", "failed", "dropped")
    }
    assert stored == KEYS, (stored, backfills, seen)
    assert backfills["failed"] == 0, backfills
    # Concurrent misses of one key are coalesced into one fetch, and a miss while the key's
    # write is on its way gets that fetch's copy; once stored, a key is an L3 hit. The cold
    # burst can still fill the background lane for a moment (its backfills are dropped, and
    # those keys fetched once more), but a key is not fetched once per request.
    fetched = origin.count(method="GET")
    assert fetched <= KEYS * 1.5, (fetched, seen, backfills)
    assert seen.get("HIT-L3", 0) >= KEYS * (PASSES - 1) * 0.8, seen
