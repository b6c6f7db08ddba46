"""The open-model generator (loadtest/openloop.py) keeps its schedule and corrects for
coordinated omission, against a real loopback aiohttp server that answers slowly.

With one connection allowed and a server that takes 100 ms per answer, requests due every
50 ms queue up: a closed-loop client would report 100 ms for each of them; counted from the
moment each was due, the last one waited about 550 ms. Both figures are asserted. ~1.5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from aiohttp import web

from loadtest.openloop import OpenLoop


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(0.1)
    return web.Response(body=b"x", headers={"X-Cache": "HIT-L1"})


async def test_latency_counts_from_the_due_time_not_the_send(tmp_path: Path) -> None:
    app = web.Application()
    app.router.add_get("/k/{n}", _slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    series = tmp_path / "timeseries.jsonl"
    ns = argparse.Namespace(
        url=f"http://127.0.0.1:{port}",
        rate=20.0,
        duration=0.5,
        keys=10,
        prefix="/k/",
        zipf=0.0,
        purge_ratio=0.0,
        purge_token="",
        max_inflight=1,
        client_timeout=5.0,
        seed=1,
        timeseries=str(series),
        errors=str(tmp_path / "errors.jsonl"),
    )
    try:
        result = await asyncio.wait_for(OpenLoop(ns).run(), timeout=10)
    finally:
        await runner.cleanup()

    assert result["scheduled"] == result["sent"] == 10
    # all but the first waited for the single connection: sent late, counted from due
    assert result["late_starts"] >= 8, result
    lines = [json.loads(ln) for ln in series.read_text().splitlines() if ln.strip()]
    assert sum(ln["n"] for ln in lines) == 10
    assert sum(ln["xcache"].get("HIT-L1", 0) for ln in lines) == 10
    worst = max(ln["max"] for ln in lines)
    # the last request was due at 450 ms and answered at ~1000 ms; a closed-loop client
    # would have reported ~100 ms for it
    assert 500 <= worst < 2000, worst
    if result["hdrhistogram"]:
        lat = result["latency"]
        assert lat["corrected"]["p100_ms"] >= 500, lat["corrected"]
        assert lat["service"]["p100_ms"] < 400, lat["service"]
