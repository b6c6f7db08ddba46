"""Several replicas on one Redis: a purge on any of them reaches every replica's L1 (and its own
L3), over the ``tierproxy:<origin id>:invalidate`` pub/sub channel; a replica that lost the channel clears
its L1 when it subscribes again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import aiohttp
from support.fixture_types import MakeProxy, SpawnProxy
from support.origin import Origin
from support.proxy import SpawnedProxy, fetch
from support.redis_server import RedisServer
from support.storage import purge_channel, redis_key
from support.wait import wait_for_condition

from .conftest import AUTH, TOKEN, AdminFor, scrape_url, value

CACHEABLE = {"Cache-Control": "max-age=300"}


async def _ready(proc: SpawnedProxy) -> None:
    async def subscribed() -> bool:
        async with (
            aiohttp.ClientSession() as session,
            session.get(proc.admin_url + "/readyz") as resp,
        ):
            return bool((await resp.json())["invalidation"] == "connected")

    await wait_for_condition(subscribed, timeout=10, message=f"{proc.url} subscribed")


async def test_a_purge_on_one_replica_empties_the_other_replicas_l1_and_l3(
    origin: Origin, spawn_proxy: SpawnProxy, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    origin.set_default(headers={**CACHEABLE, "Surrogate-Key": "shared"})
    origin.set("/r", headers=CACHEABLE)
    # Separate L3 files, as on separate hosts: the purge must reach the other's L3 too.
    a = await spawn_proxy(PURGE_TOKEN=TOKEN, SQLITE_PATH=str(tmp_path / "a.sqlite3"))
    b = await spawn_proxy(PURGE_TOKEN=TOKEN, SQLITE_PATH=str(tmp_path / "b.sqlite3"))
    await _ready(a)
    await _ready(b)
    async with aiohttp.ClientSession() as session:
        assert (await fetch(session, "GET", a.url + "/r")).x_cache == "MISS"
        await wait_for_condition(
            lambda: redis_client.exists(redis_key("/r", origin.url)), message="A's L2 copy"
        )
        assert (await fetch(session, "GET", b.url + "/r")).x_cache == "HIT-L2"
        assert (await fetch(session, "GET", b.url + "/r")).x_cache == "HIT-L1"
        before = await scrape_url(b.admin_url)
        assert value(before, "tierproxy_l1_entries") == 1

        purge = await fetch(session, "PURGE", a.url + "/r", headers=AUTH)
        body = json.loads(purge.body)
        assert purge.status == 200 and body["replicas_acked"] == 2, body  # A and B applied it
        assert body["replicas_fenced"] == 0 and body["replicas_unconfirmed"] == 0, body

        async def b_applied() -> bool:
            m = await scrape_url(b.admin_url)
            # the purge and its second round (L1 only: tierproxy.invalidation)
            return value(m, "tierproxy_invalidations_received_total", outcome="applied") == 2

        await wait_for_condition(b_applied, message="B applied A's purge")
        after = await scrape_url(b.admin_url)
        assert value(after, "tierproxy_l1_entries") == 0
        assert value(after, "tierproxy_l3_entries") == 0  # B's own L3 file
        assert value(after, "tierproxy_purged_entries_total", tier="l1", mode="hard") == 1
        assert value(after, "tierproxy_purged_entries_total", tier="l2", mode="hard") == 0
        a_metrics = await scrape_url(a.admin_url)
        assert value(a_metrics, "tierproxy_invalidations_received_total", outcome="own") == 2
        refetched = await fetch(session, "GET", b.url + "/r")
        assert refetched.x_cache == "MISS", refetched
        assert origin.count("/r") == 2

        # Tags: purge on B, tagged entries leave A's L1.
        for i in range(5):
            await fetch(session, "GET", a.url + f"/tagged/{i}")
        await wait_for_condition(  # A's backfills done: nothing can re-add them after the purge
            lambda: all(
                redis_client.exists(redis_key(f"/tagged/{i}", origin.url)) for i in range(5)
            ),
            message="A's tagged entries in L2",
        )
        tag_purge = await fetch(
            session, "POST", b.admin_url + "/purge", json={"tags": ["shared"]}, headers=AUTH
        )
        assert tag_purge.status == 200, tag_purge

        async def a_l1_empty() -> bool:
            m = await scrape_url(a.admin_url)
            return value(m, "tierproxy_l1_entries") == 0

        await wait_for_condition(a_l1_empty, message="A's tagged L1 entries purged")
        assert (await fetch(session, "GET", a.url + "/tagged/0")).x_cache == "MISS"


async def test_replica_that_reconnects_clears_its_l1(
    origin: Origin,
    make_proxy: MakeProxy,
    admin_for: AdminFor,
    redis_server: RedisServer,
    redis_url: str,
) -> None:
    origin.set_default(headers=CACHEABLE)
    proxy = await make_proxy(SQLITE_PATH="off")
    admin = await admin_for(proxy)
    invalidation = proxy.state.invalidation
    assert invalidation.state == "connected"
    for i in range(3):
        await proxy.get(f"/k{i}")
    await proxy.settle()
    l1 = proxy.state.tier("l1").backend
    assert len(l1) == 3

    redis_server.kill()
    try:
        await wait_for_condition(
            lambda: invalidation.state != "connected",
            timeout=10,
            message="the subscriber noticing Redis is gone",
        )
        # Within its purge lease L1 keeps serving (nothing was purged yet that it knows of).
        assert (await proxy.get("/k0")).x_cache == "HIT-L1"
        status, body = await admin.readyz()
        assert status == 200 and body["invalidation"] == "connecting", body
    finally:
        redis_server.start()

    await wait_for_condition(
        lambda: invalidation.state == "connected",
        timeout=15,
        message="resubscribed after Redis came back",
    )
    assert len(l1) == 0  # Redis came back empty, purge log included: L1 starts over
    m = await admin.metrics()
    assert value(m, "tierproxy_l1_clears_total", reason="reconnect") == 1
    assert value(m, "tierproxy_l1_clears_total", reason="connect") == 1
    assert value(m, "tierproxy_l1_entries") == 0
    assert (await proxy.get("/k1")).x_cache == "MISS"


async def test_purges_reach_an_in_process_replica_and_bad_messages_are_ignored(
    origin: Origin, make_proxy: MakeProxy, admin_for: AdminFor, redis_url: str, redis_client: Any
) -> None:
    origin.set_default(headers=CACHEABLE)
    one = await make_proxy(PURGE_TOKEN=TOKEN, SQLITE_PATH="off")
    two = await make_proxy(PURGE_TOKEN=TOKEN, SQLITE_PATH="off")
    for proxy in (one, two):
        await proxy.get("/x")
        await proxy.get("/y")
    await one.settle()
    await two.settle()
    admin_two = await admin_for(two)

    no_slash = {"v": 1, "keys": ["no-slash"], "tags": [], "soft": False, "at": 1, "from": "z"}
    for junk in (
        b"not json",
        b"{}",
        json.dumps(no_slash).encode(),
        b"[1,2]",
        json.dumps({"v": 99}).encode(),
    ):
        redis_client.publish(purge_channel(origin.url), junk)
    assert (await one.request("PURGE", "/x", headers={**AUTH, "Soft-Purge": "1"})).status == 200

    async def two_applied() -> bool:
        m = await admin_two.metrics()
        # the purge and its second round (L1 only: tierproxy.invalidation)
        return value(m, "tierproxy_invalidations_received_total", outcome="applied") == 2

    await wait_for_condition(two_applied, message="two applied one's soft purge")
    m = await admin_two.metrics()
    assert value(m, "tierproxy_invalidations_received_total", outcome="invalid") == 5
    l1 = two.state.tier("l1").backend
    marked = l1.get_now(two.state.keys.key("/x"))
    assert marked is not None and marked.fresh_until <= time.time()  # soft: kept, not fresh
    assert l1.get_now(two.state.keys.key("/y")).fresh_until > time.time()
    assert (await two.get("/y")).x_cache == "HIT-L1"
    assert (await two.get("/x")).x_cache == "MISS"  # fetched again (fwd=stale)
