"""L3 lookups on one event loop: ``python -m loadtest.l3_batch_bench [--seconds S] [-c C ...]``.

Opens a real :class:`~tierproxy.tiers.sqlite.SQLiteTier` on a temporary file holding 1,000
entries of 1 KiB, then for each concurrency C runs C tasks that each look up random stored
keys back to back for ``--seconds``, and prints lookups/s with the mean and p99 latency of a
lookup (``get_bytes``: the trip to the reader's thread and back). Run it pinned to one core
(``taskset -c 0``) to see what a lookup costs the event loop's core.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import statistics
import tempfile
import time

from tierproxy.keys import KeySpace
from tierproxy.tiers.sqlite import SQLiteTier

ENTRIES = 1000
SIZE = 1024


async def _fill(tier: SQLiteTier, keys: KeySpace, path: str) -> list[str]:
    materials = [f"/bench/{i}" for i in range(ENTRIES)]
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None)
    try:
        now = time.time()
        conn.executemany(
            "INSERT INTO entries (key, value, size, expires_at, accessed_at) VALUES (?,?,?,?,?)",
            [(keys.key(m).digest, os.urandom(SIZE), SIZE, now + 3600, now) for m in materials],
        )
    finally:
        conn.close()
    return materials


async def _run(tier: SQLiteTier, keys: KeySpace, materials: list[str], c: int, secs: float) -> str:
    latencies: list[float] = []
    stop = time.perf_counter() + secs
    prepared = [keys.key(m) for m in materials]

    async def client(seed: int) -> None:
        rnd = random.Random(seed)
        while time.perf_counter() < stop:
            key = rnd.choice(prepared)
            started = time.perf_counter()
            value = await tier.get_bytes(key)
            latencies.append(time.perf_counter() - started)
            assert value is not None and len(value) == SIZE

    hops = getattr(tier, "read_hops", None)
    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(c)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    line = (
        f"C={c:<3d} lookups/s={len(latencies) / elapsed:9.0f}"
        f"  mean={statistics.fmean(latencies) * 1e6:8.1f}us  p99={p99 * 1e6:8.1f}us"
    )
    if hops is not None:
        done = getattr(tier, "read_hops", 0) - hops
        line += f"  lookups/hop={len(latencies) / max(1, done):5.1f}"
    return line


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("-c", type=int, nargs="*", default=[1, 8, 64])
    args = parser.parse_args()
    keys = KeySpace("http://bench.test")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "l3.sqlite3")
        tier = SQLiteTier(path, max_bytes=10**9, read_timeout=1.0, write_timeout=1.0, keys=keys)
        await tier.open()
        try:
            materials = await _fill(tier, keys, path)
            await _run(tier, keys, materials, 8, 0.5)  # warm-up (page cache, code paths)
            for c in args.c:
                print(await _run(tier, keys, materials, c, args.seconds), flush=True)
        finally:
            await tier.close()


if __name__ == "__main__":
    asyncio.run(main())
