"""Issue 4, line 9: exhaustion.

Memory and storage stay bounded whatever the URLs; over-long input is refused with 414 / 431 /
413 before it costs anything; a client that trickles its request head or body is cut off
without slowing anyone else; large or unbounded responses are streamed, never held whole.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from support.fixture_types import MakeProxy, SpawnProxy
from support.origin import Origin
from support.proxy import Fetched, ProxyHandle
from support.wait import wait_for_condition

from .helpers import (
    FastOrigin,
    RawConnection,
    first_response,
    pipelined_gets,
    raw_exchange,
    status_of,
)

UNIQUE_URLS = 10_000


@pytest.mark.slow
async def test_ten_thousand_unique_query_strings_keep_l1_bounded_and_every_redis_key_expires(
    make_proxy: MakeProxy, redis_client: Any
) -> None:
    l1_max = 200_000
    fast_origin = await FastOrigin().start()
    try:
        proxy = await make_proxy(
            ORIGIN=fast_origin.url,
            L1_MAX_BYTES=l1_max,
            SQLITE_PATH="off",
            BACKFILL_MAX_TASKS=1024,
            ACCESS_LOG="off",
        )
        l1 = proxy.state.tiers[0].backend
        assert l1.name == "l1"
        high_water = 0

        async def watch_l1() -> None:
            nonlocal high_water
            while True:
                high_water = max(high_water, l1.bytes)
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch_l1())
        targets = [f"/search?q={i}&cb={i * 7919}" for i in range(UNIQUE_URLS)]
        try:
            per_connection = await asyncio.gather(
                *(pipelined_gets(proxy.port, targets[j::16]) for j in range(16))
            )
        finally:
            watcher.cancel()
        await proxy.settle(timeout=20)
        assert fast_origin.count == UNIQUE_URLS
    finally:
        await fast_origin.close()

    assert {status for statuses in per_connection for status in statuses} == {200}
    assert high_water <= l1_max and l1.bytes <= l1_max, (high_water, l1.bytes)
    assert 0 < len(l1) < UNIQUE_URLS  # older entries were evicted, not kept
    # Independent recount: what L1 holds really is within the bound.
    assert sum(entry.size for entry in l1._entries.values()) <= l1_max
    # Every key the proxy wrote to Redis - entries and anything else - expires by itself.
    keys = list(redis_client.scan_iter(count=1000))
    with redis_client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.pttl(key)
        ttls = pipe.execute()
    without_ttl = [key for key, ttl in zip(keys, ttls, strict=True) if ttl is None or ttl < 0]
    assert len(keys) > 5_000  # (a backfill may be dropped when the task bound is reached)
    assert not without_ttl, without_ttl[:5]


# -- request limits -------------------------------------------------------------------------


def _get(target: bytes, extra: bytes = b"") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + extra + b"Connection: close\r\n\r\n"


async def test_an_over_long_request_target_is_refused_with_414(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(MAX_URL_BYTES=1024)

    at_limit = await raw_exchange(proxy.port, _get(b"/" + b"a" * 1023))
    over_path = await raw_exchange(proxy.port, _get(b"/" + b"a" * 1024))
    over_query = await raw_exchange(proxy.port, _get(b"/q?" + b"x=1&" * 5000))
    over_absolute = await raw_exchange(proxy.port, _get(b"http://h/" + b"a" * 2000))

    assert status_of(at_limit) == 200, at_limit[:200]
    for response in (over_path, over_query, over_absolute):
        assert status_of(response) == 414, response[:200]
    assert [r.path_qs for r in origin.requests] == ["/" + "a" * 1023]


async def test_the_default_target_limit_is_8192_bytes(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy()

    at_limit = await raw_exchange(proxy.port, _get(b"/" + b"b" * 8191))
    too_long = await raw_exchange(proxy.port, _get(b"/" + b"b" * 8192))

    # The proxy forwards the 8192-byte target (the test origin, aiohttp with its own default
    # of 8190, then refuses it; that is the origin's business) and refuses one byte more.
    assert status_of(at_limit) != 414
    assert b"fwd-status=400" in at_limit, at_limit[:500]  # it was the origin's answer
    assert status_of(too_long) == 414


async def test_over_long_or_too_many_header_lines_are_refused_with_431(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(MAX_HEADER_BYTES=1024, MAX_HEADERS=20)
    # A value of exactly 1024 bytes is allowed; one more byte is not.
    at_limit = await raw_exchange(proxy.port, _get(b"/h1", b"X-Big: " + b"v" * 1024 + b"\r\n"))
    over = await raw_exchange(proxy.port, _get(b"/h2", b"X-Big: " + b"v" * 1025 + b"\r\n"))
    long_name = await raw_exchange(proxy.port, _get(b"/h3", b"X-" + b"n" * 1100 + b": v\r\n"))
    many = await raw_exchange(
        proxy.port, _get(b"/h4", b"".join(b"X-%d: v\r\n" % i for i in range(25)))
    )

    assert status_of(at_limit) == 200, at_limit[:200]
    for response in (over, long_name, many):
        assert status_of(response) == 431, response[:200]
    assert [r.path for r in origin.requests] == ["/h1"]


async def test_the_default_header_limits_refuse_a_huge_header_and_header_floods(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy()

    huge = await raw_exchange(proxy.port, _get(b"/h", b"Cookie: " + b"c" * 9000 + b"\r\n"))
    flood = await raw_exchange(
        proxy.port, _get(b"/h", b"".join(b"X-%d: v\r\n" % i for i in range(150)))
    )

    assert (status_of(huge), status_of(flood)) == (431, 431)
    assert origin.count() == 0


async def test_request_bodies_over_the_cap_are_refused_with_413(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(MAX_BODY_BYTES=1000)

    by_length = await first_response(
        proxy.port,
        b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n" + b"x" * 1001,
    )
    # A declared length over the cap is refused before a byte of the body is read.
    announced_only = await first_response(
        proxy.port, b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n"
    )
    chunked = await first_response(
        proxy.port,
        b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"200\r\n"
        + b"y" * 512
        + b"\r\n"
        + b"200\r\n"
        + b"y" * 512
        + b"\r\n0\r\n\r\n",
    )
    fat_get = await first_response(
        proxy.port, b"GET /up HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n" + b"z" * 2000
    )
    at_cap = await proxy.request("POST", "/up", data=b"x" * 1000)

    for response in (by_length, announced_only, chunked, fat_get):
        assert status_of(response) == 413, response[:200]
        assert b"Connection: close" in response  # the rest of the body is never read as a request
    assert at_cap.status == 200, at_cap
    assert [len(r.body) for r in origin.requests] == [1000]


# -- slow clients ----------------------------------------------------------------------------


async def test_a_slowloris_head_is_cut_off_without_blocking_other_clients(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(HEADER_TIMEOUT=0.5)
    loop = asyncio.get_running_loop()
    slow = await RawConnection.open(proxy.port)
    started = loop.time()
    await slow.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n")

    async def trickle() -> None:  # a header line every 0.1 s, as slowloris does (at most 4 s)
        for i in range(40):
            await asyncio.sleep(0.1)
            try:
                await slow.send(b"X-Trickle-%d: 1\r\n" % i)
            except OSError:
                return

    answer_task = asyncio.create_task(slow.read_until_closed(timeout=4))
    trickler = asyncio.create_task(trickle())
    others: list[float] = []
    try:
        for i in range(80):  # meanwhile, other clients are served as usual
            if answer_task.done():
                break
            before = loop.time()
            response = await proxy.get(f"/other?{i}")
            others.append(loop.time() - before)
            assert response.status == 200
            await asyncio.sleep(0.05)
        answer = await answer_task
        closed_after = loop.time() - started
    finally:
        trickler.cancel()
        await asyncio.gather(trickler, return_exceptions=True)
        await slow.close()

    assert status_of(answer) == 408, answer
    assert 0.4 <= closed_after < 1.5, closed_after
    assert others and max(others) < 0.5, others  # nobody waited on the slow client
    assert origin.count("/slow") == 0


async def test_a_client_that_connects_and_says_nothing_is_cut_off(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(HEADER_TIMEOUT=0.3)
    conn = await RawConnection.open(proxy.port)
    try:
        answer = await conn.read_until_closed(timeout=3)
    finally:
        await conn.close()
    assert status_of(answer) == 408, answer


async def test_an_idle_keep_alive_connection_is_not_cut_by_the_head_timer(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """Between requests the connection is idle, not slow: only the keep-alive timeout applies."""
    proxy = await make_proxy(HEADER_TIMEOUT=0.3, KEEPALIVE_TIMEOUT=1.5)
    loop = asyncio.get_running_loop()
    conn = await RawConnection.open(proxy.port)
    try:
        await conn.send(b"GET /ka HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await conn.read_response()
        assert status_of(first) == 200
        idle_since = loop.time()
        await asyncio.sleep(0.8)  # well past the head timeout
        await conn.send(b"GET /ka2 HTTP/1.1\r\nHost: x\r\n\r\n")
        second = await conn.read_response()
        assert status_of(second) == 200, second
        idle_since = loop.time()
        rest = await conn.read_until_closed(timeout=5)  # now the keep-alive timeout closes it
        closed_after = loop.time() - idle_since
    finally:
        await conn.close()
    assert b"408" not in rest
    assert 1.0 <= closed_after < 4.0, closed_after
    assert [r.path for r in origin.requests] == ["/ka", "/ka2"]


async def test_a_trickled_body_is_cut_off_by_the_body_timeout(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(BODY_TIMEOUT=0.5)
    conn = await RawConnection.open(proxy.port)
    loop = asyncio.get_running_loop()
    try:
        await conn.send(b"POST /slow-body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123")
        started = loop.time()
        answer = await conn.read_response(timeout=5)
        elapsed = loop.time() - started
    finally:
        await conn.close()
    assert status_of(answer) == 408, answer
    assert elapsed < 2.0
    assert origin.count() == 0


async def test_the_cli_listener_has_the_same_limits(
    origin: Origin, spawn_proxy: SpawnProxy
) -> None:
    """`tierproxy serve` runs the hardened listener (not only this suite's fixture)."""
    proxy = await spawn_proxy(HEADER_TIMEOUT=0.5, MAX_URL_BYTES=1024, SQLITE_PATH="off")

    too_long = await raw_exchange(proxy.port, _get(b"/" + b"a" * 2000))
    too_big = await raw_exchange(proxy.port, _get(b"/h", b"X-A: " + b"a" * 9000 + b"\r\n"))
    conn = await RawConnection.open(proxy.port)
    try:
        await conn.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
        slow = await conn.read_until_closed(timeout=3)
    finally:
        await conn.close()

    assert (status_of(too_long), status_of(too_big), status_of(slow)) == (414, 431, 408)
    assert origin.count() == 0


async def test_a_client_that_stops_reading_cannot_hold_origin_connections(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """Slow read: clients that ask for a streamed response and never read it.

    Each holds a pooled origin connection while its response waits; as many of them as the
    pool has connections would stop every cache miss. The send timeout cuts them off.
    """
    origin.set("/big", size=30_000_000, chunked=True)
    proxy = await make_proxy(
        MAX_ENTRY_BYTES=65536, ORIGIN_MAX_CONNECTIONS=2, ORIGIN_TIMEOUT=1.0, SEND_TIMEOUT=0.5
    )
    loop = asyncio.get_running_loop()
    stalled = [await RawConnection.open(proxy.port) for _ in range(2)]
    try:
        for i, conn in enumerate(stalled):
            await conn.send(b"GET /big?%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
        await wait_for_condition(lambda: origin.count("/big") == 2, timeout=5)
        # Both pooled connections are now streaming to clients that read nothing; once the
        # send timeout has cut those clients off, the pool serves everyone else again.
        started = loop.time()
        other = await wait_for_condition(_fetch_ok(proxy, "/small"), timeout=10, interval=0.1)
        served_after = loop.time() - started
        # One freed connection is enough for /small: the other stalled client may not be cut
        # off yet, and reading from it now would resume its stream. Both are cut first.
        registry = proxy.state.metrics.registry
        await wait_for_condition(
            lambda: (
                registry.get_sample_value(
                    "tierproxy_streams_cut_total", {"reason": "client-stalled"}
                )
                == 2
            ),
            timeout=5,
            message="both stalled clients cut off",
        )
        received = [len(await conn.read_until_closed(timeout=5)) for conn in stalled]
    finally:
        for conn in stalled:
            await conn.close()

    assert other is not None and other.x_cache == "MISS", other
    assert served_after < 4.0, served_after
    assert all(n < 30_000_000 for n in received), received  # cut off, not served in full


def _fetch_ok(proxy: ProxyHandle, path: str) -> Callable[[], Awaitable[Fetched | None]]:
    async def fetch() -> Fetched | None:
        response = await proxy.get(path, timeout=3)
        return response if response.status == 200 else None

    return fetch


# -- CPU: the key normaliser on hostile targets ---------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/" + "a" * 40 + "%20",
        "/" + "a/" * 30 + "|",
        "/" + "a" * 60 + "?q=%41",
        "/x" * 40 + "/./%",
    ],
    ids=[
        "long-segment-then-escape",
        "many-segments-then-bad-char",
        "path-then-escaped-query",
        "dot-segment-then-escape",
    ],
)
async def test_key_normalisation_stays_linear_on_adversarial_targets(
    target: str, origin: Origin, make_proxy: MakeProxy
) -> None:
    """A regex that backtracks exponentially on client bytes would freeze every client."""
    from tierproxy.keys import BadTarget, normalise_target

    long_form = target.replace("a", "a" * 300) if len(target) < 1000 else target
    started = time.perf_counter()
    try:
        normalise_target(long_form)
    except BadTarget:
        pass
    assert time.perf_counter() - started < 0.05

    proxy = await make_proxy()
    loop = asyncio.get_running_loop()
    before = loop.time()
    response = await raw_exchange(proxy.port, _get(target.encode()), timeout=3)
    assert status_of(response) in (200, 400), response[:200]
    assert loop.time() - before < 1.0


# -- large responses are streamed -------------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False], ids=["no-length", "length-over-entry-cap"])
async def test_large_responses_are_streamed_not_buffered(
    chunked: bool, origin: Origin, make_proxy: MakeProxy
) -> None:
    size, first_part = 4_000_000, 1_000_000
    origin.set("/big", size=size, chunked=chunked, pause_after=first_part, chunk_size=65536)
    proxy = await make_proxy(MAX_ENTRY_BYTES=65536)

    async with proxy.client.get("/big") as response:
        assert response.status == 200
        received = bytearray()
        # The origin has sent only its first part and is paused: the client must already
        # have (most of) it, so the proxy is passing bytes on as they come.
        async with asyncio.timeout(5):
            while len(received) < first_part // 2:
                chunk = await response.content.readany()
                assert chunk, "body ended early"
                received += chunk
        assert len(received) < size
        origin.release()
        async with asyncio.timeout(10):
            received += await response.content.read()
    assert bytes(received) == origin.body_for("/big")
    assert response.headers.get("X-Cache") == "BYPASS"
    await proxy.settle()
    await wait_for_condition(lambda: proxy.state.tiers[0].backend.bytes == 0, timeout=1)
