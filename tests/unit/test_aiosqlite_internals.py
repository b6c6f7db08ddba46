"""The private aiosqlite names the L3 tier uses (tierproxy/tiers/sqlite.py: a lookup is queued
on the connection's own thread with no coroutine, as ``Connection._execute`` queues a call;
``_execute`` itself for the tier's pings), checked on the installed aiosqlite: a release that
renames one fails here, not in a lookup."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import aiosqlite


async def test_a_call_queued_as_the_l3_tier_queues_it_runs_on_the_connections_thread(
    tmp_path: Path,
) -> None:
    connection = await aiosqlite.connect(tmp_path / "x.sqlite3")
    try:
        assert connection._running is True
        assert connection._connection is not None
        raw = connection._connection
        trip: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        connection._tx.put_nowait(
            (trip, functools.partial(lambda c: c.execute("SELECT 41 + 1").fetchone(), raw))
        )
        assert await asyncio.wait_for(trip, 5) == (42,)
        assert await connection._execute(lambda: 7) == 7  # type: ignore[no-untyped-call]
    finally:
        await connection.close()
    assert connection._connection is None  # closed: the tier refuses to queue (_trip)
