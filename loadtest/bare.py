"""The framework's ceiling: a naive aiohttp handler returning stored bytes.

    python -m loadtest.bare --port 9100 --origin http://127.0.0.1:9000 --path /bench/1

At start-up it fetches ``--path`` from the origin once and keeps the body and the origin's
end-to-end headers; every request then gets ``web.Response(body=stored, headers=stored)``
plus the three headers a cache adds (X-Cache, Cache-Status, Age), so the bytes on the wire
match what tierproxy sends for an L1 hit. This is what "a plain aiohttp app serving from a
dict" costs — the benchmark's reference (a).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import urllib.request

from aiohttp import web

from loadtest.origin import install_loop

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "date",
    "server",
}


def fetch(url: str) -> tuple[bytes, dict[str, str]]:
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read()
        headers = {k: v for k, v in r.headers.items() if k.lower() not in HOP_BY_HOP}
    return body, headers


async def serve(
    host: str, port: int, body: bytes, headers: dict[str, str], max_lifetime: float
) -> None:
    stored_headers = {**headers, "X-Cache": "HIT-L1", "Cache-Status": "bare; hit", "Age": "0"}

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, headers=stored_headers)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    print(f"loadtest.bare listening on http://{host}:{port} ({len(body)} bytes)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), max_lifetime if max_lifetime > 0 else None)
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.bare")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9100)
    ap.add_argument(
        "--origin", required=True, help="origin base URL to fetch the stored bytes from"
    )
    ap.add_argument("--path", default="/bench/1")
    ap.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    ap.add_argument("--max-lifetime", type=float, default=3600.0)
    ns = ap.parse_args(argv)
    body, headers = fetch(ns.origin.rstrip("/") + ns.path)
    loop_name = install_loop(ns.loop)
    print(f"loadtest.bare: event loop {loop_name}, pid {os.getpid()}", flush=True)
    asyncio.run(serve(ns.host, ns.port, body, headers, ns.max_lifetime))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
