"""Issue 10 §5 (first bullet): slow readers of a big cached object cannot multiply memory.

A cached body is immutable and shared: a hit writes slices of the stored bytes and continues
only as the client drains them, so each connection buffers about the transport's high-water
mark, not its own copy of the body. Before, 100 clients reading a 6 MB L1 hit very slowly
raised the proxy's RSS by ~600 MB (Python 3.11's ``transport.writelines`` and aiohttp's
head+body join copy the body per connection; asyncio's transport copies what it could not send).

Each test spawns the proxy (``python -m tierproxy serve``) on uvloop (what it runs in
production) or on asyncio (uvloop hidden by a ``sitecustomize`` shim), caches one 6 MB object,
opens 100 raw client sockets with a 4 KiB receive buffer that ask for it and read nothing,
waits (bounded) until the proxy has started answering every one of them, and samples the
proxy's VmRSS. The bound asserted: growth below 60 MB for 100 connections (600 KB each), a
tenth of one copy per connection (100 x 6 MB) and ~4x what a connection may hold after the fix
(the 64 KiB high-water mark plus one 64 KiB slice, plus aiohttp's per-connection objects).
Then a few of the sockets read their whole response: the bytes are the object's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from support.fixture_types import MakeProxy
from support.net import free_port
from support.origin import Origin, make_body
from support.proxy import SpawnedProxy, start_subprocess_proxy
from support.wait import wait_for_condition

pytestmark = pytest.mark.slow

BODY_BYTES = 6 * 1024 * 1024
CLIENTS = 100
GROWTH_BOUND = 60 * 1024 * 1024
_NO_UVLOOP = "import sys\nsys.modules['uvloop'] = None  # import uvloop -> ImportError\n"


@pytest.fixture
async def spawn(origin: Origin, tmp_path: Path) -> AsyncIterator[Callable[..., SpawnedProxy]]:
    procs: list[SpawnedProxy] = []

    def factory(event_loop: str) -> SpawnedProxy:
        extra: list[str] = []
        if event_loop == "asyncio":
            shim = tmp_path / "no-uvloop"
            shim.mkdir(exist_ok=True)
            (shim / "sitecustomize.py").write_text(_NO_UVLOOP)
            extra.append(str(shim))
        env = {
            "TIERPROXY_ORIGIN": origin.url,
            "TIERPROXY_SQLITE_PATH": "off",
            "TIERPROXY_HOST": "127.0.0.1",
            "TIERPROXY_PORT": str(free_port()),
            "TIERPROXY_ADMIN_PORT": str(free_port()),
            "TIERPROXY_SEND_TIMEOUT": "120",  # the clients below read nothing for a while
            "TIERPROXY_ACCESS_LOG": "off",
        }
        proc = start_subprocess_proxy(env, tmp_path / "logs", tmp_path, extra_pythonpath=extra)
        procs.append(proc)
        return proc

    try:
        yield factory
    finally:
        origin.release()
        for proc in procs:
            proc.cleanup()


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _slow_socket(port: int, request: bytes) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    sock.setblocking(False)
    return sock


def _has_bytes(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False


async def _read_response(sock: socket.socket, length: int, timeout: float = 30.0) -> bytes:
    """Read one response (head + ``length``-byte body) from a non-blocking socket."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    async with asyncio.timeout(timeout):
        while True:
            end = data.find(b"\r\n\r\n")
            if end >= 0 and len(data) >= end + 4 + length:
                return bytes(data)
            chunk = await loop.sock_recv(sock, 1 << 16)
            assert chunk, f"connection closed after {len(data)} bytes"
            data += chunk


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize(
    ("path_name", "extra_header"),
    [
        ("l1-hit-path", b""),
        # A conditional that does not match: the full path (server.py _respond) answers 200
        # with the whole stored body.
        ("full-path", b'If-None-Match: "does-not-match"\r\n'),
    ],
)
async def test_slow_readers_of_a_big_hit_share_the_stored_bytes(
    origin: Origin,
    spawn: Callable[..., SpawnedProxy],
    event_loop: str,
    path_name: str,
    extra_header: bytes,
) -> None:
    body = make_body(BODY_BYTES, seed=7)
    origin.set("/big", body=body, headers={"Cache-Control": "public, max-age=600"})
    proxy = spawn(event_loop)
    await proxy.wait_healthy(20)
    async with aiohttp.ClientSession() as session:
        for expected in ("MISS", "HIT-L1"):
            async with session.get(proxy.url + "/big") as resp:
                assert (await resp.read()) == body
                assert resp.headers["X-Cache"] == expected
    loop_line = "event loop: uvloop" if event_loop == "uvloop" else "event loop: asyncio"
    await wait_for_condition(
        lambda: loop_line in proxy.stderr, timeout=10, message=f"{loop_line!r} in the proxy's log"
    )

    request = b"GET /big HTTP/1.1\r\nHost: proxy\r\n" + extra_header + b"\r\n"
    before = _rss(proxy.pid)
    socks: list[socket.socket] = []
    try:
        for _ in range(CLIENTS):
            socks.append(_slow_socket(proxy.port, request))
        # Every client has had the first bytes of its answer: the proxy wrote to all of them.
        await wait_for_condition(
            lambda: all(_has_bytes(s) for s in socks),
            timeout=30,
            message=lambda: (
                f"answers started on all {CLIENTS} connections "
                f"({sum(_has_bytes(s) for s in socks)} so far)"
            ),
        )
        peak = before
        for _ in range(10):  # a few samples while nothing is read: the worst seen counts
            peak = max(peak, _rss(proxy.pid))
            await asyncio.sleep(0.1)
        growth = peak - before
        print(f"{path_name} on {event_loop}: RSS {before / 2**20:.0f} MB -> {peak / 2**20:.0f} MB")
        assert growth < GROWTH_BOUND, (
            f"{path_name} on {event_loop}: RSS grew {growth / 2**20:.0f} MB for {CLIENTS} "
            f"slow readers of a {BODY_BYTES / 2**20:.0f} MB hit (bound {GROWTH_BOUND / 2**20:.0f} MB)"
        )
        # The bytes are the object's, whole, for clients that do read.
        for sock in socks[:3]:
            response = await _read_response(sock, BODY_BYTES)
            head, _, got = response.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head[:200]
            assert b"X-Cache: HIT-L1" in head
            assert got == body
    finally:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()


