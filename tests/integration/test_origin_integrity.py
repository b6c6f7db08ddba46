"""Origin framing and origin-connection use: bytes are never attributed to the wrong response,
a body cut short is never complete, stalled clients don't starve the origin pool, waiting
for an origin connection is not an origin failure, and local bugs are not origin failures.

Byte-level faults come from a raw ``asyncio.start_server`` origin (support.raworigin).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from support.clock import SteppedClock
from support.fixture_types import MakeProxy
from support.origin import Origin, make_body
from support.proxy import Fetched, ProxyHandle
from support.raworigin import Exchange, RawOrigin, head, response
from support.wait import wait_for_condition

CACHEABLE = {"Cache-Control": "max-age=300", "Content-Type": "application/octet-stream"}


@pytest.fixture
async def raw_origin() -> AsyncIterator[RawOrigin]:
    server = await RawOrigin().start()
    try:
        yield server
    finally:
        await server.close()


def _metric(proxy: ProxyHandle, name: str, **labels: str) -> float:
    value = proxy.state.metrics.registry.get_sample_value(name, labels)
    return float(value or 0.0)


# -- §1 a stray response on an idle keep-alive connection ------------------------------------


async def test_stray_response_on_an_idle_connection_is_never_taken_for_the_next_answer(
    raw_origin: RawOrigin, make_proxy: MakeProxy, redis_url: str, sqlite_path: Path
) -> None:
    send_stray, stray_sent = asyncio.Event(), asyncio.Event()

    async def answer_then_stray(exchange: Exchange) -> bool:
        exchange.write(response(b"body of /a", CACHEABLE))
        await exchange.wait_sent()
        # Once the proxy has read that answer and pooled the connection: an unsolicited
        # response, with no request outstanding on the connection.
        async with asyncio.timeout(5):
            await send_stray.wait()
        exchange.write(response(b"STRAY BYTES", CACHEABLE))
        await exchange.wait_sent()
        stray_sent.set()
        return True  # and keep the connection open for the proxy to reuse

    raw_origin.route("/a", answer_then_stray)
    proxy = await make_proxy(ORIGIN=raw_origin.url)

    first = await proxy.get("/a")
    assert (first.status, first.body) == (200, b"body of /a"), first
    send_stray.set()
    async with asyncio.timeout(5):
        await stray_sent.wait()

    second = await proxy.get("/b")
    assert second.status == 200, second
    assert second.body == b"raw origin body for /b", second
    assert raw_origin.count("/b") == 1
    assert raw_origin.connections == 2  # the tainted connection was not reused
    discarded = sum(
        _metric(proxy, "tierproxy_origin_connections_discarded_total", reason=reason)
        for reason in ("unsolicited-bytes", "unread-before-reuse")
    )
    assert discarded == 1

    # What was stored for /b is /b's body, in every tier (a fresh proxy: empty L1).
    await proxy.settle()
    assert (await proxy.get("/b")).body == b"raw origin body for /b"
    other = await make_proxy(ORIGIN=raw_origin.url)
    again = await other.get("/b")
    assert again.x_cache in ("HIT-L2", "HIT-L3"), again
    assert again.body == b"raw origin body for /b"


# -- §1 a close-delimited body cut short by a reset ------------------------------------------


def _cut_after(size: int) -> tuple[bytes, Callable[[Exchange], Awaitable[bool]]]:
    body = make_body(size, 7)

    async def cut(exchange: Exchange) -> bool:
        # No Content-Length, not chunked: the body is delimited by the connection's close
        # (RFC 9112 §6.3 item 8), so only a clean close may end it.
        exchange.write(head(200, CACHEABLE) + body[: size // 2])
        await exchange.wait_sent()
        exchange.reset()
        return False

    return body, cut


async def _assert_nothing_stored(
    proxy: ProxyHandle, make_proxy: MakeProxy, raw_origin: RawOrigin, path: str, asked: int
) -> None:
    """A later request goes to the origin again, from this proxy (L1) and from a fresh one
    sharing its Redis and SQLite (L2, L3)."""
    await proxy.settle()
    with contextlib.suppress(aiohttp.ClientError):
        await proxy.get(path)
    assert raw_origin.count(path) == asked + 1
    other = await make_proxy(ORIGIN=raw_origin.url)
    with contextlib.suppress(aiohttp.ClientError):
        await other.get(path)
    assert raw_origin.count(path) == asked + 2


async def test_buffered_close_delimited_body_cut_by_a_reset_is_a_502_and_not_stored(
    raw_origin: RawOrigin, make_proxy: MakeProxy, redis_url: str, sqlite_path: Path
) -> None:
    _body, cut = _cut_after(40_000)
    raw_origin.route("/cut", cut)
    proxy = await make_proxy(ORIGIN=raw_origin.url)

    # Coalesced waiters get the failure, never the short body.
    answers = await asyncio.gather(*(proxy.get("/cut") for _ in range(5)))
    for answer in answers:
        assert answer.status == 502, answer
        assert answer.x_cache == "MISS", answer

    await _assert_nothing_stored(proxy, make_proxy, raw_origin, "/cut", raw_origin.count("/cut"))


async def test_streamed_close_delimited_body_cut_by_a_reset_aborts_the_client(
    raw_origin: RawOrigin, make_proxy: MakeProxy, redis_url: str, sqlite_path: Path
) -> None:
    _body, cut = _cut_after(600_000)
    raw_origin.route("/cut", cut)
    proxy = await make_proxy(ORIGIN=raw_origin.url, MAX_ENTRY_BYTES=65_536)

    received = bytearray()
    with pytest.raises(aiohttp.ClientPayloadError):
        async with asyncio.timeout(10):
            async with proxy.client.get("/cut") as resp:
                assert resp.status == 200  # headers went before the body broke off
                async for chunk in resp.content.iter_any():
                    received += chunk
    assert len(received) < 600_000
    assert _metric(proxy, "tierproxy_streams_cut_total", reason="origin-error") == 1

    await _assert_nothing_stored(proxy, make_proxy, raw_origin, "/cut", 1)


@pytest.mark.parametrize("size", [40_000, 600_000], ids=["buffered", "streamed"])
async def test_close_delimited_body_ended_by_a_clean_close_is_complete(
    size: int, raw_origin: RawOrigin, make_proxy: MakeProxy
) -> None:
    body = make_body(size, 9)

    async def clean(exchange: Exchange) -> bool:
        exchange.write(head(200, CACHEABLE) + body)
        await exchange.drain()
        return False  # FIN after the last byte: the body is complete

    raw_origin.route("/whole", clean)
    proxy = await make_proxy(
        ORIGIN=raw_origin.url, MAX_ENTRY_BYTES=65_536 if size > 65_536 else 8_388_608
    )

    first = await proxy.get("/whole")
    assert first.status == 200 and first.body == body, first
    second = await proxy.get("/whole")
    assert second.body == body
    if size <= 65_536:
        assert second.x_cache == "HIT-L1", second


# -- §5 stalled pass-through clients, origin connection queue --------------------------------


def _stalled_client(port: int, path: str) -> socket.socket:
    """A client that asks for ``path`` and never reads (a tiny receive buffer, so the proxy's
    writes back up quickly)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


