"""The connection handler's L1 hit path (tierproxy.hits) against the app's full path.

A fresh L1 hit is answered by the connection handler from bytes encoded once per entry; these
tests hold it to the full path's answer byte for byte, check that everything it is unsure of
still gets the full path's answer, that pipelined requests keep their order, and that the
connection's limits (keep-alive, send timeout) still hold for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support.canned import CannedOrigin
from support.clock import SteppedClock
from support.fixture_types import MakeProxy, SpawnProxy
from support.net import RawConnection
from support.origin import Origin
from support.proxy import ProxyHandle
from support.purge_log import past_purge_log_start
from support.redis_server import RedisServer
from support.scrape import metric_value

import tierproxy

CACHEABLE = {"Cache-Control": "max-age=300"}


def hit_path_count(proxy: ProxyHandle) -> float:
    value = proxy.state.metrics.registry.get_sample_value("tierproxy_hit_path_responses_total")
    return value or 0.0


def l1_lookups(proxy: ProxyHandle, outcome: str) -> float:
    value = proxy.state.metrics.registry.get_sample_value(
        "tierproxy_tier_lookups_total", {"tier": "l1", "outcome": outcome}
    )
    return value or 0.0


def get(target: str, extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: proxy.test\r\n%s\r\n" % (target.encode(), extra)


def field(pattern: bytes, response: bytes) -> bytes:
    """The first group of ``pattern`` in ``response``; the pattern must match."""
    found = re.search(pattern, response)
    assert found is not None, (pattern, response[:300])
    return found.group(1)


async def one_response(port: int, request: bytes, *, pause: float = 0.05) -> bytes:
    """Connect, let the connection go idle (``pause``), send ``request``, read one response."""
    conn = await RawConnection.open(port)
    try:
        await asyncio.sleep(pause)
        await conn.send(request)
        return await conn.read_response()
    finally:
        await conn.close()


@pytest.fixture
async def raw_origin() -> AsyncIterator[CannedOrigin]:
    origin = await CannedOrigin().start()
    try:
        yield origin
    finally:
        await origin.close()


STORED = {
    "typical": (
        b"HTTP/1.1 200 OK",
        [
            b"Content-Type: text/html; charset=utf-8",
            b"Cache-Control: public, max-age=300",
            b'ETag: "v1"',
            b"Last-Modified: Tue, 24 Nov 2026 10:00:00 GMT",
            b"Date: {now}",
            b"Server: origin/1.0",
        ],
        b"<p>hello</p>" * 40,
    ),
    # aiohttp adds Content-Type, Date and Server when the stored headers lack them.
    "bare": (b"HTTP/1.1 200 OK", [b"Cache-Control: max-age=300"], b"x" * 100),
    "empty-body": (b"HTTP/1.1 200 OK", [b"Cache-Control: max-age=300"], b""),
    "repeated-and-utf8": (
        b"HTTP/1.1 200 OK",
        [
            b"Cache-Control: max-age=300",
            b"Link: </a.css>; rel=preload",
            b"Link: </b.js>; rel=preload",
            "X-Title: caf\u00e9".encode(),
            b"Surrogate-Key: tag-a tag-b",
        ],
        b"body",
    ),
    "not-found": (
        b"HTTP/1.1 404 Not Found",
        [b"Cache-Control: max-age=300", b"Content-Type: text/plain"],
        b"gone",
    ),
    "redirect": (
        b"HTTP/1.1 301 Moved Permanently",
        [b"Cache-Control: max-age=300", b"Location: /elsewhere"],
        b"",
    ),
    "large": (
        b"HTTP/1.1 200 OK",
        [b"Cache-Control: max-age=300", b"Content-Type: application/octet-stream"],
        bytes(range(256)) * 1024,
    ),
    # Written in slices of the stored bytes by both paths; aiohttp's default Content-Type.
    "large-untyped": (
        b"HTTP/1.1 200 OK",
        [b"Cache-Control: max-age=300"],
        bytes(range(255, -1, -1)) * 1200,
    ),
}


def _mask_clock(response: bytes) -> bytes:
    # Age, the Cache-Status ttl and a Date the proxy adds tick with the clock: the two
    # proxies may answer in different seconds.
    response = re.sub(rb"\r\nAge: \d+\r\n", b"\r\nAge: N\r\n", response)
    response = re.sub(rb"; ttl=-?\d+", b"; ttl=N", response)
    return re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: D", response)


@pytest.mark.parametrize("name", sorted(STORED))
async def test_hit_path_answers_byte_for_byte_as_the_full_path(
    make_proxy: MakeProxy, raw_origin: CannedOrigin, name: str
) -> None:
    status_line, header_lines, body = STORED[name]
    origin_date = email.utils.formatdate(usegmt=True).encode()
    header_lines = [line.replace(b"{now}", origin_date) for line in header_lines]
    target = f"/stored/{name}?q=1"
    raw_origin.set(target, header_lines, body, status_line)
    fast = await make_proxy(ORIGIN=raw_origin.url, SQLITE_PATH="off")
    full = await make_proxy(ORIGIN=raw_origin.url, SQLITE_PATH="off", hit_path=False)
    request = get(target, b"X-Request-ID: same-id-for-both\r\n")
    answers = {}
    for label, proxy in (("fast", fast), ("full", full)):
        miss = await one_response(proxy.port, request)
        assert b"\r\nX-Cache: MISS\r\n" in miss, miss[:300]
        before = hit_path_count(proxy)
        answers[label] = await one_response(proxy.port, request)
        assert b"\r\nX-Cache: HIT-L1\r\n" in answers[label], answers[label][:400]
        assert hit_path_count(proxy) == before + (1 if label == "fast" else 0)
    assert _mask_clock(answers["fast"]) == _mask_clock(answers["full"])
    assert answers["fast"].endswith(b"\r\n\r\n" + body)
    if b"Date: " + origin_date in header_lines:
        assert b"\r\nDate: " + origin_date + b"\r\n" in answers["fast"]  # the origin's
    assert b"\r\nX-Request-ID: same-id-for-both\r\n" in answers["fast"]
    assert raw_origin.count == 2  # one miss per proxy; every hit came from L1


async def test_hit_path_gives_each_request_its_own_id_and_a_true_age(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    origin.set("/a", headers={"Cache-Control": "max-age=300"}, size=64)
    proxy = await make_proxy(SQLITE_PATH="off")
    await proxy.get("/a")
    conn = await RawConnection.open(proxy.port)
    try:
        await asyncio.sleep(0.05)
        await conn.send(get("/a") + get("/a") + get("/a", b"X-Request-ID: bad id\r\n"))
        heads = [await conn.read_response() for _ in range(3)]
    finally:
        await conn.close()
    ids = [field(rb"\r\nX-Request-ID: ([^\r]+)", h) for h in heads]
    assert len(set(ids)) == 3 and b"bad id" not in ids, ids  # a bad client id is replaced
    assert all(b"\r\nX-Cache: HIT-L1\r\n" in h and b"\r\nAge: " in h for h in heads)
    assert hit_path_count(proxy) == 3


DECLINED = {
    # request bytes after the request line's Host, expected status, expected X-Cache
    "conditional": (b'If-None-Match: "v1"\r\n', 304, "HIT-L1"),
    "if-modified-since": (b"If-Modified-Since: Wed, 25 Nov 2099 10:00:00 GMT\r\n", 304, "HIT-L1"),
    "request-no-store": (b"Cache-Control: no-store\r\n", 200, "BYPASS"),
    "range": (b"Range: bytes=0-1\r\n", 206, "HIT-L1"),  # answered by the full path
    "body": (b"Content-Length: 3\r\n\r\nabc", 200, "BYPASS"),
}


@pytest.mark.parametrize("name", sorted(DECLINED))
async def test_requests_the_hit_path_declines_get_the_full_paths_answer(
    make_proxy: MakeProxy, origin: Origin, name: str
) -> None:
    origin.set(
        "/d", headers=CACHEABLE, etag='"v1"', last_modified="Tue, 24 Nov 2026 10:00:00 GMT", size=32
    )
    proxy = await make_proxy(SQLITE_PATH="off")
    assert (await proxy.get("/d")).x_cache == "MISS"
    extra, status, x_cache = DECLINED[name]
    if extra.endswith(b"abc"):  # a request with a body: the head ends inside ``extra``
        request = b"GET /d HTTP/1.1\r\nHost: proxy.test\r\n" + extra
    else:
        request = get("/d", extra)
    response = await one_response(proxy.port, request)
    assert response.startswith(b"HTTP/1.1 %d " % status), response[:200]
    assert f"\r\nX-Cache: {x_cache}\r\n".encode() in response, response[:400]
    assert hit_path_count(proxy) == 0


async def test_head_http10_and_connection_close_take_the_full_path(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    origin.set("/h", headers=CACHEABLE, size=50)
    proxy = await make_proxy(SQLITE_PATH="off")
    await proxy.get("/h")
    conn = await RawConnection.open(proxy.port)
    try:
        await asyncio.sleep(0.05)
        await conn.send(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await conn.read_response_head()
    finally:
        await conn.close()
    assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nContent-Length: 50\r\n" in head
    assert head.endswith(b"\r\n\r\n") and b"HIT-L1" in head
    conn = await RawConnection.open(proxy.port)
    try:
        await asyncio.sleep(0.05)
        await conn.send(b"GET /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        closing = await conn.read_until_closed()
    finally:
        await conn.close()
    assert b"HIT-L1" in closing and b"\r\nConnection: close\r\n" in closing
    http10 = await one_response(proxy.port, b"GET /h HTTP/1.0\r\n\r\n")
    assert http10.startswith(b"HTTP/1.0 200 ") and b"HIT-L1" in http10
    assert hit_path_count(proxy) == 0


async def test_vary_mismatch_and_stale_copies_take_the_full_path(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    origin.set("/v", headers={**CACHEABLE, "Vary": "Accept-Language"}, size=10)
    origin.set("/s", headers={"Cache-Control": "max-age=1, stale-while-revalidate=60"}, size=10)
    clock = SteppedClock()
    proxy = await make_proxy(SQLITE_PATH="off", clock=clock)
    await proxy.get("/v", headers={"Accept-Language": "de"})
    await proxy.get("/s")
    german = await one_response(proxy.port, get("/v", b"Accept-Language: de\r\n"))
    assert b"HIT-L1" in german and hit_path_count(proxy) == 1
    french = await one_response(proxy.port, get("/v", b"Accept-Language: fr\r\n"))
    assert b"\r\nX-Cache: MISS\r\n" in french and hit_path_count(proxy) == 1
    clock.advance(1.2)  # /s goes stale (max-age=1)
    stale = await one_response(proxy.port, get("/s"))
    assert b"\r\nX-Cache: STALE-L1\r\n" in stale and hit_path_count(proxy) == 1


async def test_l1_lookups_are_counted_once_whichever_path_answers(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    origin.set("/c", headers=CACHEABLE, size=10)
    proxy = await make_proxy(SQLITE_PATH="off")
    await proxy.get("/c")  # miss: one L1 miss
    assert (l1_lookups(proxy, "hit"), l1_lookups(proxy, "miss")) == (0, 1)
    for _ in range(5):
        await one_response(proxy.port, get("/c"))
    await one_response(proxy.port, get("/other"))  # declined by the hit path, a miss once
    assert hit_path_count(proxy) == 5
    assert (l1_lookups(proxy, "hit"), l1_lookups(proxy, "miss")) == (5, 2)
    responses = proxy.state.metrics.registry.get_sample_value(
        "tierproxy_responses_total", {"cache": "HIT-L1", "status_class": "2xx"}
    )
    assert responses == 5


@pytest.mark.parametrize("tier", ["l1", "l2"])
async def test_pipelined_hits_and_misses_are_answered_in_order(
    make_proxy: MakeProxy, origin: Origin, request: pytest.FixtureRequest, tier: str
) -> None:
    # l1: answered inside data_received; l2: around a lookup the hit path awaits.
    for name in ("a", "c"):
        origin.set(f"/{name}", headers=CACHEABLE, body=f"body {name}".encode())
    origin.set("/b", headers=CACHEABLE, body=b"body b", latency=0.3)
    if tier == "l1":
        env: dict[str, Any] = {"SQLITE_PATH": "off"}
        writer = proxy = await make_proxy(**env)
    else:
        env = {"L1_MAX_BYTES": 0, "REDIS_URL": request.getfixturevalue("redis_url")}
        writer = await make_proxy(**env)
    await writer.get("/a")
    await writer.get("/c")
    if tier == "l2":
        await writer.settle()
        proxy = await make_proxy(**env)
    conn = await RawConnection.open(proxy.port)
    try:
        await asyncio.sleep(0.05)
        await conn.send(get("/a") + get("/b") + get("/c") + get("/a"))
        responses = [await conn.read_response() for _ in range(4)]
        # The connection is still usable, and idle again: the next hit takes the hit path.
        await asyncio.sleep(0.05)
        await conn.send(get("/c"))
        responses.append(await conn.read_response())
    finally:
        await conn.close()
    bodies = [r.rsplit(b"\r\n\r\n", 1)[1] for r in responses]
    assert bodies == [b"body a", b"body b", b"body c", b"body a", b"body c"]
    caches = [field(rb"\r\nX-Cache: ([^\r]+)", r) for r in responses]
    hit = f"HIT-{tier.upper()}".encode()
    assert caches == [hit, b"MISS", hit, hit, hit]
    if tier == "l1":
        # /a first and /c last came from the hit path; the two after /b from the full path.
        assert hit_path_count(proxy) == 2


async def test_idle_connection_is_closed_after_a_hit_path_answer(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    origin.set("/k", headers=CACHEABLE, size=10)
    proxy = await make_proxy(SQLITE_PATH="off", KEEPALIVE_TIMEOUT=0.5)
    await proxy.get("/k")
    loop = asyncio.get_running_loop()
    conn = await RawConnection.open(proxy.port)
    try:
        await asyncio.sleep(0.05)
        await conn.send(get("/k"))
        assert b"HIT-L1" in await conn.read_response()
        answered = loop.time()
        assert await conn.read_until_closed(timeout=5) == b""
        idle = loop.time() - answered
    finally:
        await conn.close()
    assert hit_path_count(proxy) == 1
    assert 0.4 <= idle < 3.0, idle


async def test_client_that_stops_reading_pipelined_hits_is_cut_off(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    # 1 MiB a response, 24 pipelined requests (fewer than aiohttp queues before it stops
    # reading), nothing read: the hit path must stop at the transport's high-water mark, and
    # the send timeout must cut the connection off, without the proxy ever holding 24 MiB.
    origin.set("/big", headers=CACHEABLE, size=1 << 20)
    proxy = await make_proxy(SQLITE_PATH="off", SEND_TIMEOUT=1, L1_MAX_BYTES=64 << 20)
    await proxy.get("/big")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", proxy.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        await asyncio.sleep(0.05)
        writer.write(get("/big") * 24)
        await asyncio.sleep(0.5)
        # Meanwhile another client is served at once.
        other = await one_response(proxy.port, get("/big"))
        assert b"HIT-L1" in other
        await asyncio.sleep(2.5)  # past the send timeout, still reading nothing
        received = b""
        with contextlib.suppress(ConnectionResetError):
            async with asyncio.timeout(10):
                while chunk := await reader.read(1 << 20):
                    received += chunk
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    answered = received.count(b"HTTP/1.1 200 OK\r\n")
    assert 1 <= answered < 24, answered  # cut off: kernel buffers held what it got
    # The hit path stopped once the transport's buffer was over its high-water mark (the
    # rest waited in the full path for a drain that never came): it never buffered 24 MiB.
    assert hit_path_count(proxy) <= 8, hit_path_count(proxy)  # some fit in kernel buffers


# ---- L2/L3 hits: the hit path awaits the lookup, then answers or hands over ---------------


def lookups(proxy: ProxyHandle, tier: str, outcome: str) -> float:
    value = proxy.state.metrics.registry.get_sample_value(
        "tierproxy_tier_lookups_total", {"tier": tier, "outcome": outcome}
    )
    return value or 0.0


@pytest.mark.parametrize("tier", ["l2", "l3"])
async def test_l2_and_l3_hits_answer_byte_for_byte_as_the_full_path(
    make_proxy: MakeProxy, raw_origin: CannedOrigin, redis_url: str, tier: str
) -> None:
    status_line, header_lines, body = STORED["repeated-and-utf8"]
    raw_origin.set("/lower", header_lines, body, status_line)
    env = {"ORIGIN": raw_origin.url, "L1_MAX_BYTES": 0}
    if tier == "l3":
        env["REDIS_URL"] = None
    writer = await make_proxy(**env)
    assert b"MISS" in await one_response(writer.port, get("/lower"))
    await writer.settle()
    request = get("/lower", b"X-Request-ID: same-id\r\n")
    fast = await make_proxy(**env)
    full = await make_proxy(**env, hit_path=False)
    answers = {}
    for label, proxy in (("fast", fast), ("full", full)):
        answers[label] = await one_response(proxy.port, request)
        expected = f"\r\nX-Cache: HIT-{tier.upper()}\r\n".encode()
        assert expected in answers[label], answers[label][:400]
    assert _mask_clock(answers["fast"]) == _mask_clock(answers["full"])
    assert (hit_path_count(fast), hit_path_count(full)) == (1, 0)
    assert lookups(fast, tier, "hit") == 1 == lookups(full, tier, "hit")
    assert raw_origin.count == 1


async def test_a_miss_is_handed_over_and_the_tiers_are_asked_once(
    make_proxy: MakeProxy, origin: Origin, redis_url: str
) -> None:
    origin.set("/m", headers=CACHEABLE, size=20)
    proxy = await make_proxy(L1_MAX_BYTES=0)
    response = await one_response(proxy.port, get("/m", b"X-Request-ID: handed-over\r\n"))
    assert b"\r\nX-Cache: MISS\r\n" in response
    assert b"\r\nX-Request-ID: handed-over\r\n" in response  # the full path kept its id
    assert origin.count("/m") == 1
    assert origin.requests_for("/m")[0].headers["X-Request-ID"] == "handed-over"
    assert (lookups(proxy, "l2", "miss"), lookups(proxy, "l3", "miss")) == (1, 1)
    assert hit_path_count(proxy) == 0
    await proxy.settle()
    hit = await one_response(proxy.port, get("/m"))
    assert b"\r\nX-Cache: HIT-L2\r\n" in hit and hit_path_count(proxy) == 1
    assert (lookups(proxy, "l2", "miss"), lookups(proxy, "l2", "hit")) == (1, 1)


async def test_frozen_redis_during_a_lookup_is_waited_out_once(
    make_proxy: MakeProxy,
    origin: Origin,
    redis_server: RedisServer,
    redis_url: str,
    sqlite_path: Path,
) -> None:
    origin.set("/f", headers=CACHEABLE, size=10)
    writer = await make_proxy(L1_MAX_BYTES=0)
    await past_purge_log_start(writer)  # so that the second proxy trusts its L3 copy
    await writer.get("/f")
    await writer.settle()
    proxy = await make_proxy(L1_MAX_BYTES=0, L2_TIMEOUT=0.2, BREAKER_FAILURES=100)
    loop = asyncio.get_running_loop()
    with redis_server.frozen():
        started = loop.time()
        hit = await one_response(proxy.port, get("/f"))  # L2 times out, L3 answers
        l3_elapsed = loop.time() - started
        started = loop.time()
        miss = await one_response(proxy.port, get("/never-cached"))  # handed over
        miss_elapsed = loop.time() - started
    assert b"\r\nX-Cache: HIT-L3\r\n" in hit and hit_path_count(proxy) == 1
    assert b"\r\nX-Cache: MISS\r\n" in miss
    assert lookups(proxy, "l2", "timeout") == 2  # one per request: never asked twice
    assert 0.15 <= l3_elapsed < 0.2 + 1.0, l3_elapsed
    assert 0.15 <= miss_elapsed < 0.2 + 1.0, miss_elapsed  # not two L2 budgets


async def test_sigterm_waits_for_a_lookup_in_flight(
    spawn_proxy: SpawnProxy, origin: Origin, redis_server: RedisServer, redis_url: str
) -> None:
    origin.set("/s", headers=CACHEABLE, size=10)
    proc = await spawn_proxy(L1_MAX_BYTES=0, L2_TIMEOUT=1.5, SQLITE_PATH="off")
    assert b"MISS" in await one_response(proc.port, get("/s"))
    with redis_server.frozen():
        conn = await RawConnection.open(proc.port)
        try:
            await asyncio.sleep(0.05)
            await conn.send(get("/never-cached"))  # its L2 lookup waits out 1.5 s
            await asyncio.sleep(0.3)
            proc.terminate()
            response = await conn.read_response(timeout=10)
        finally:
            await conn.close()
    assert response.startswith(b"HTTP/1.1 200 ") and b"\r\nX-Cache: MISS\r\n" in response
    assert await proc.wait(15) == 0, proc.stderr


async def test_idle_timer_spares_a_slow_lookup_and_applies_after_it(
    make_proxy: MakeProxy, origin: Origin, redis_server: RedisServer, redis_url: str
) -> None:
    # The L2 lookup (Redis frozen, 0.8 s budget) outlasts the 0.3 s keep-alive: the
    # connection is not idle meanwhile. After the answer, idleness closes it as usual.
    origin.set("/k", headers=CACHEABLE, size=10)
    writer = await make_proxy(L1_MAX_BYTES=0)
    await past_purge_log_start(writer)  # so that the second proxy trusts its L3 copy
    await writer.get("/k")
    await writer.settle()
    proxy = await make_proxy(
        L1_MAX_BYTES=0, L2_TIMEOUT=0.8, KEEPALIVE_TIMEOUT=0.3, BREAKER_FAILURES=100
    )
    loop = asyncio.get_running_loop()
    conn = await RawConnection.open(proxy.port)
    try:
        await asyncio.sleep(0.05)
        with redis_server.frozen():
            await conn.send(get("/k"))
            slow = await conn.read_response(timeout=5)  # L2 times out, L3 answers
        assert b"\r\nX-Cache: HIT-L3\r\n" in slow and hit_path_count(proxy) == 1
        await conn.send(get("/k"))  # the connection is still open, and served
        fast = await conn.read_response()
        answered = loop.time()
        assert b"\r\nX-Cache: HIT-L" in fast and hit_path_count(proxy) == 2
        assert await conn.read_until_closed(timeout=5) == b""
        idle = loop.time() - answered
    finally:
        await conn.close()
    assert 0.2 <= idle < 2.0, idle


async def test_a_hit_right_after_a_full_path_response_takes_the_hit_path(
    spawn_proxy: SpawnProxy, origin: Origin
) -> None:
    """A request that arrives after the full path's response went out, but before aiohttp's
    request loop has resumed to wait for the next one, is a request between requests: the
    hit path answers it. (It used to be queued for the full path, and the connection stayed
    on the full path as long as each request came before the loop resumed - under load,
    most of the time: a few per cent of L2 hits under wrk.)

    Each client alternates a HEAD (always the full path) with plain GETs sent the moment the
    previous response is read, over many connections at once so the proxy is busy; every
    plain GET must come back on the hit path."""
    origin.set("/h", headers=CACHEABLE, size=100)
    proc = await spawn_proxy(SQLITE_PATH="off", ACCESS_LOG="off")
    assert b"MISS" in await one_response(proc.port, get("/h"))
    assert b"HIT-L1" in await one_response(proc.port, get("/h"))
    before = await metric_value(proc.admin_url, "tierproxy_hit_path_responses_total")
    head = b"HEAD /h HTTP/1.1\r\nHost: proxy.test\r\n\r\n"
    plain = get("/h")
    rounds, gets_per_round, connections = 30, 3, 24

    async def client() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
        sent = 0
        try:
            for _ in range(rounds):
                writer.write(head)
                await reader.readuntil(b"\r\n\r\n")  # a HEAD answer: no body
                for _ in range(gets_per_round):
                    writer.write(plain)
                    response = await reader.readuntil(b"\r\n\r\n")
                    assert b" 200 " in response.split(b"\r\n", 1)[0], response[:100]
                    await reader.readexactly(100)
                    sent += 1
        finally:
            writer.close()
        return sent

    async with asyncio.timeout(60):
        sent = sum(await asyncio.gather(*(client() for _ in range(connections))))
    assert sent == rounds * gets_per_round * connections
    assert await metric_value(proc.admin_url, "tierproxy_hit_path_responses_total") - before == sent


async def test_the_first_request_of_a_new_connection_takes_the_hit_path(
    spawn_proxy: SpawnProxy, origin: Origin
) -> None:
    """A new connection's first request is a request between requests (none came before it,
    none is in progress), also when its bytes arrive before aiohttp's request loop has run
    for the first time - with uvloop, often in the same loop iteration as the connection.
    It used to be queued for the full path then: on main, 132 of 300 new connections' hits
    took the hit path (a client that opens a connection per request paid the full path's
    cost more often than not)."""
    origin.set("/n", headers=CACHEABLE, size=100)
    proc = await spawn_proxy(SQLITE_PATH="off", ACCESS_LOG="off")
    assert b"MISS" in await one_response(proc.port, get("/n"))
    before = await metric_value(proc.admin_url, "tierproxy_hit_path_responses_total")
    connections = 40

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
        try:
            writer.write(get("/n"))  # at once: the first bytes of the connection
            response = await reader.readuntil(b"\r\n\r\n")
            assert b" 200 " in response.split(b"\r\n", 1)[0], response[:100]
            assert b"X-Cache: HIT-L1" in response, response
            await reader.readexactly(100)
        finally:
            writer.close()

    async with asyncio.timeout(30):
        for _ in range(connections):
            await client()
    hit_path = await metric_value(proc.admin_url, "tierproxy_hit_path_responses_total") - before
    assert hit_path == connections


async def test_no_request_is_answered_after_a_response_that_closes(
    spawn_proxy: SpawnProxy, origin: Origin
) -> None:
    """A request body refused unread (413) closes the connection (RFC 9112 §9.6): a request
    sent after that body, once the 413 is out, is not answered - neither by the full path nor
    by the hit path, though it is a cached plain GET the hit path could answer."""
    origin.set("/c", headers=CACHEABLE, size=10)
    proc = await spawn_proxy(SQLITE_PATH="off", MAX_BODY_BYTES=100)
    assert b"MISS" in await one_response(proc.port, get("/c"))
    conn = await RawConnection.open(proc.port)
    try:
        await conn.send(
            b"POST /c HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10
        )
        refused = await conn.read_response()
        assert refused.startswith(b"HTTP/1.1 413 "), refused[:100]
        await conn.send(b"x" * 990 + get("/c"))
        rest = await conn.read_until_closed(timeout=5)
    finally:
        await conn.close()
    assert rest == b"", rest[:200]


async def test_a_body_that_ends_with_the_connection_ends_it(
    spawn_proxy: SpawnProxy, origin: Origin
) -> None:
    """An HTTP/1.0 request (even with ``Connection: keep-alive``) whose response has no known
    length gets a body that ends when the connection closes (RFC 9112 §6.3): the proxy closes
    it after the body. (aiohttp 3.14 drops the keep-alive header then but keeps the connection
    open, so such a client waited out the keep-alive timeout; and a request sent after the
    body was answered, its response read as the end of that body.)"""
    # Over the largest entry: relayed as it streams in, so its length is not known up front.
    origin.set("/stream", chunked=True, size=20_000)
    origin.set("/hot", headers=CACHEABLE, size=100)
    proc = await spawn_proxy(SQLITE_PATH="off", MAX_ENTRY_BYTES=4096)
    assert b"MISS" in await one_response(proc.port, get("/hot"))
    conn = await RawConnection.open(proc.port)
    try:
        await conn.send(
            b"GET /stream HTTP/1.0\r\nHost: proxy.test\r\nConnection: keep-alive\r\n\r\n"
        )
        head = await conn.reader.readuntil(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n", 1)[0], head
        assert b"content-length:" not in head.lower() and b"chunked" not in head.lower(), head
        await conn.reader.readexactly(20_000)
        await conn.send(get("/hot"))
        rest = await conn.read_until_closed(timeout=3)
    finally:
        await conn.close()
    assert rest == b"", rest[:200]


@pytest.mark.parametrize("tier", ["l2", "l3"])
async def test_l2_and_l3_hits_start_no_task_of_their_own(
    make_proxy: MakeProxy, origin: Origin, redis_url: str, tier: str
) -> None:
    """A hit-path lookup past L1 is callbacks on the tier's reply and one timer per tier, not
    a task per request (a task and its coroutines cost more than the rest of an L2 hit's
    Python work); the answers are still the tier's hits, and the tier still backfills."""
    origin.set("/t", headers=CACHEABLE, size=100)
    env: dict[str, Any] = {"L1_MAX_BYTES": 0}
    if tier == "l3":
        env["REDIS_URL"] = None
    proxy = await make_proxy(**env)
    assert b"MISS" in await one_response(proxy.port, get("/t"))
    await proxy.settle()
    loop = asyncio.get_running_loop()
    started: list[str] = []
    default_factory = loop.get_task_factory()

    def counting_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        code = getattr(coro, "cr_code", None)
        where = code.co_filename if code is not None else ""
        started.append(f"{getattr(coro, '__qualname__', repr(coro))} ({where})")
        if default_factory is not None:
            return default_factory(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    conns = [await RawConnection.open(proxy.port) for _ in range(8)]
    try:
        await asyncio.sleep(0.05)  # the connections are idle, between requests
        loop.set_task_factory(counting_factory)
        try:
            for _ in range(5):
                for conn in conns:
                    await conn.send(get("/t"))
                for conn in conns:
                    response = await conn.read_response()
                    assert f"\r\nX-Cache: HIT-{tier.upper()}\r\n".encode() in response
        finally:
            loop.set_task_factory(default_factory)
    finally:
        for conn in conns:
            await conn.close()
    assert hit_path_count(proxy) == 40
    assert lookups(proxy, tier, "hit") == 40
    # The test's own reads and writes may start tasks; the proxy starts none for these hits.
    package = str(Path(tierproxy.__file__).parent)
    assert [name for name in started if package in name] == [], started
    assert origin.count("/t") == 1


async def test_a_restarted_redis_is_reconnected_by_the_hit_paths_own_lookups(
    make_proxy: MakeProxy, origin: Origin, redis_server: RedisServer, redis_url: str
) -> None:
    """While the pipelined L2 connection is down, a hit-path lookup cannot go on it at once:
    it is awaited (and reconnects) like the full path's, a miss rather than an error, and L2
    hits come back on the hit path."""
    origin.set("/r", headers=CACHEABLE, size=50)
    proxy = await make_proxy(L1_MAX_BYTES=0, SQLITE_PATH="off")
    assert b"MISS" in await one_response(proxy.port, get("/r"))
    await proxy.settle()
    assert b"\r\nX-Cache: HIT-L2\r\n" in await one_response(proxy.port, get("/r"))
    redis_server.restart()  # empty again: nothing persisted
    errors_before = lookups(proxy, "l2", "error")
    assert b"\r\nX-Cache: MISS\r\n" in await one_response(proxy.port, get("/r"))
    # The lookup reconnected: a miss, not an error (nothing was sent on the dead connection).
    assert lookups(proxy, "l2", "error") == errors_before == 0
    assert lookups(proxy, "l2", "timeout") == 0
    assert lookups(proxy, "l2", "miss") == 2  # the first request, and this one
    # L2 takes writes again once this replica's purge lease is renewed on the new Redis.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:
        await proxy.settle()
        before = hit_path_count(proxy)
        response = await one_response(proxy.port, get("/r"))
        if b"\r\nX-Cache: HIT-L2\r\n" in response:
            break
        assert loop.time() < deadline, response[:300]
        await asyncio.sleep(0.2)
    assert hit_path_count(proxy) == before + 1
    assert lookups(proxy, "l2", "error") == 0
