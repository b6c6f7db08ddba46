"""The test harness itself: if these fail, nothing else in this directory means anything.

No tierproxy involved - only the origin, the fault proxy, the canary and redis-server.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import aiohttp
import pytest
from support.fixture_types import MakeFaultProxy
from support.net import CanaryListener, raw_http_exchange, refused_url
from support.origin import Origin, make_body
from support.proxy import fetch
from support.redis_server import RedisServer
from support.storage import CacheStatus, answering_member, parse_cache_status, tier_members
from support.wait import wait_for_condition


async def test_origin_scripts_status_headers_and_counts_requests(origin: Origin) -> None:
    pinned_date = "Tue, 01 Oct 2024 10:00:00 GMT"
    origin.set(
        "/a",
        status=203,
        headers={"Cache-Control": "max-age=5", "X-Extra": "1", "Date": pinned_date},
    )
    async with aiohttp.ClientSession() as session:
        first = await fetch(session, "GET", origin.url + "/a?x=1")
        second = await fetch(session, "GET", origin.url + "/b", headers={"X-Probe": "yes"})
    assert first.status == 203
    assert first.headers["X-Extra"] == "1"
    assert first.headers["Date"] == pinned_date  # tests can pin a response's age
    assert first.body == b"origin body for /a?x=1 (request 1)"
    assert second.status == 200
    assert origin.count() == 2
    assert origin.count("/a") == 1
    assert origin.count("/a?x=1") == 1
    assert origin.count("/a?x=2") == 0
    assert origin.requests_for("/b")[0].headers["X-Probe"] == "yes"


async def test_origin_answers_304_to_matching_if_none_match(origin: Origin) -> None:
    origin.set("/e", etag='"v1"', honor_if_none_match=True)
    async with aiohttp.ClientSession() as session:
        plain = await fetch(session, "GET", origin.url + "/e")
        cond = await fetch(session, "GET", origin.url + "/e", headers={"If-None-Match": '"v1"'})
        other = await fetch(session, "GET", origin.url + "/e", headers={"If-None-Match": '"v0"'})
    assert (plain.status, cond.status, other.status) == (200, 304, 200)
    assert plain.headers["ETag"] == '"v1"'


async def test_origin_sized_chunked_and_truncated_bodies(origin: Origin) -> None:
    origin.set("/big", size=300_000, seed=7)
    origin.set("/chunked", size=100_000, seed=8, chunked=True)
    origin.set("/cut", size=100_000, close_mid_body=True)
    async with aiohttp.ClientSession() as session:
        big = await fetch(session, "GET", origin.url + "/big")
        chunked = await fetch(session, "GET", origin.url + "/chunked")
        with pytest.raises(aiohttp.ClientPayloadError):
            await fetch(session, "GET", origin.url + "/cut")
    assert hashlib.sha256(big.body).digest() == hashlib.sha256(make_body(300_000, 7)).digest()
    assert big.headers["Content-Length"] == "300000"
    assert chunked.body == make_body(100_000, 8)
    assert "Content-Length" not in chunked.headers
    assert chunked.headers["Transfer-Encoding"] == "chunked"


async def test_origin_hang_is_released(origin: Origin) -> None:
    origin.set("/h", hang=True)
    async with aiohttp.ClientSession() as session:
        task = asyncio.ensure_future(fetch(session, "GET", origin.url + "/h"))
        await wait_for_condition(lambda: origin.count("/h") == 1)
        await asyncio.sleep(0.05)
        assert not task.done()
        origin.release()
        async with asyncio.timeout(5):
            result = await task
    assert result.status == 200


async def test_origin_pause_after_streams_first_part(origin: Origin) -> None:
    origin.set("/p", size=200_000, pause_after=50_000)
    async with aiohttp.ClientSession() as session, session.get(origin.url + "/p") as resp:
        got = b""
        async with asyncio.timeout(3):
            while len(got) < 50_000:
                got += await resp.content.read(65536)
        origin.release()
        got += await resp.read()
    assert got == make_body(200_000)


async def test_fault_proxy_modes(origin: Origin, fault_proxy: MakeFaultProxy) -> None:
    proxy = await fault_proxy(origin.port)
    async with aiohttp.ClientSession() as session:
        assert (await fetch(session, "GET", proxy.url(path="/x"))).status == 200
        proxy.set_mode("delay", 0.3)
        slow = await fetch(session, "GET", proxy.url(path="/x"))
        assert slow.status == 200 and slow.elapsed >= 0.3
        proxy.set_mode("blackhole")
        with pytest.raises(TimeoutError):
            await fetch(session, "GET", proxy.url(path="/x"), timeout=0.3)
        proxy.set_mode("reset")
        with pytest.raises(aiohttp.ClientError):
            await fetch(session, "GET", proxy.url(path="/x"))
        proxy.set_mode("pass")
        await proxy.stop_listening()
        with pytest.raises(aiohttp.ClientConnectorError):
            await fetch(session, "GET", proxy.url(path="/x"))
        with pytest.raises(aiohttp.ClientConnectorError):
            await fetch(session, "GET", refused_url() + "/x")


async def test_canary_counts_connections(canary: CanaryListener) -> None:
    response = await raw_http_exchange(
        canary.host, canary.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert response.status == 200 and response.body == b"canary"
    assert canary.connections == 1


def test_redis_server_freeze_kill_restart(
    redis_server: RedisServer, redis_url: str, redis_client: Any
) -> None:
    redis_client.set("k", "v")
    with redis_server.frozen():
        assert not redis_server.ping(timeout=0.2)
    assert redis_server.ping()
    redis_server.kill()
    assert not redis_server.ping(timeout=0.2)
    redis_server.restart()
    assert redis_server.ping()
    assert redis_client.get("k") is None  # nothing persisted
    assert redis_server.url == redis_url


def test_redis_url_fixture_flushes(redis_client: Any) -> None:
    assert redis_client.dbsize() == 0


def test_cache_status_parser() -> None:
    [member] = parse_cache_status('tierproxy-l2; hit; ttl=-42; detail="origin-timeout"')
    assert member.cache == "tierproxy-l2" and member.hit and member.ttl == -42
    assert member.detail == "origin-timeout"
    [member] = parse_cache_status("tierproxy-l1; fwd=uri-miss; fwd-status=200; stored")
    assert member.fwd == "uri-miss" and member.fwd_status == 200 and member.stored
    assert not member.hit and not member.collapsed
    # A real RFC 8941 parser: what is not a structured-field List fails the test.
    for broken in ("tierproxy-l1; ttl=1.2.3", 'tierproxy-l1; detail="open', "a;;", "a, , b"):
        with pytest.raises(AssertionError, match="not an RFC 8941 List"):
            parse_cache_status(broken)
    value = "cdn; hit, tierproxy-l3; fwd=uri-miss, tierproxy-l2; hit; ttl=5, tierproxy-l1; stored"
    assert list(tier_members(value)) == ["l3", "l2", "l1"]
    assert answering_member(value) == CacheStatus("tierproxy-l2", {"hit": True, "ttl": 5})
    for misordered in ("tierproxy-l1; hit, tierproxy-l2; fwd=uri-miss", "tierproxy-l1, cdn"):
        with pytest.raises(AssertionError):
            tier_members(misordered)


async def test_wait_for_condition_is_bounded() -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError, match="never"):
        await wait_for_condition(lambda: False, timeout=0.2, message="never")
    assert time.monotonic() - started < 1.0
