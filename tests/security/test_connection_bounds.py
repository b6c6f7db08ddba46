"""Resource bounds of the connection handler and the hit path against hostile clients, measured
from outside a real ``python -m tierproxy serve`` process (uvloop, as in production): its
sockets in /proc/net/tcp, its descriptors in /proc/<pid>/fd, its answers.

Found by a review, each failing before its fix:

**A response left below the transport's high-water mark was never timed out.** The send
timeout ran only while the transport's buffer was over its 64 KiB high-water mark
(``pause_writing``). A client that reads nothing, once the kernel's socket buffers are full,
can leave an answer partly in the transport's buffer but under that mark; the keep-alive
timer (or the connection cap, evicting it as "idle") then called ``force_close()``, and the
transport's ``close()`` waited for that buffer for ever (the client's TCP stack answers the
zero-window probes). Three such clients held a cap of three for good (every new client got
503); ten held ten descriptors under a cap of four. Now a client that takes none of what is
buffered for the send timeout is cut off, whether the connection is open or closing, and a
connection with output still buffered is not "idle" for the cap.

**Requests pipelined behind an L2 lookup were left unparsed.** A request the hit path is
looking up is out of aiohttp's queue but still counts in the parser's pipelining window
(``message_consumed`` comes when it is answered). With 31 requests queued behind the lookup
the window (32) was full and the parser kept the rest of the read, while aiohttp's own queue
(31) was under its limit, so reading was not paused; once the 31 were answered nothing fed the
parser again, and the remaining requests waited for bytes from a client waiting for their
answers (32 of 41 answered). Now reading pauses counting the request being looked up, and
start() feeds the parser again as it drains its queue.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import aiohttp
from support.fixture_types import MakeFaultProxy, SpawnProxy
from support.origin import Origin
from support.proxy import SpawnedProxy
from support.redis_server import RedisServer

CACHEABLE = {"Cache-Control": "public, max-age=600"}
# One answer: under the 64 KiB high-water mark, over the 16 KiB join limit (written at once).
ANSWER_BODY = 60_000


def _get(target: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: proxy.test\r\n\r\n" % target.encode()


def _tcp_sockets() -> list[tuple[int, int, int, int, str]]:
    """(local port, remote port, tx queue, rx queue, state) of every IPv4 TCP socket."""
    out = []
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            f = line.split()
            tx, rx = f[4].split(":")
            out.append(
                (
                    int(f[1].split(":")[1], 16),
                    int(f[2].split(":")[1], 16),
                    int(tx, 16),
                    int(rx, 16),
                    f[3],
                )
            )
    return out


def _queued(local: int, remote: int) -> int | None:
    for lport, rport, tx, rx, _state in _tcp_sockets():
        if lport == local and rport == remote:
            return tx + rx
    return None


def _proxy_side_open(proxy_port: int, client_ports: list[int]) -> list[int]:
    """The client ports whose connection the proxy still holds (its socket ESTABLISHED: the
    proxy never closed it; one it closed would be in FIN_WAIT with no descriptor)."""
    wanted = set(client_ports)
    return sorted(
        rport
        for lport, rport, _tx, _rx, state in _tcp_sockets()
        if lport == proxy_port and rport in wanted and state == "01"
    )


async def _samples(proxy: SpawnedProxy, prefix: str) -> list[str]:
    """The proxy listener's samples of ``prefix`` from /metrics."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(proxy.admin_url + "/metrics") as resp,
    ):
        text = await resp.text()
    return [line for line in text.splitlines() if line.startswith(prefix) and '"proxy"' in line]


