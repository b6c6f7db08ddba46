"""Cache-Status (RFC 9211) through the real proxy: one member per tier the request reached.

Real origin, real redis-server (frozen with SIGSTOP for the timeout and breaker cases), real
SQLite file. Every header is read with an RFC 8941 parser (``http_sf``, through
``support.storage.tier_members``), which also checks the member names and their order:
closest to the origin first (L3, L2, L1), after any upstream cache's members.
"""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from support.clock import SteppedClock
from support.fixture_types import MakeProxy
from support.origin import Origin
from support.proxy import Fetched, ProxyHandle
from support.purge_log import past_purge_log_start
from support.redis_server import RedisServer
from support.storage import CacheStatus, redis_key, sqlite_row
from support.wait import wait_for_condition

CACHEABLE = {"Cache-Control": "max-age=300"}
L2_TIMEOUT = 0.1
SLACK = 0.5


def _params(member: CacheStatus) -> dict[str, str | bool | int]:
    """A member's parameters but ``ttl`` (it ticks with the clock)."""
    return {name: value for name, value in member.params.items() if name != "ttl"}


async def _fill_l2_and_l3(
    make_proxy: MakeProxy,
    origin: Origin,
    redis_client: Any,
    sqlite_path: Path,
    paths: list[str],
    **env: Any,
) -> None:
    """``paths`` fetched by a proxy that is then closed: stored in L2 and L3, none in L1."""
    origin.set_default(headers=CACHEABLE)
    writer = await make_proxy(**env)
    await past_purge_log_start(writer)  # so that a later process trusts these L3 copies
    for path in paths:
        miss = await writer.get(path)
        assert miss.x_cache == "MISS", miss
        # Every tier reached missed; L3, the closest to the origin, forwarded; all stored.
        assert {tier: _params(m) for tier, m in miss.tiers.items()} == {
            "l3": {"fwd": "uri-miss", "fwd-status": 200, "stored": True},
            "l2": {"fwd": "uri-miss", "stored": True},
            "l1": {"fwd": "uri-miss", "stored": True},
        }, miss
    for path in paths:
        await wait_for_condition(
            partial(redis_client.exists, redis_key(path, origin.url)), message="L2"
        )
        await wait_for_condition(partial(sqlite_row, sqlite_path, path, origin.url), message="L3")
    await writer.close()


async def test_an_l1_hit_has_the_l1_member_alone(origin: Origin, make_proxy: MakeProxy) -> None:
    origin.set("/a", headers=CACHEABLE)
    proxy = await make_proxy()
    assert (await proxy.get("/a")).x_cache == "MISS"
    for hit_path in (True, False):  # the connection's hit path, and the full path
        extra = {} if hit_path else {"Connection": "close"}
        hit = await proxy.get("/a", headers=extra)
        assert (hit.status, hit.x_cache) == (200, "HIT-L1"), hit
        assert list(hit.tiers) == ["l1"], hit
        member = hit.tiers["l1"]
        assert member.hit and member.ttl is not None and 298 <= member.ttl <= 300, hit
        assert _params(member) == {"hit": True}, hit


@pytest.mark.parametrize("full_path", [False, True])
async def test_l2_and_l3_hits_list_the_faster_tiers_they_are_backfilled_into(
    full_path: bool,
    origin: Origin,
    make_proxy: MakeProxy,
    redis_url: str,
    redis_client: Any,
    sqlite_path: Path,
) -> None:
    await _fill_l2_and_l3(make_proxy, origin, redis_client, sqlite_path, ["/b", "/c"])
    proxy = await make_proxy()  # empty L1
    extra = {"Connection": "close"} if full_path else {}

    from_l2 = await proxy.get("/b", headers=extra)
    assert from_l2.x_cache == "HIT-L2", from_l2
    assert {tier: _params(m) for tier, m in from_l2.tiers.items()} == {
        "l2": {"hit": True},
        "l1": {"fwd": "uri-miss", "stored": True},
    }, from_l2
    assert from_l2.tiers["l2"].ttl is not None and from_l2.tiers["l2"].ttl > 290, from_l2

    redis_client.delete(redis_key("/c", origin.url))
    from_l3 = await proxy.get("/c", headers=extra)
    assert from_l3.x_cache == "HIT-L3", from_l3
    assert {tier: _params(m) for tier, m in from_l3.tiers.items()} == {
        "l3": {"hit": True},
        "l2": {"fwd": "uri-miss", "stored": True},
        "l1": {"fwd": "uri-miss", "stored": True},
    }, from_l3
    assert (await proxy.get("/c")).tiers.keys() == {"l1"}  # backfilled: an L1 hit now
    assert origin.count() == 2


