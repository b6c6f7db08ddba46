"""L2 on a Sentinel-managed Redis (``redis+sentinel://``): a real master, replica and sentinel.

The master is killed while clients keep asking: every answer is still a 200 (L2 misses during
the failover are fine), and once the sentinel has promoted the replica, L2 works on it without
restarting the proxy.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from support.fixture_types import MakeProxy
from support.origin import Origin
from support.proxy import ProxyHandle
from support.redis_server import RedisSentinelSet, find_redis_server
from support.storage import redis_key
from support.wait import wait_for_condition

CACHEABLE = {"Cache-Control": "max-age=300"}
TOKEN = "test-purge-token-0123456789"


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[RedisSentinelSet]:
    binary = find_redis_server()
    if binary is None:
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail("redis-server not found; CI=true so this is a failure", pytrace=False)
        pytest.skip("redis-server not found")
    servers = RedisSentinelSet(binary, tmp_path / "sentinel")
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


def _holds(port: int, material: str, origin: Origin) -> bool:
    with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1) as client:
        return bool(client.exists(redis_key(material, origin.url)))


async def _l2_shared(a: ProxyHandle, b: ProxyHandle, path: str) -> bool:
    """A fetches ``path`` (stored in L2), then B, which has never seen it, answers from L2."""
    first = await a.get(path)
    assert first.status == 200, first
    await a.settle()
    second = await b.get(path)
    assert second.status == 200, second
    return second.x_cache == "HIT-L2"


async def test_failover_is_followed_without_errors_or_a_restart(
    origin: Origin, make_proxy: MakeProxy, sentinel_set: RedisSentinelSet
) -> None:
    origin.set_default(headers=CACHEABLE)
    env = {
        "REDIS_URL": sentinel_set.url,
        "SQLITE_PATH": "off",
        "BREAKER_COOLDOWN": "0.2",
        "PURGE_TOKEN": TOKEN,
    }
    a = await make_proxy(**env)
    b = await make_proxy(**env)
    assert await _l2_shared(a, b, "/before")
    assert _holds(sentinel_set.master.port, "/before", origin)
    assert a.state.invalidation.state == "connected"

    # More concurrent lookups than pooled connections: they wait for one (bounded), as on
    # one Redis, rather than failing.
    for i in range(20):
        await a.get(f"/pool/{i}")
    await a.settle()
    narrow = await make_proxy(**env, REDIS_MAX_CONNECTIONS=1)
    answers = await asyncio.gather(*(narrow.get(f"/pool/{i}") for i in range(20)))
    assert {(r.status, r.x_cache) for r in answers} == {(200, "HIT-L2")}, answers
    await narrow.close()

    statuses: list[int] = []
    stop = asyncio.Event()

    async def client(proxy: ProxyHandle, name: str) -> None:
        for i in range(10_000):  # bounded; ends when the failover is over
            if stop.is_set():
                return
            statuses.append((await proxy.get(f"/during/{name}/{i % 20}")).status)
            await asyncio.sleep(0.01)

    clients = [asyncio.create_task(client(proxy, name)) for proxy, name in ((a, "a"), (b, "b"))]
    try:
        await asyncio.sleep(0.2)
        sentinel_set.kill_master()
        await asyncio.to_thread(sentinel_set.wait_failover, 15.0)
        await asyncio.sleep(0.3)  # and a little after it
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert len(statuses) > 20
    assert set(statuses) == {200}, statuses

    # L2 on the promoted master, same proxies: shared again within a few attempts (the first
    # commands after the failover may still fail while the pools reconnect).
    shared = False
    for attempt in range(50):
        if await _l2_shared(a, b, f"/after/{attempt}"):
            shared = True
            break
        await asyncio.sleep(0.1)
    assert shared, "L2 never worked on the promoted master"
    path = f"/after/{attempt}"
    assert _holds(sentinel_set.replica.port, path, origin)

    # The purge channel followed the master too: a purge on A leaves B's L1.
    assert (await b.get(path)).x_cache == "HIT-L1"

    def subscribed() -> bool:
        return all(p.state.invalidation.state == "connected" for p in (a, b))

    await wait_for_condition(subscribed, timeout=10, message="resubscribed on the new master")
    purged = await a.request("PURGE", path, headers={"Authorization": f"Bearer {TOKEN}"})
    body = json.loads(purged.body)
    assert purged.status == 200 and body["replicas_acked"] == 2, body
    assert not _holds(sentinel_set.replica.port, path, origin)
    refetched = await b.get(path)
    assert refetched.status == 200 and refetched.x_cache == "MISS", refetched
