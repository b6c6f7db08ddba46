"""Responses keep the order of pipelined requests when the hit path and the full path share a
connection (tierproxy.hits, ProxyRequestHandler).

Found by a review: a request pipelined right after a full-path response, while aiohttp's
request loop (start()) had not yet resumed, was looked up by the hit path while the request
behind it stayed in start()'s queue; start() answered that one first, and the client read each
response as the other's. It failed in every run (within 26 to 113 of the 400 rounds) before
the requests behind a lookup were held back from start() (``_hide_from_start``).
"""

from __future__ import annotations

import asyncio
import socket
import time

from support.fixture_types import MakeFaultProxy, SpawnProxy
from support.origin import Origin
from support.redis_server import RedisServer

CACHEABLE = {"Cache-Control": "max-age=300"}


def get(target: str, extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: proxy.test\r\n%s\r\n" % (target.encode(), extra)


def _recv_response(
    sock: socket.socket, buffered: bytearray, *, head_only: bool = False
) -> tuple[bytes, bytes]:
    """One Content-Length response from a blocking socket (``buffered``: bytes read ahead);
    ``head_only``: the answer to a HEAD (no body whatever its Content-Length)."""
    end = buffered.find(b"\r\n\r\n")
    for _ in range(10_000):  # bounded: each recv waits at most the socket's timeout
        if end >= 0:
            break
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError(f"closed mid-head: {bytes(buffered[:100])!r}")
        buffered += chunk
        end = buffered.find(b"\r\n\r\n")
    else:
        raise ValueError("no response head")
    head = bytes(buffered[: end + 4])
    del buffered[: end + 4]
    length = 0
    for line in () if head_only else head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    for _ in range(10_000):
        if len(buffered) >= length:
            break
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("closed mid-body")
        buffered += chunk
    body = bytes(buffered[:length])
    del buffered[:length]
    return head, body


def _spin(seconds: float) -> None:
    """Busy-wait ``seconds`` (sleeping is far coarser than the window aimed at)."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


async def test_requests_pipelined_right_after_a_full_path_response_keep_their_order(
    spawn_proxy: SpawnProxy,
    origin: Origin,
    redis_server: RedisServer,
    redis_url: str,
    fault_proxy: MakeFaultProxy,
) -> None:
    """A full-path response (a HEAD) is written; the client's next pipelined requests - an L2
    hit ``/a``, then an L1 hit ``/s`` - arrive before aiohttp's request loop (start()) has
    resumed: ``_full_path_done()`` makes them the hit path's. It starts ``/a``'s L2 lookup.
    start() then resumes; it waits only when its queue is empty, so ``/s`` must not be in it
    until ``/a`` is answered, or ``/s``'s response goes out first and the client reads it as
    ``/a``'s.

    Redis is reached through a delaying TCP proxy (10 ms a chunk), so ``/a``'s lookup always
    outlasts ``/s``'s full path. The moment the pipelined requests are sent after the HEAD is
    swept (0 to 0.4 ms, busy-waited) so that some of them land in that window."""
    body_a = b"a" * 20_000  # over the L1 entry limit (L1_MAX_BYTES / 8): only ever in L2
    origin.set("/a", headers=CACHEABLE, body=body_a)
    origin.set("/s", headers=CACHEABLE, body=b"small")
    front = await fault_proxy(redis_server.port, mode="delay", delay=0.01)
    proc = await spawn_proxy(
        REDIS_URL=f"redis://127.0.0.1:{front.port}/0",
        SQLITE_PATH="off",
        ACCESS_LOG="off",
        L1_MAX_BYTES=80_000,
        L2_TIMEOUT=2,
    )
    head_s = b"HEAD /s HTTP/1.1\r\nHost: proxy.test\r\n\r\n"
    pipelined = get("/a") + get("/s")
    bad: list[str] = []
    rounds = {"sent": 0}

    def client(port: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each send goes at once
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        buffered = bytearray()
        try:
            for _ in range(100):  # until /a is stored in L2 (bounded)
                sock.sendall(get("/a"))
                head, _ = _recv_response(sock, buffered)
                if b"\r\nX-Cache: HIT-L2\r\n" in head:
                    break
                time.sleep(0.05)
            else:
                raise AssertionError(f"/a never became an L2 hit: {head!r}")
            for _ in range(2):
                sock.sendall(get("/s"))
                head, _ = _recv_response(sock, buffered)
            assert b"\r\nX-Cache: HIT-L1\r\n" in head, head
            for step in range(400):
                rounds["sent"] += 1
                sock.sendall(head_s)
                _spin((step % 200) * 2e-6)
                sock.sendall(pipelined)
                _recv_response(sock, buffered, head_only=True)
                first_head, first = _recv_response(sock, buffered)
                second_head, second = _recv_response(sock, buffered)
                if (first, second) != (body_a, b"small"):
                    bad.append(
                        f"round {step}: GET /a answered with {first[:20]!r} "
                        f"({_x_cache(first_head)}), GET /s with {second[:20]!r} "
                        f"({_x_cache(second_head)})"
                    )
                    return
        except (OSError, ValueError, AssertionError) as exc:
            bad.append(f"{exc!r}"[:300])
        finally:
            sock.close()

    async with asyncio.timeout(120):
        await asyncio.to_thread(client, proc.port)
    assert bad == [], f"after {rounds['sent']} rounds: {bad}"


def _x_cache(head: bytes) -> str:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"x-cache:"):
            return line.split(b":", 1)[1].strip().decode()
    return "-"