async def test_a_stale_copy_served_on_an_origin_error_and_a_revalidation(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    clock = SteppedClock()
    proxy = await make_proxy(clock=clock)
    short = {"Cache-Control": "max-age=1"}
    origin.set("/s", headers=short)
    origin.set("/r", headers=short, etag='"v1"', honor_if_none_match=True)
    for path in ("/s", "/r"):
        assert (await proxy.get(path)).x_cache == "MISS"
    await proxy.settle()
    clock.advance(10)  # both stale, still within TIERPROXY_MAX_STALE

    origin.set("/s", status=500)
    stale = await proxy.get("/s")
    assert (stale.status, stale.x_cache) == (200, "STALE-L1"), stale
    # The lookup stopped at L1's stale copy: L3 was not reached.
    assert list(stale.tiers) == ["l1"], stale
    member = stale.tiers["l1"]
    assert member.hit and member.detail == "origin-5xx", stale
    assert member.ttl is not None and member.ttl <= -1, stale

    revalidated = await proxy.get("/r")
    assert (revalidated.status, revalidated.x_cache) == (200, "REVALIDATED"), revalidated
    assert {tier: _params(m) for tier, m in revalidated.tiers.items()} == {
        "l1": {"fwd": "stale", "fwd-status": 304, "stored": True}
    }, revalidated


async def test_a_vary_miss_is_told_apart_from_a_uri_miss(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/v", headers={**CACHEABLE, "Vary": "Accept-Language"})
    proxy = await make_proxy()
    english = await proxy.get("/v", headers={"Accept-Language": "en"})
    assert english.x_cache == "MISS" and english.tiers["l1"].fwd == "uri-miss", english
    await proxy.settle()  # in L1 and L3
    german = await proxy.get("/v", headers={"Accept-Language": "de"})
    assert german.x_cache == "MISS", german
    assert {tier: m.fwd for tier, m in german.tiers.items()} == {
        "l3": "vary-miss",
        "l1": "vary-miss",
    }, german
    assert german.tiers["l3"].fwd_status == 200 and german.tiers["l3"].stored, german


async def test_a_frozen_redis_is_an_l2_timeout_then_its_breaker_opens(
    origin: Origin,
    make_proxy: MakeProxy,
    redis_server: RedisServer,
    redis_url: str,
    redis_client: Any,
    sqlite_path: Path,
) -> None:
    env = {"L2_TIMEOUT": L2_TIMEOUT, "BREAKER_FAILURES": 1, "BREAKER_COOLDOWN": 60}
    await _fill_l2_and_l3(make_proxy, origin, redis_client, sqlite_path, ["/t", "/u"], **env)
    proxy = await make_proxy(**env)  # empty L1

    with redis_server.frozen():  # SIGSTOP: connections stay open, nothing answers
        timed_out = await proxy.get("/t")
        assert (timed_out.status, timed_out.x_cache) == (200, "HIT-L3"), timed_out
        assert timed_out.elapsed <= L2_TIMEOUT + SLACK, timed_out
        assert {tier: _params(m) for tier, m in timed_out.tiers.items()} == {
            "l3": {"hit": True},
            "l2": {"fwd": "uri-miss", "stored": True, "detail": "timeout"},
            "l1": {"fwd": "uri-miss", "stored": True},
        }, timed_out

        # One failure opened L2's lookup breaker: the next request does not ask Redis.
        skipped = await proxy.get("/u")
        assert (skipped.status, skipped.x_cache) == (200, "HIT-L3"), skipped
        assert skipped.tiers["l2"].detail == "breaker-open", skipped
        assert skipped.tiers["l2"].fwd == "uri-miss", skipped
        assert skipped.elapsed < L2_TIMEOUT, skipped

        # A miss with L2 not answering: the origin's answer is told on L3's member.
        miss = await proxy.get("/new")
        assert miss.x_cache == "MISS", miss
        assert miss.tiers["l2"].detail == "breaker-open" and miss.tiers["l3"].fwd_status == 200
    assert origin.count() == 3


async def test_a_request_the_cache_does_not_answer_is_told_on_the_first_tier(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/p", headers=CACHEABLE, status=201)
    proxy = await make_proxy()

    posted = await proxy.request("POST", "/p", data=b"x")
    assert (posted.status, posted.x_cache) == (201, "BYPASS"), posted
    assert {tier: _params(m) for tier, m in posted.tiers.items()} == {
        "l1": {"fwd": "method", "fwd-status": 201}
    }, posted

    no_store = await proxy.get("/p", headers={"Cache-Control": "no-store"})
    assert (no_store.status, no_store.x_cache) == (201, "BYPASS"), no_store
    assert {tier: _params(m) for tier, m in no_store.tiers.items()} == {
        "l1": {"fwd": "bypass", "fwd-status": 201}
    }, no_store

    # Answered before reaching the cache (PURGE, here disabled): no tier handled it.
    refused = await proxy.request("PURGE", "/p")
    assert (refused.status, refused.x_cache) == (405, "BYPASS"), refused
    assert "Cache-Status" not in refused.headers, refused


async def test_a_shed_request_says_so_on_the_tier_it_would_have_been_sent_from(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(
        MAX_INFLIGHT=1, ORIGIN_TIMEOUT=8.0, REQUEST_DEADLINE=9.0, ORIGIN_QUEUE_TIMEOUT=8.0
    )
    origin.set_default(hang=True, headers=CACHEABLE)
    held = asyncio.create_task(proxy.get("/held"))
    try:
        await wait_for_condition(lambda: origin.count("/held") == 1, timeout=5, message="held")
        shed = await proxy.get("/shed")
        assert (shed.status, shed.x_cache) == (503, "MISS"), shed
        assert {tier: _params(m) for tier, m in shed.tiers.items()} == {
            "l3": {"fwd": "uri-miss", "detail": "shed"},
            "l1": {"fwd": "uri-miss"},
        }, shed
    finally:
        origin.release()
    answer: Fetched = await asyncio.wait_for(held, 10)
    assert answer.x_cache == "MISS", answer


async def test_concurrent_misses_say_which_shared_the_fetch(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/c", latency=0.3, headers=CACHEABLE)
    proxy: ProxyHandle = await make_proxy()
    answers = await asyncio.gather(*(proxy.get("/c") for _ in range(5)))
    assert origin.count("/c") == 1
    # The member that forwarded (L3's: the closest to the origin) says "collapsed" for the
    # four that shared the one fetch; the tiers it is stored in are marked on each.
    assert sorted(a.tiers["l3"].collapsed for a in answers) == [False] + [True] * 4, answers
    for answer in answers:
        assert answer.tiers["l3"].fwd_status == 200 and not answer.tiers["l1"].collapsed
        assert all(m.stored for m in answer.tiers.values()), answer