def _descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _answer_size(proxy_port: int, target: str) -> int:
    """The bytes of one answer to ``target`` (head and body) as the proxy sends it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    try:
        writer.write(_get(target))
        await writer.drain()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
        return len(head) + length
    finally:
        writer.close()


async def _non_reading_client(proxy_port: int, target: str, answer: int) -> socket.socket:
    """A client that never reads: it asks for ``target`` (an ``answer``-byte L1 hit, under
    the 64 KiB high-water mark) one request at a time, each once the kernel holds all the
    answers so far, until the kernel's buffers (the proxy's send buffer, grown to its
    maximum, and this socket's small receive buffer) stop taking a whole answer - so the last
    answer is partly left in the proxy's own transport buffer, under its high-water mark."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", proxy_port))
    local = sock.getsockname()[1]
    request = _get(target)
    slack = 512  # (a head's length may vary by a byte or so: Age)

    def queued() -> int:
        server, client = _queued(proxy_port, local), _queued(local, proxy_port)
        assert server is not None and client is not None
        return server + client

    for sent in range(1, 500):  # bounded: the kernel's buffers are a few MB (tcp_wmem)
        sock.sendall(request)
        last, still = -1, 0
        for _ in range(250):  # at most ~2.5 s per request
            await asyncio.sleep(0.01)
            now = queued()
            if now >= sent * answer - slack:
                break  # all answered so far is in the kernel
            still = still + 1 if now == last else 0
            last = now
            if still >= 60:  # 0.6 s without a byte moving: the kernel takes no more
                left = sent * answer - now
                assert 0 < left < 64 * 1024, left
                return sock
        else:
            break
    sock.close()
    raise AssertionError("the kernel's buffers never filled")


async def _warm(proxy: SpawnedProxy, target: str) -> None:
    async with aiohttp.ClientSession() as session:
        for expected in ("MISS", "HIT-L1"):
            async with session.get(proxy.url + target) as resp:
                await resp.read()
                assert resp.headers.get("X-Cache") == expected, resp.headers


