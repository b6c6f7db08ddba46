"""The framework's ceiling: a naive aiohttp handler returning stored bytes.

    python -m loadtest.bare --port 9100 --origin http://127.0.0.1:9000 --path /bench/1

At start-up it fetches ``--path`` from the origin once and keeps the body and the origin's
end-to-end headers; every request then gets ``web.Response(body=stored, headers=stored)``
plus the three headers a cache adds (X-Cache, Cache-Status, Age), so the bytes on the wire
match what tierproxy sends for an L1 hit. This is what "a plain aiohttp app serving from a
dict" costs — the benchmark's reference (a).

With ``--floor`` it serves the same bytes with no framework at all: a bare
``asyncio.Protocol`` that feeds each read to aiohttp's C request parser (llhttp, as tierproxy
does) and writes one prebuilt response per parsed request, in one ``transport.write``. No
handler, no per-request headers, no routing: what an HTTP exchange costs in this runtime
(the event loop, the parser, one read and one write), below which no Python server on it can
go - the benchmark's floor (f).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import os
import signal
import sys
import urllib.request
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser

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


async def _until_stopped(max_lifetime: float) -> None:
    """Until SIGINT or SIGTERM, or ``max_lifetime`` seconds (0: no limit)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), max_lifetime if max_lifetime > 0 else None)


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
    try:
        await _until_stopped(max_lifetime)
    finally:
        await runner.cleanup()


def floor_response(body: bytes, headers: dict[str, str]) -> bytes:
    """The bytes the floor writes for every request: the stored headers plus those a cache
    adds, as in :func:`serve`, and the lines aiohttp adds there (``Date`` and ``Server``,
    fixed here; an ``X-Request-ID`` as tierproxy sends), so the byte count matches."""
    lines = [
        "HTTP/1.1 200 OK",
        *(f"{name}: {value}" for name, value in headers.items()),
        "X-Cache: HIT-L1",
        "Cache-Status: floor; hit",
        "Age: 0",
        "X-Request-ID: 0123456789ab-1",
        f"Content-Length: {len(body)}",
        f"Date: {email.utils.formatdate(usegmt=True)}",
        f"Server: Python/{sys.version_info[0]}.{sys.version_info[1]} aiohttp/{aiohttp.__version__}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Floor(asyncio.Protocol):
    """One connection of the floor server (see the module docstring): parse, answer, repeat."""

    def __init__(self, response: bytes) -> None:
        self._response = response
        self._transport: Any = None  # (uvloop's transports are not asyncio.Transport)
        self._parser: HttpRequestParser | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        loop = asyncio.get_running_loop()
        self._parser = HttpRequestParser(self, loop, 2**16)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        transport, parser = self._transport, self._parser
        if transport is None or parser is None:
            return
        try:
            messages, _, _ = parser.feed_data(data)
        except HttpProcessingError:
            transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            transport.close()
            return
        if messages:
            transport.write(self._response * len(messages))
            if any(message.should_close for message, _ in messages):
                transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._transport = None
        self._parser = None


async def serve_floor(
    host: str, port: int, body: bytes, headers: dict[str, str], max_lifetime: float
) -> None:
    response = floor_response(body, headers)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Floor(response), host, port, backlog=1024)
    print(
        f"loadtest.bare --floor listening on http://{host}:{port} ({len(body)} bytes)", flush=True
    )
    try:
        await _until_stopped(max_lifetime)
    finally:
        server.close()
        await server.wait_closed()


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
    ap.add_argument(
        "--floor",
        action="store_true",
        help="no framework: the parser and one prebuilt response per request (reference f)",
    )
    ns = ap.parse_args(argv)
    body, headers = fetch(ns.origin.rstrip("/") + ns.path)
    loop_name = install_loop(ns.loop)
    print(f"loadtest.bare: event loop {loop_name}, pid {os.getpid()}", flush=True)
    run = serve_floor if ns.floor else serve
    asyncio.run(run(ns.host, ns.port, body, headers, ns.max_lifetime))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
