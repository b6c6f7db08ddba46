"""Helpers for the hostile-input suite: an origin that reflects headers, raw HTTP bytes."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from support.net import RawConnection

__all__ = [
    "EchoOrigin",
    "FastOrigin",
    "RawConnection",
    "first_response",
    "pipelined_gets",
    "raw_exchange",
    "status_of",
]


class EchoOrigin:
    """Answers every GET with a cacheable JSON body of the request headers it saw.

    ``Cache-Control: public, max-age=60`` unless the request asks otherwise, so anything a
    client smuggles into the origin's answer would be stored and served to everyone.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.port}"

    async def start(self) -> EchoOrigin:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()
        return self

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        seen = {
            "method": request.method,
            "target": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body": body.decode("latin-1"),
        }
        if len(self.requests) < 10_000:
            self.requests.append(seen)
        return web.Response(
            body=json.dumps(seen).encode(),
            content_type="application/json",
            headers={
                "Cache-Control": "public, max-age=60",
                "X-Echo-Host": request.headers.get("X-Forwarded-Host", ""),
            },
        )


def status_of(response: bytes) -> int:
    """The status code of the first response in ``response`` bytes."""
    assert response.startswith(b"HTTP/1."), f"not an HTTP response: {response[:200]!r}"
    return int(response.split(b" ", 2)[1])


async def first_response(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection and return the first response (head and body)."""
    conn = await RawConnection.open(port)
    try:
        await conn.send(data)
        return await conn.read_response(timeout)
    finally:
        await conn.close()


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection and return all bytes until the proxy closes it."""
    conn = await RawConnection.open(port)
    try:
        await conn.send(data)
        return await conn.read_until_closed(timeout)
    finally:
        await conn.close()


class _FastOriginProtocol(asyncio.Protocol):
    def __init__(self, origin: FastOrigin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.origin.transports.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.origin.transports.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        for _ in range(10_000):  # bounded: at most this many pipelined requests per read
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            self.origin.count += 1
            body = b"origin body for " + head.split(b" ", 2)[1]
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nCache-Control: max-age=60\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )


class FastOrigin:
    """A bare asyncio origin for volume tests: bodiless requests in, a cacheable 200 out.

    Much cheaper per request than the aiohttp test origin, so 10,000 misses fit the suite's
    time budget; it only counts requests.
    """

    def __init__(self) -> None:
        self.count = 0
        self.transports: set[asyncio.Transport] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FastOrigin:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _FastOriginProtocol(self), "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for transport in list(self.transports):
                transport.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()


async def pipelined_gets(port: int, targets: list[str], batch: int = 32) -> list[int]:
    """GET each target over one keep-alive connection, ``batch`` requests in flight at once."""
    conn = await RawConnection.open(port)
    statuses: list[int] = []
    try:
        for start in range(0, len(targets), batch):
            part = targets[start : start + batch]
            await conn.send(
                b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % t.encode() for t in part)
            )
            for _ in part:
                statuses.append(status_of(await conn.read_response(timeout=10)))
    finally:
        await conn.close()
    return statuses
