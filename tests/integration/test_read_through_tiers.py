"""Read-through across L1 memory → L2 Redis → L3 SQLite → origin, with backfill.

Storage is observed directly (Redis keys, SQLite rows) because L2/L3 backfills are
background tasks: tests poll for them with a bound, never sleep.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from support.fixture_types import MakeProxy
from support.origin import Origin
from support.purge_log import past_purge_log_start
from support.storage import redis_key, redis_tier_keys, sqlite_count, sqlite_row
from support.wait import wait_for_condition

CACHEABLE = {"Cache-Control": "max-age=300"}

# One tier switched on at a time: the same contract must hold for each.
TIER_ONLY: dict[str, dict[str, Any]] = {
    "l1": {"REDIS_URL": None, "SQLITE_PATH": "off"},
    "l2": {"L1_MAX_BYTES": 0, "SQLITE_PATH": "off"},
    "l3": {"L1_MAX_BYTES": 0, "REDIS_URL": None},
}


async def _stored_in(
    tier: str, path: str, redis_client: Any, sqlite_path: Path, origin: Origin
) -> None:
    if tier == "l2":
        await wait_for_condition(
            lambda: redis_client.exists(redis_key(path, origin.url)), message=f"{path} in Redis"
        )
    elif tier == "l3":
        await wait_for_condition(
            lambda: sqlite_row(sqlite_path, path, origin.url), message=f"{path} in SQLite"
        )


async def test_first_request_is_a_miss_and_the_second_an_l1_hit(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/a", headers={**CACHEABLE, "X-Origin-Header": "kept"}, etag='"e1"')
    proxy = await make_proxy()

    first = await proxy.get("/a")
    second = await proxy.get("/a")

    assert first.status == 200, first
    assert first.x_cache == "MISS", first
    assert first.body == b"origin body for /a (request 1)"
    # Every tier the request reached missed; the one closest to the origin (L3) forwarded.
    assert set(first.tiers) == {"l1", "l3"}, first
    assert all(m.fwd == "uri-miss" and m.stored for m in first.tiers.values()), first
    assert first.tiers["l3"].fwd_status == 200, first
    assert second.status == 200, second
    assert second.x_cache == "HIT-L1", second
    assert second.body == first.body
    assert second.headers["X-Origin-Header"] == "kept"
    assert second.headers["ETag"] == '"e1"'
    assert second.headers["Content-Type"] == first.headers["Content-Type"]
    assert list(second.tiers) == ["l1"] and second.tiers["l1"].hit, second
    assert second.age is not None and 0 <= second.age <= 2, second
    assert origin.count("/a") == 1


@pytest.mark.parametrize("tier", ["l1", "l2", "l3"])
async def test_each_tier_alone_serves_a_hit_with_the_origin_response(
    tier: str,
    origin: Origin,
    make_proxy: MakeProxy,
    redis_url: str,
    redis_client: Any,
    sqlite_path: Path,
) -> None:
    origin.set("/only", status=200, headers={**CACHEABLE, "X-Origin-Header": "kept"}, etag='"t"')
    proxy = await make_proxy(**TIER_ONLY[tier])
    assert proxy.tier_names() == [tier]

    miss = await proxy.get("/only")
    assert miss.x_cache == "MISS", miss
    await _stored_in(tier, "/only", redis_client, sqlite_path, origin)
    hit = await proxy.get("/only")

    assert hit.status == 200, hit
    assert hit.x_cache == f"HIT-{tier.upper()}", hit
    assert hit.body == miss.body
    assert hit.headers["X-Origin-Header"] == "kept"
    assert hit.headers["ETag"] == '"t"'
    assert hit.age is not None and hit.age >= 0, hit
    assert list(hit.tiers) == [tier], hit  # the one tier there is, and it answered
    assert hit.tiers[tier].hit and hit.tiers[tier].detail is None, hit
    assert origin.count("/only") == 1


async def test_entry_is_served_by_each_tier_in_turn_and_the_origin_is_asked_once(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, redis_client: Any, sqlite_path: Path
) -> None:
    origin.set("/walk", headers=CACHEABLE)

    # Process 1: MISS, then HIT-L1; the fetch backfills L2 and L3 in the background.
    first = await make_proxy(MAX_STALE=100)
    await past_purge_log_start(first)  # so that process 3 trusts the L3 copy
    miss = await first.get("/walk")
    assert miss.x_cache == "MISS", miss
    assert (await first.get("/walk")).x_cache == "HIT-L1"
    await wait_for_condition(
        lambda: redis_client.exists(redis_key("/walk", origin.url)), message="L2 fill"
    )
    await wait_for_condition(
        lambda: sqlite_row(sqlite_path, "/walk", origin.url), message="L3 fill"
    )
    # Redis TTL = time until the entry may no longer be served stale (300 s fresh + 100 s).
    ttl = redis_client.ttl(redis_key("/walk", origin.url))
    assert 300 < ttl <= 400, ttl
    await first.close()

    # Process 2 (empty L1): HIT-L2, and the L2 hit fills L1.
    second = await make_proxy(MAX_STALE=100)
    from_l2 = await second.get("/walk")
    assert from_l2.x_cache == "HIT-L2", from_l2
    assert from_l2.body == miss.body
    assert (await second.get("/walk")).x_cache == "HIT-L1"
    await second.close()

    # Redis loses the entry; process 3: HIT-L3, which backfills L2 and L1. (Had Redis lost
    # its purge log too, process 3 would revalidate its L3 copy: it could have been purged.)
    redis_client.delete(redis_key("/walk", origin.url))
    third = await make_proxy(MAX_STALE=100)
    from_l3 = await third.get("/walk")
    assert from_l3.x_cache == "HIT-L3", from_l3
    assert from_l3.body == miss.body
    assert (await third.get("/walk")).x_cache == "HIT-L1"
    await wait_for_condition(
        lambda: redis_client.exists(redis_key("/walk", origin.url)), message="L3 hit backfilling L2"
    )
    await third.close()

    # Process 4 finds the backfilled L2 copy.
    fourth = await make_proxy(MAX_STALE=100)
    again = await fourth.get("/walk")
    assert again.x_cache == "HIT-L2", again
    assert again.body == miss.body

    assert origin.count("/walk") == 1


async def test_concurrent_misses_for_one_key_share_one_origin_request(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/slow", latency=0.3, headers=CACHEABLE)
    proxy = await make_proxy()

    results = await asyncio.gather(*(proxy.get("/slow") for _ in range(10)))

    assert [r.status for r in results] == [200] * 10, results
    assert {r.body for r in results} == {b"origin body for /slow (request 1)"}
    assert origin.count("/slow") == 1
    # One request fetched; the nine others got its answer and say so (RFC 9211 "collapsed").
    collapsed = [r.tiers["l3"].collapsed for r in results]
    assert sorted(collapsed) == [False] + [True] * 9, results
    waiters = proxy.state.metrics.registry.get_sample_value("tierproxy_coalesced_waiters_total")
    assert waiters == 9


async def test_concurrent_misses_for_different_keys_are_fetched_separately(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/q", latency=0.2, headers=CACHEABLE)
    proxy = await make_proxy()

    results = await asyncio.gather(*(proxy.get(f"/q?n={i}") for i in range(3)))

    assert [r.body for r in results] == [
        f"origin body for /q?n={i} (request 1)".encode() for i in range(3)
    ]
    assert origin.count("/q") == 3


async def test_head_is_answered_from_the_get_entry(origin: Origin, make_proxy: MakeProxy) -> None:
    origin.set("/h", headers=CACHEABLE)
    proxy = await make_proxy()

    got = await proxy.get("/h")
    head = await proxy.head("/h")

    assert head.status == 200, head
    assert head.x_cache == "HIT-L1", head
    assert head.body == b""
    if "Content-Length" in head.headers:
        assert int(head.headers["Content-Length"]) == len(got.body)
    assert origin.count("/h") == 1
    assert origin.count(method="HEAD") == 0


async def test_post_passes_through_as_bypass_every_time_and_is_never_stored(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, redis_client: Any, sqlite_path: Path
) -> None:
    origin.set("/p", headers=CACHEABLE)  # even a "cacheable" answer to a POST is not stored
    proxy = await make_proxy()

    first = await proxy.request("POST", "/p", data=b"payload-1")
    second = await proxy.request("POST", "/p", data=b"payload-2")

    assert (first.status, second.status) == (200, 200)
    assert first.x_cache == "BYPASS", first
    assert second.x_cache == "BYPASS", second
    assert second.body == b"origin body for /p (request 2)"
    assert [r.body for r in origin.requests_for("/p", "POST")] == [b"payload-1", b"payload-2"]
    await proxy.settle()
    assert redis_tier_keys(redis_client) == []
    assert sqlite_count(sqlite_path) == 0


async def test_unsafe_method_invalidates_the_cached_entry(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, redis_client: Any, sqlite_path: Path
) -> None:
    origin.set("/inv", headers=CACHEABLE)
    proxy = await make_proxy()
    assert (await proxy.get("/inv")).x_cache == "MISS"
    await proxy.settle()
    assert redis_client.exists(redis_key("/inv", origin.url)) and sqlite_row(
        sqlite_path, "/inv", origin.url
    )

    assert (await proxy.request("POST", "/inv", data=b"x")).x_cache == "BYPASS"
    await proxy.settle()

    after = await proxy.get("/inv")
    assert after.x_cache == "MISS", after
    assert origin.count("/inv", "GET") == 2
    # ... and a fresh process does not find the old copy in L2/L3 either.
    await proxy.settle()
    fresh = await make_proxy()
    assert (await fresh.get("/inv")).body == after.body


async def test_no_tiers_configured_still_proxies(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(L1_MAX_BYTES=0, SQLITE_PATH="off", REDIS_URL=None)
    assert proxy.tier_names() == []
    first = await proxy.get("/plain")
    second = await proxy.get("/plain")
    assert (first.status, second.status) == (200, 200)
    assert origin.count("/plain") == 2