async def test_stalled_pass_through_clients_neither_starve_misses_nor_open_the_origin_breaker(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    send_timeout, origin_timeout = 3.0, 1.0
    proxy = await make_proxy(
        ORIGIN_MAX_CONNECTIONS=4,
        SEND_TIMEOUT=send_timeout,
        ORIGIN_TIMEOUT=origin_timeout,
        REQUEST_DEADLINE=2.0,
        MAX_ENTRY_BYTES=65_536,
        BREAKER_FAILURES=3,
        REDIS_URL=None,
        SQLITE_PATH="off",
    )
    for i in range(6):
        origin.set(f"/big{i}", size=16_000_000, chunked=True, headers=CACHEABLE)
    stalled = [_stalled_client(proxy.port, f"/big{i}") for i in range(6)]
    try:
        # Four take every origin connection; two wait for one.
        await wait_for_condition(
            lambda: sum(origin.count(f"/big{i}") for i in range(6)) >= 4,
            timeout=5,
            message="four stalled clients to hold the four origin connections",
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        answers = []
        for i in range(200):  # bounded: a miss every ~0.1-0.5 s until one succeeds
            answer = await proxy.get(f"/miss{i}")
            answers.append(answer)
            if answer.status == 200:
                break
            assert loop.time() - started < send_timeout + 5, answers
        statuses = [a.status for a in answers]
        assert statuses[-1] == 200, answers
        for answer in answers[:-1]:
            # While the pool is full: 503 + Retry-After, "origin-busy"; never 504/502.
            assert answer.status == 503, answers
            assert answer.headers.get("Retry-After") == "1", answer
            assert b"origin connection pool is busy" in answer.body, answer
            assert answer.cache_status is not None, answer
            assert answer.cache_status.detail == "origin-busy", answer
        assert len(answers) > 1, "the pool was never full: the test proves nothing"
        breaker = proxy.state.readthrough.origin_breaker
        assert breaker.failures == 0 and breaker.state() == "closed"
        assert _metric(proxy, "tierproxy_origin_busy_total") >= len(answers) - 1
        assert _metric(proxy, "tierproxy_origin_fetches_total", outcome="timeout") == 0
        # The stalled clients were cut off (send timeout), releasing their connections.
        await wait_for_condition(
            lambda: (
                sum(
                    _metric(proxy, "tierproxy_streams_cut_total", reason=reason)
                    for reason in ("client-stalled", "client-gone")
                )
                >= 4
            ),
            timeout=send_timeout + 5,
            message="the stalled clients to be cut off",
        )
    finally:
        for sock in stalled:
            sock.close()


async def test_waiting_for_a_free_origin_connection_is_not_origin_time(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    # One origin connection; /first holds it for 1.2 s, /second queues behind it, then its
    # origin answers in 0.6 s: 1.8 s in all, but only 0.6 s of it is origin time (< 1.5 s).
    proxy = await make_proxy(
        ORIGIN_MAX_CONNECTIONS=1,
        ORIGIN_TIMEOUT=1.5,
        ORIGIN_QUEUE_TIMEOUT=3.0,
        REQUEST_DEADLINE=5.0,
        REDIS_URL=None,
        SQLITE_PATH="off",
    )
    origin.set("/first", latency=1.2)
    origin.set("/second", latency=0.6)
    first = asyncio.create_task(proxy.get("/first"))
    await wait_for_condition(lambda: origin.count("/first") == 1, timeout=5)
    second = await proxy.get("/second")
    assert second.status == 200 and second.x_cache == "MISS", second
    assert second.elapsed > 1.5, second  # it did wait for the connection
    assert (await asyncio.wait_for(first, 10)).status == 200
    assert proxy.state.readthrough.origin_breaker.failures == 0


async def test_stale_copy_is_served_when_no_origin_connection_comes_free(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    clock = SteppedClock()
    proxy = await make_proxy(
        ORIGIN_MAX_CONNECTIONS=1,
        ORIGIN_TIMEOUT=5.0,
        REQUEST_DEADLINE=6.0,
        ORIGIN_QUEUE_TIMEOUT=0.3,
        REDIS_URL=None,
        SQLITE_PATH="off",
        clock=clock,
    )
    origin.set("/s", headers={"Cache-Control": "max-age=1"})
    first = await proxy.get("/s")
    assert first.x_cache == "MISS"
    clock.advance_to(_date_of(first) + 2.2)  # past max-age=1, whole-second Date
    origin.set("/hold", hang=True)
    holder = asyncio.create_task(proxy.get("/hold"))
    try:
        await wait_for_condition(lambda: origin.count("/hold") == 1, timeout=5)
        stale = await proxy.get("/s")
        assert stale.status == 200 and stale.x_cache == "STALE-L1", stale
        assert stale.cache_status is not None, stale
        assert stale.cache_status.detail == "origin-busy", stale
        assert stale.elapsed < 2.0, stale
        assert proxy.state.readthrough.origin_breaker.failures == 0
    finally:
        origin.release()
        await asyncio.wait_for(holder, 10)


def _date_of(fetched: Fetched) -> float:
    """When a response was generated, from its Date header (whole seconds)."""
    return email.utils.parsedate_to_datetime(fetched.headers["Date"]).timestamp()


async def test_streamed_pass_through_has_an_overall_deadline(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    # Every chunk comes well within the origin timeout, but the whole body would take ~6 s.
    origin.set(
        "/slow",
        size=2_000_000,
        chunked=True,
        chunk_size=16_384,
        chunk_delay=0.05,
        headers=CACHEABLE,
    )
    proxy = await make_proxy(
        MAX_ENTRY_BYTES=65_536,
        STREAM_TIMEOUT=1.0,
        ORIGIN_TIMEOUT=2.0,
        REDIS_URL=None,
        SQLITE_PATH="off",
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(aiohttp.ClientPayloadError):
        async with asyncio.timeout(10):
            async with proxy.client.get("/slow") as resp:
                assert resp.status == 200
                await resp.read()
    assert loop.time() - started < 4.0
    assert _metric(proxy, "tierproxy_streams_cut_total", reason="stream-timeout") == 1


# -- §10 a local error is not an origin failure ----------------------------------------------


async def test_a_local_error_is_a_500_and_never_counted_against_the_origin(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """No client input reaches this (aiohttp's parser refuses control characters with 400),
    so a request built in-process stands for a bug in tierproxy's own header composition:
    aiohttp's writer raises ValueError for the control character while sending it."""
    from tierproxy.readthrough import Failed, ProxyRequest

    proxy = await make_proxy(BREAKER_FAILURES=1, REDIS_URL=None, SQLITE_PATH="off")
    readthrough = proxy.state.readthrough
    loop = asyncio.get_running_loop()

    def request(path: str, value: str, method: str = "GET") -> ProxyRequest:
        return ProxyRequest(
            method=method,
            key=proxy.state.keys.key(path),
            headers=CIMultiDictProxy(CIMultiDict({"X-Note": value})),
            peer="127.0.0.1",
            scheme="http",
            deadline=loop.time() + 3,
        )

    for method in ("GET", "POST"):
        req = request(f"/local-{method}", "bad\x01value", method)
        result = await readthrough.get(req) if method == "GET" else await readthrough.forward(req)
        assert isinstance(result, Failed), result
        assert (result.status, result.reason) == (500, "local-error"), result
    assert readthrough.origin_breaker.failures == 0
    assert readthrough.origin_breaker.state() == "closed"
    assert _metric(proxy, "tierproxy_origin_fetches_total", outcome="error") == 0
    assert _metric(proxy, "tierproxy_local_errors_total", where="origin-fetch") == 2
    assert origin.count("/local-GET") == 0  # nothing was sent

    # The same request with a clean header reaches the origin.
    ok = await readthrough.get(request("/local-GET", "fine"))
    assert ok.entry.status == 200