async def _status(proxy: SpawnedProxy, target: str) -> int:
    """The status a fresh client gets for ``target`` (the 503 of a full cap included)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(_get(target))
        await writer.drain()
        async with asyncio.timeout(5):
            line = await reader.readline()
        assert line.startswith(b"HTTP/1."), line
        return int(line.split()[1])
    finally:
        writer.close()


async def test_a_client_that_never_reads_is_cut_off_even_below_the_high_water_mark(
    spawn_proxy: SpawnProxy, origin: Origin
) -> None:
    """Three clients that never read, each leaving its last answer partly in the proxy's
    buffer (below the 64 KiB high-water mark), on a proxy capped at three connections with a
    4 s keep-alive and a 1 s send timeout. Expected: each is disconnected within those
    timeouts (it accepted no bytes while its response waited), and a new client is served.
    Before the fix: the keep-alive timer force-closes each, the close waits for a client that
    never reads, the descriptors stay open for good, and every new client gets 503."""
    origin.set("/obj", headers=CACHEABLE, size=ANSWER_BODY)
    origin.set("/small", headers=CACHEABLE, body=b"small")
    proxy = await spawn_proxy(
        SQLITE_PATH="off",
        ACCESS_LOG="off",
        # (long enough that no client is idle-closed while the kernel still takes its bytes)
        KEEPALIVE_TIMEOUT=4,
        SEND_TIMEOUT=1,
        MAX_CLIENT_CONNECTIONS=3,
    )
    await _warm(proxy, "/obj")
    await _warm(proxy, "/small")
    socks: list[socket.socket] = []
    try:
        answer = await _answer_size(proxy.port, "/obj")
        socks.extend(
            await asyncio.gather(
                *(_non_reading_client(proxy.port, "/obj", answer) for _ in range(3))
            )
        )
        ports = [s.getsockname()[1] for s in socks]
        await asyncio.sleep(8)  # keep-alive (4 s) + send timeout (1 s), and then some
        held = _proxy_side_open(proxy.port, ports)
        statuses = [await _status(proxy, "/small") for _ in range(3)]
        await asyncio.sleep(4)
        held_later = _proxy_side_open(proxy.port, ports)
        assert held == [] and held_later == [] and statuses == [200, 200, 200], (
            f"12 s after the last of 3 non-reading clients (keep-alive 4 s, send timeout 1 s) "
            f"the proxy still holds {len(held_later)} of their connections "
            f"({len(held)} at 8 s); new clients got {statuses} (cap 3)"
        )
    finally:
        for sock in socks:
            sock.close()


async def test_a_cap_full_of_clients_that_never_read_frees_up(
    spawn_proxy: SpawnProxy, origin: Origin
) -> None:
    """Four clients that never read, each leaving its last answer partly in the proxy's
    buffer, fill a proxy capped at four connections (long keep-alive). They are not "idle"
    for the cap (evicting one would only start a close that waits for it, its descriptor
    outside the count), and each is cut off once it has taken nothing for the send timeout:
    a few seconds later the proxy holds none of them, its descriptors are back, and a new
    client is served. Before the fix, the cap evicted them as idle and their descriptors
    stayed (10 of 10 held with a cap of 4), or they held the cap until keep-alive."""
    origin.set("/obj", headers=CACHEABLE, size=ANSWER_BODY)
    proxy = await spawn_proxy(
        SQLITE_PATH="off",
        ACCESS_LOG="off",
        KEEPALIVE_TIMEOUT=120,
        SEND_TIMEOUT=1,
        MAX_CLIENT_CONNECTIONS=4,
    )
    await _warm(proxy, "/obj")
    before = _descriptors(proxy.pid)
    socks: list[socket.socket] = []
    try:
        answer = await _answer_size(proxy.port, "/obj")
        socks.extend(
            await asyncio.gather(
                *(_non_reading_client(proxy.port, "/obj", answer) for _ in range(4))
            )
        )
        await asyncio.sleep(4)  # the send timeout (1 s) had every chance to act
        ports = [s.getsockname()[1] for s in socks]
        held = _proxy_side_open(proxy.port, ports)
        grown = _descriptors(proxy.pid) - before
        assert not held and grown <= 1, (
            f"cap 4: the proxy holds {len(held)} of 4 non-reading clients' connections "
            f"and {grown} more descriptors than before them"
        )
        assert await _status(proxy, "/obj") == 200
    finally:
        for sock in socks:
            sock.close()


def _read_responses(sock: socket.socket, count: int, deadline: float) -> int:
    """How many whole Content-Length responses arrive on ``sock`` before ``deadline``."""
    buffered = bytearray()
    got = 0
    while got < count and time.monotonic() < deadline:
        end = buffered.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffered[:end]).lower()
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip() == b"content-length":
                    length = int(value)
            if len(buffered) >= end + 4 + length:
                del buffered[: end + 4 + length]
                got += 1
                continue
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            break
        if not chunk:
            break
        buffered += chunk
    return got


async def test_requests_pipelined_behind_an_l2_lookup_are_all_answered(
    spawn_proxy: SpawnProxy,
    origin: Origin,
    redis_server: RedisServer,
    redis_url: str,
    fault_proxy: MakeFaultProxy,
) -> None:
    """``GET /a`` (an L2 hit: its lookup takes ~0.3 s through a delaying proxy in front of
    Redis), then - while it is looked up - 40 L1 hits in one write. Expected: 41 answers.
    Before the fix: 32 (the lookup's, and the 31 the parser let through); the other 9 stay in
    the parser's tail with reading not paused, and the connection waits for bytes the client
    never sends (until the idle timer closes it, silently)."""
    origin.set("/a", headers=CACHEABLE, body=b"a" * 20_000)  # over L1's entry limit
    origin.set("/s", headers=CACHEABLE, body=b"small")
    front = await fault_proxy(redis_server.port, mode="pass")
    proxy = await spawn_proxy(
        REDIS_URL=f"redis://127.0.0.1:{front.port}/0",
        SQLITE_PATH="off",
        ACCESS_LOG="off",
        L1_MAX_BYTES=80_000,
        L2_TIMEOUT=3,
        KEEPALIVE_TIMEOUT=30,
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/s") as resp:
            await resp.read()
        for _ in range(100):  # until /a is in L2 (its backfill is asynchronous; bounded)
            async with session.get(proxy.url + "/a") as resp:
                await resp.read()
                if resp.headers.get("X-Cache") == "HIT-L2":
                    break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("/a never became an L2 hit")
    front.set_mode("delay", delay=0.3)

    def client() -> int:
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        try:
            time.sleep(0.05)  # the connection is idle: the hit path takes what comes next
            sock.sendall(_get("/a"))
            time.sleep(0.1)  # /a's lookup is in flight
            sock.sendall(_get("/s") * 40)
            return _read_responses(sock, 41, time.monotonic() + 5)
        finally:
            sock.close()

    async with asyncio.timeout(30):
        answered = await asyncio.to_thread(client)
    assert answered == 41, f"{answered} of 41 pipelined requests answered within 5 s"
