"""Writes that must happen: an unsafe request's invalidation is never dropped because the
background task set is full (that set is for optional work: backfills, revalidations), and the
first L2 write after the Redis link was reset does not fail on a dead pooled connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from support.fixture_types import MakeFaultProxy, MakeProxy
from support.origin import Origin
from support.redis_server import RedisServer
from support.storage import redis_key, sqlite_row
from support.wait import wait_for_condition

from .conftest import AdminFor, value

CACHEABLE = {"Cache-Control": "max-age=300"}


async def test_an_unsafe_requests_invalidation_happens_when_the_background_set_is_full(
    origin: Origin,
    make_proxy: MakeProxy,
    admin_for: AdminFor,
    redis_server: RedisServer,
    redis_client: Any,
    fault_proxy: MakeFaultProxy,
    sqlite_path: Path,
) -> None:
    origin.set_default(headers=CACHEABLE)
    slow_redis = await fault_proxy(redis_server.port)
    redis_url = f"redis://127.0.0.1:{slow_redis.port}/0"
    redis_client.flushall()
    seeder = await make_proxy(REDIS_URL=redis_url)  # stores /x in L2 and the shared L3 file
    assert (await seeder.get("/x")).x_cache == "MISS"
    await seeder.settle()
    assert redis_client.exists(redis_key("/x", origin.url)) and sqlite_row(
        sqlite_path, "/x", origin.url
    )
    proxy = await make_proxy(
        REDIS_URL=redis_url, BACKFILL_MAX_TASKS=1, L2_WRITE_TIMEOUT=5, L2_TIMEOUT=0.5
    )
    admin = await admin_for(proxy)
    assert (await proxy.get("/x")).x_cache == "HIT-L2"
    await proxy.settle()

    slow_redis.set_mode("delay", delay=0.5)  # each L2 write now takes about a second
    assert (await proxy.get("/y")).x_cache == "MISS"  # its L2 backfill fills the task set
    assert proxy.state.background.pending == 1
    response = await proxy.request("POST", "/x", data=b"change")
    assert response.status == 200 and response.x_cache == "BYPASS", response
    await proxy.settle(timeout=15)

    # RFC 9111 §4.4: the successful POST invalidated /x in every tier, none skipped.
    assert proxy.state.tier("l1").backend.get_now(proxy.state.keys.key("/x")) is None
    assert not redis_client.exists(redis_key("/x", origin.url))
    assert sqlite_row(sqlite_path, "/x", origin.url) is None
    m = await admin.metrics()
    assert value(m, "tierproxy_tier_writes_total", tier="l2", op="purge", outcome="ok") == 1
    assert value(m, "tierproxy_tier_writes_total", tier="l3", op="purge", outcome="ok") == 1
    slow_redis.set_mode("pass")
    assert (await proxy.get("/x")).x_cache == "MISS"  # fetched again, not an old copy


async def test_the_first_l2_write_after_redis_restarted_succeeds(
    origin: Origin,
    make_proxy: MakeProxy,
    admin_for: AdminFor,
    redis_server: RedisServer,
    redis_url: str,
    redis_client: Any,
) -> None:
    origin.set_default(headers=CACHEABLE)
    proxy = await make_proxy(SQLITE_PATH="off", L2_WRITE_TIMEOUT=1)
    admin = await admin_for(proxy)
    assert (await proxy.get("/before")).x_cache == "MISS"
    await proxy.settle()
    assert redis_client.exists(
        redis_key("/before", origin.url)
    )  # the pool now holds an idle connection

    redis_server.restart()  # every pooled connection is reset while idle
    await wait_for_condition(lambda: redis_server.ping(), message="Redis back")
    # The restarted Redis is empty: L2 writes wait until this replica has caught up with the
    # purge log and holds its lease there again (tiers/redis.py _SET_FENCED).
    leases = proxy.state.tier("l2").backend.purge_log().replicas_key
    replica = proxy.state.invalidation.replica_id
    await wait_for_condition(
        lambda: redis_client.zscore(leases, replica) is not None,
        timeout=10,
        message="the replica's lease registered again",
    )

    assert (await proxy.get("/after")).x_cache == "MISS"
    await proxy.settle()
    assert redis_client.exists(redis_key("/after", origin.url)), (
        "the first write after the reset was lost"
    )
    m = await admin.metrics()
    assert value(m, "tierproxy_tier_writes_total", tier="l2", op="set", outcome="error") == 0
    assert value(m, "tierproxy_tier_writes_total", tier="l2", op="set", outcome="ok") == 2