def _split_response(data: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(head, body, rest) of the first whole response in ``data`` (Content-Length framed)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = data[:end]
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    start = end + 4
    if len(data) < start + length:
        return None
    return head, data[start : start + length], data[start + length :]


async def test_requests_pipelined_behind_a_big_hit_are_answered_in_order(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    # The rest of a big body goes out as the client drains it; what was pipelined behind it
    # (hit-path hits and full-path answers alike) waits its turn and is answered whole.
    big = make_body(2 * 1024 * 1024, seed=3)
    origin.set("/big", body=big, headers={"Cache-Control": "public, max-age=600"})
    origin.set("/small", body=b"small body", headers={"Cache-Control": "public, max-age=600"})
    proxy = await make_proxy(SQLITE_PATH="off")
    for path in ("/big", "/small"):
        assert (await proxy.get(path)).x_cache == "MISS"
    requests = [
        (b"/big", b""),
        (b"/small", b""),
        (b"/big", b'If-None-Match: "other"\r\n'),
        (b"/small", b""),
        (b"/big", b""),
    ]
    wire = b"".join(b"GET " + p + b" HTTP/1.1\r\nHost: x\r\n" + h + b"\r\n" for p, h in requests)
    sock = _slow_socket(proxy.port, wire)
    loop = asyncio.get_running_loop()
    data = b""
    answers: list[tuple[bytes, bytes]] = []
    try:
        async with asyncio.timeout(30):
            while len(answers) < len(requests):
                split = _split_response(data)
                if split is None:
                    chunk = await loop.sock_recv(sock, 8192)  # small reads: many pauses
                    assert chunk, f"closed after {len(answers)} answers"
                    data += chunk
                    continue
                head, body, data = split
                answers.append((head, body))
    finally:
        sock.close()
    for (target, _), (head, body) in zip(requests, answers, strict=True):
        assert head.startswith(b"HTTP/1.1 200 "), head[:200]
        assert b"\r\nX-Cache: HIT-L1" in head, head
        assert body == (big if target == b"/big" else b"small body"), (target, len(body))
    assert data == b""


async def test_a_big_l3_hit_looked_up_by_the_hit_path_is_sent_whole_to_a_slow_reader(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    # The hit path awaits the L3 lookup, then writes the body as the client drains it, in
    # the same task; the request pipelined behind it is answered after it, whole.
    big = make_body(3 * 1024 * 1024, seed=5)
    origin.set("/big", body=big, headers={"Cache-Control": "public, max-age=600"})
    origin.set("/small", body=b"small body", headers={"Cache-Control": "public, max-age=600"})
    first = await make_proxy()
    for path in ("/big", "/small"):
        assert (await first.get(path)).x_cache == "MISS"
    await first.settle()
    second = await make_proxy()  # same L3 file, empty L1
    sock = _slow_socket(
        second.port, b"GET /big HTTP/1.1\r\nHost: x\r\n\r\nGET /small HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    loop = asyncio.get_running_loop()
    data = b""
    answers: list[tuple[bytes, bytes]] = []
    try:
        async with asyncio.timeout(30):
            while len(answers) < 2:
                split = _split_response(data)
                if split is None:
                    chunk = await loop.sock_recv(sock, 8192)
                    assert chunk, f"closed after {len(answers)} answers"
                    data += chunk
                    continue
                head, body, data = split
                answers.append((head, body))
    finally:
        sock.close()
    (big_head, big_body), (small_head, small_body) = answers
    assert b"\r\nX-Cache: HIT-L3\r\n" in big_head, big_head
    assert big_body == big
    assert small_body == b"small body" and b"\r\nX-Cache: HIT-L" in small_head, small_head
    assert second.state.metrics.hit_path_responses.value == 2  # both by the hit path
