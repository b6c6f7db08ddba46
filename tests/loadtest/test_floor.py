"""The benchmark's floor (``python -m loadtest.bare --floor``): a real process in front of the
test origin, spoken to over a raw socket.

The floor is a reference the README's performance figures are read against, so it must be a
real HTTP/1.1 server for what the benchmark sends: the stored body, byte for byte, with a
``Content-Length`` that frames it, one response per pipelined request and in order, the
connection kept open until a request asks to close it, and a 400 (then close) for bytes that
are not HTTP.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.net import free_port
from support.origin import Origin, make_body

REPO = Path(__file__).resolve().parents[2]
BODY = make_body(1024, seed=7)


@pytest.fixture
async def floor(origin: Origin) -> AsyncIterator[int]:
    origin.set("/bench/1", body=BODY, headers={"Cache-Control": "max-age=3600"})
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "loadtest.bare", "--floor", "--port", str(port)),
        *("--origin", origin.url, "--path", "/bench/1", "--max-lifetime", "60"),
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(100):  # up to 10 s to listen
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                assert proc.returncode is None, "the floor exited (its error is above)"
                await asyncio.sleep(0.1)
                continue
            writer.close()
            break
        else:
            pytest.fail("the floor never listened")
        yield port
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


async def _response(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    return status.encode(), headers, body


async def test_pipelined_requests_get_the_stored_bytes_in_order_until_one_closes(
    floor: int,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", floor)
    try:
        one = b"GET /bench/1 HTTP/1.1\r\nHost: x\r\n\r\n"
        last = b"GET /bench/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        writer.write(one * 3)  # three in one write, then one split in two writes
        writer.write(one[:9])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(one[9:] + last)
        for _ in range(5):
            status, headers, body = await _response(reader)
            assert status == b"HTTP/1.1 200 OK"
            assert body == BODY
            assert headers["cache-control"] == "max-age=3600"
            assert headers["x-cache"] == "HIT-L1"
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after the last
    finally:
        writer.close()


async def test_bytes_that_are_not_http_get_a_400_and_the_connection_closes(floor: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", floor)
    try:
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        rest = await asyncio.wait_for(reader.read(), 5)
        assert rest.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    finally:
        writer.close()
