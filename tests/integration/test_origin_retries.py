"""Origin retries (TIERPROXY_ORIGIN_RETRIES) and per-key backoff.

A GET/HEAD whose origin connection failed before any response byte is retried after a
jittered pause, while the request deadline leaves time; never a timeout, a 5xx, a partial
answer or a method that may not be repeated. While the origin keeps failing for one key, the
stale copy is served and the origin asked for that key at most once per backoff interval.
Connection faults come from a raw-socket origin (support.raworigin).
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections.abc import AsyncIterator

import pytest
from support.clock import SteppedClock
from support.fixture_types import MakeProxy
from support.net import refused_url
from support.origin import Origin
from support.proxy import ProxyHandle
from support.raworigin import Exchange, RawOrigin, response

CACHEABLE = {"Cache-Control": "max-age=60"}
SLACK = 0.5


@pytest.fixture
async def raw_origin() -> AsyncIterator[RawOrigin]:
    server = await RawOrigin().start()
    try:
        yield server
    finally:
        await server.close()


def _retries(proxy: ProxyHandle, outcome: str) -> float:
    value = proxy.state.metrics.registry.get_sample_value(
        "tierproxy_origin_retries_total", {"outcome": outcome}
    )
    return float(value or 0.0)


async def _reset_first_connection(exchange: Exchange) -> bool:
    if exchange.connection == 1:
        exchange.reset()
        return False
    exchange.write(response(b"second connection", CACHEABLE))
    return True


async def _close_first_connection(exchange: Exchange) -> bool:
    if exchange.connection == 1:
        return False  # a clean close, no byte of an answer
    exchange.write(response(b"second connection", CACHEABLE))
    return True


@pytest.mark.parametrize("fault", ["reset", "closed"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_connection_that_failed_before_any_byte_is_retried(
    fault: str, method: str, raw_origin: RawOrigin, make_proxy: MakeProxy
) -> None:
    handler = _reset_first_connection if fault == "reset" else _close_first_connection
    raw_origin.route("/r", handler)
    proxy = await make_proxy(ORIGIN=raw_origin.url)

    answer = await proxy.request(method, "/r")

    assert answer.status == 200, answer
    assert answer.body == (b"second connection" if method == "GET" else b""), answer
    assert answer.x_cache == "MISS", answer
    assert raw_origin.count("/r") == 2
    assert _retries(proxy, "ok") == 1


async def test_a_forwarded_get_is_retried_too(raw_origin: RawOrigin, make_proxy: MakeProxy) -> None:
    raw_origin.route("/r", _reset_first_connection)
    proxy = await make_proxy(ORIGIN=raw_origin.url)

    answer = await proxy.get("/r", headers={"Cache-Control": "no-store"})

    assert (answer.status, answer.body) == (200, b"second connection"), answer
    assert answer.x_cache == "BYPASS", answer
    assert raw_origin.count("/r") == 2
    assert _retries(proxy, "ok") == 1


async def test_with_retries_off_the_failure_is_answered(
    raw_origin: RawOrigin, make_proxy: MakeProxy
) -> None:
    raw_origin.route("/r", _reset_first_connection)
    proxy = await make_proxy(ORIGIN=raw_origin.url, ORIGIN_RETRIES=0)

    answer = await proxy.get("/r")

    assert answer.status == 502, answer
    assert raw_origin.count("/r") == 1
    assert _retries(proxy, "ok") + _retries(proxy, "failed") == 0


async def test_a_refusing_origin_is_retried_as_often_as_allowed_then_answered_502(
    make_proxy: MakeProxy,
) -> None:
    proxy = await make_proxy(ORIGIN=refused_url(), ORIGIN_RETRIES=3, REQUEST_DEADLINE=1.0)

    answer = await proxy.get("/gone")

    assert answer.status == 502, answer
    assert answer.elapsed < 1.0, answer
    assert _retries(proxy, "failed") == 3
    assert _retries(proxy, "ok") == 0


async def test_retries_stop_when_the_deadline_leaves_no_time(
    raw_origin: RawOrigin, make_proxy: MakeProxy
) -> None:
    """Every connection is reset after 20 ms; eleven attempts cannot fit in 0.15 s: the
    retries stop (one counted as skipped) and the client gets the error within its deadline."""

    async def slow_reset(exchange: Exchange) -> bool:
        await asyncio.sleep(0.02)
        exchange.reset()
        return False

    raw_origin.route("/late", slow_reset)
    proxy = await make_proxy(
        ORIGIN=raw_origin.url, ORIGIN_RETRIES=10, REQUEST_DEADLINE=0.15, ORIGIN_TIMEOUT=0.15
    )

    answer = await proxy.get("/late")

    assert answer.status == 502, answer
    assert answer.elapsed < 0.15 + SLACK, answer
    assert _retries(proxy, "skipped") == 1
    assert 2 <= raw_origin.count("/late") < 11


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_a_forwarded_unsafe_method_is_never_retried(
    method: str, raw_origin: RawOrigin, make_proxy: MakeProxy
) -> None:
    """(aiohttp on its own would resend a PUT or DELETE once: tierproxy turns that off.)"""
    raw_origin.route("/r", _reset_first_connection)
    proxy = await make_proxy(ORIGIN=raw_origin.url, ORIGIN_RETRIES=3)

    answer = await proxy.request(method, "/r", data=b"order 1")

    assert answer.status == 502, answer
    assert raw_origin.count("/r") == 1
    assert _retries(proxy, "ok") + _retries(proxy, "failed") + _retries(proxy, "skipped") == 0


@pytest.mark.parametrize("end", ["close", "reset"])
async def test_a_partial_answer_is_never_retried(
    end: str, raw_origin: RawOrigin, make_proxy: MakeProxy
) -> None:
    async def partial_head(exchange: Exchange) -> bool:
        exchange.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await exchange.wait_sent()
        if end == "reset":
            await asyncio.sleep(0.05)  # the proxy reads the bytes before the reset
            exchange.reset()
        return False  # else a clean close

    raw_origin.route("/p", partial_head)
    proxy = await make_proxy(ORIGIN=raw_origin.url, ORIGIN_RETRIES=3)

    answer = await proxy.get("/p")

    assert answer.status == 502, answer
    assert raw_origin.count("/p") == 1


async def test_a_5xx_and_a_timeout_are_answers_not_retried(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/500", status=503, body=b"busy")
    origin.set("/hang", hang=True)
    proxy = await make_proxy(ORIGIN_RETRIES=3, ORIGIN_TIMEOUT=0.3)

    five = await proxy.get("/500")
    slow = await proxy.get("/hang")

    assert (five.status, five.body) == (503, b"busy"), five
    assert slow.status == 504, slow
    assert origin.count("/500") == 1
    assert origin.count("/hang") == 1
    assert _retries(proxy, "ok") + _retries(proxy, "failed") + _retries(proxy, "skipped") == 0


async def test_while_a_key_keeps_failing_its_stale_copy_is_served_without_asking_the_origin(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """/k fails (500) while /ok answers, so the origin's breaker stays closed; after
    BREAKER_FAILURES failures in a row for /k, the origin is asked for /k at most once per
    backoff interval (on the proxy's clock) and its stale copy served meanwhile."""
    dated = float(math.floor(time.time()))
    origin.set(
        "/k",
        headers={"Cache-Control": "max-age=1", "Date": email.utils.formatdate(dated, usegmt=True)},
    )
    origin.set("/ok", headers={"Cache-Control": "no-store"})
    clock = SteppedClock()
    proxy = await make_proxy(BREAKER_FAILURES=2, REDIS_URL=None, SQLITE_PATH="off", clock=clock)
    first = await proxy.get("/k")
    assert first.x_cache == "MISS", first
    clock.advance_to(dated + 1.6)
    origin.set("/k", status=500, body=b"broken")
    backoff = proxy.state.readthrough.upstream.backoff

    for _ in range(2):  # two failures in a row for /k; /ok keeps the breaker closed
        failed = await proxy.get("/k")
        assert failed.cache_status is not None and failed.cache_status.detail == "origin-5xx"
        assert (await proxy.get("/ok")).status == 200
    assert not proxy.state.readthrough.origin_breaker.is_open
    asked = origin.count("/k")
    assert asked == 3

    for _ in range(5):
        served = await proxy.get("/k")
        assert (served.x_cache, served.body) == ("STALE-L1", first.body), served
        assert served.cache_status is not None
        assert served.cache_status.detail == "origin-backoff", served
    assert origin.count("/k") == asked  # not asked within the interval

    clock.advance(0.5)  # the first interval: 0.25-0.5 s
    probe = await proxy.get("/k")
    assert probe.cache_status is not None and probe.cache_status.detail == "origin-5xx", probe
    assert origin.count("/k") == asked + 1
    again = await proxy.get("/k")
    assert again.cache_status is not None and again.cache_status.detail == "origin-backoff"
    assert origin.count("/k") == asked + 1

    origin.set("/k", headers={"Cache-Control": "max-age=60"}, body=b"fixed")
    clock.advance(1.0)  # the second interval: 0.5-1 s
    fixed = await proxy.get("/k")
    assert (fixed.status, fixed.body) == (200, b"fixed"), fixed
    assert len(backoff) == 0  # a success drops the key's record
    assert (await proxy.get("/k")).x_cache == "HIT-L1"
    stale_backoff = proxy.state.metrics.registry.get_sample_value(
        "tierproxy_stale_served_total", {"reason": "origin-backoff"}
    )
    assert stale_backoff == 6
