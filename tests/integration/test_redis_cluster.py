"""L2 on a real 3-master Redis Cluster (``redis+cluster://``).

Entries spread over every node; a second replica answers them from L2; purge by key and by tag
work (no command spans two slots) and reach the other replica's L1 over the purge channel.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.cluster import RedisCluster
from support.fixture_types import MakeProxy
from support.origin import Origin
from support.proxy import ProxyHandle
from support.redis_server import RedisClusterSet, find_redis_server
from support.storage import redis_key
from support.wait import wait_for_condition

CACHEABLE = {"Cache-Control": "max-age=300", "Surrogate-Key": "group"}
TOKEN = "test-purge-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PATHS = [f"/e/{i}" for i in range(24)]


@pytest.fixture(scope="module")
def cluster_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterSet]:
    binary = find_redis_server()
    if binary is None:
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail("redis-server not found; CI=true so this is a failure", pytrace=False)
        pytest.skip("redis-server not found")
    servers = RedisClusterSet(binary, tmp_path_factory.mktemp("cluster"))
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


@pytest.fixture
def cluster_client(cluster_servers: RedisClusterSet) -> Iterator[Any]:
    client = RedisCluster(host="127.0.0.1", port=cluster_servers.nodes[0].port, socket_timeout=2)
    try:
        client.flushall(target_nodes=RedisCluster.PRIMARIES)
        yield client
    finally:
        client.close()


@pytest.fixture
def cluster(cluster_servers: RedisClusterSet, cluster_client: Any) -> RedisClusterSet:
    """The cluster, emptied."""
    return cluster_servers


@pytest.fixture
async def admin_clients() -> AsyncIterator[list[TestClient[Any, Any]]]:
    clients: list[TestClient[Any, Any]] = []
    try:
        yield clients
    finally:
        for client in clients:
            await client.close()


async def _connected(*proxies: ProxyHandle) -> None:
    def connected() -> bool:
        return all(proxy.state.invalidation.state == "connected" for proxy in proxies)

    await wait_for_condition(connected, timeout=10, message="subscribed to the purge channel")


async def test_entries_spread_are_shared_and_purged_by_key_and_tag(
    origin: Origin,
    make_proxy: MakeProxy,
    cluster: RedisClusterSet,
    cluster_client: Any,
    admin_clients: list[TestClient[Any, Any]],
) -> None:
    from tierproxy.admin import build_admin_app

    origin.set_default(headers=CACHEABLE)
    env = {"REDIS_URL": cluster.url, "SQLITE_PATH": "off", "PURGE_TOKEN": TOKEN}
    a = await make_proxy(**env)
    b = await make_proxy(**env)
    await _connected(a, b)

    for path in PATHS:
        assert (await a.get(path)).x_cache == "MISS"
    await a.settle()
    names = [redis_key(path, origin.url) for path in PATHS]
    assert all(cluster_client.exists(name) for name in names)
    ports = {cluster_client.get_node_from_key(name).port for name in names}
    assert ports == {node.port for node in cluster.nodes}, "entries on every node"

    for path in PATHS:
        hit = await b.get(path)
        assert hit.status == 200 and hit.x_cache == "HIT-L2", hit
    assert (await b.get(PATHS[0])).x_cache == "HIT-L1"
    assert origin.count(PATHS[0]) == 1

    # Purge by key on A: gone from L2 and from B's L1 (the purge channel on a cluster).
    purged = await a.request("PURGE", PATHS[0], headers=AUTH)
    body = json.loads(purged.body)
    assert purged.status == 200 and body["replicas_acked"] == 2, body
    assert not cluster_client.exists(names[0])
    again = await b.get(PATHS[0])
    assert again.status == 200 and again.x_cache == "MISS", again
    await b.settle()

    # Purge by tag on B (admin API): every tagged entry, on every node, and A's L1 copies.
    admin: TestClient[Any, Any] = TestClient(TestServer(build_admin_app(b.app), host="127.0.0.1"))
    await admin.start_server()
    admin_clients.append(admin)
    resp = await admin.post("/purge", json={"tags": ["group"]}, headers=AUTH)
    tag_body = await resp.json()
    assert resp.status == 200 and tag_body["replicas_acked"] == 2, tag_body
    assert not any(cluster_client.exists(name) for name in names)
    for path in PATHS[1:4]:
        refetched = await a.get(path)
        assert refetched.status == 200 and refetched.x_cache == "MISS", refetched
        assert origin.count(path) == 2


async def test_writes_are_fenced_and_tag_sets_pruned_on_a_cluster(
    cluster: RedisClusterSet, cluster_client: Any
) -> None:
    """Every command on one slot: the fence is the lease end the purge log's node confirmed,
    and large tag sets lose members whose entry is gone, one EXISTS per member."""
    import asyncio
    import time

    from tierproxy.entry import Entry
    from tierproxy.keys import KeySpace
    from tierproxy.tiers.base import Blob, TierUnavailable
    from tierproxy.tiers.redis import RedisTier

    keys = KeySpace("http://origin.test")
    tier = RedisTier(cluster.url, socket_timeout=1.0, max_connections=4, keys=keys)
    tier.fence_id = "replica-1"

    def entry(path: str) -> Entry:
        now = time.time()
        return Entry(
            key=path,
            status=200,
            headers=(),
            body=b"x",
            stored_at=now,
            fresh_until=now + 60,
            stale_until=now + 60,
            swr_until=now,
            expires_at=now + 60,
            tags=("t",),
        )

    try:
        key = keys.key("/f")
        with pytest.raises(TierUnavailable):
            await tier.set(key, entry("/f"), Blob(entry("/f")))  # no lease yet
        assert not cluster_client.exists(tier.entry_name(key))
        await tier.purge_log().heartbeat("replica-1", 300, "0-0")  # a lease of 0.3 s
        await tier.set(key, entry("/f"), Blob(entry("/f")))
        assert cluster_client.exists(tier.entry_name(key))
        assert cluster_client.smembers(tier.tag_name("t")) == {key.digest.encode()}
        await asyncio.sleep(0.4)  # real time: the lease, as Redis keeps it, runs out
        with pytest.raises(TierUnavailable):
            await tier.set(keys.key("/g"), entry("/g"), Blob(entry("/g")))
        assert not cluster_client.exists(tier.entry_name(keys.key("/g")))

        await tier.purge_log().heartbeat("replica-1", 60_000, "0-0")
        paths = [f"/p/{i}" for i in range(70)]
        for path in paths:
            await tier.set(keys.key(path), entry(path), Blob(entry(path)))
        tag = tier.tag_name("t")
        assert cluster_client.scard(tag) == 71
        for path in paths[:60]:
            cluster_client.delete(tier.entry_name(keys.key(path)))
        for i in range(3):
            await tier.set(keys.key(f"/q/{i}"), entry(f"/q/{i}"), Blob(entry(f"/q/{i}")))
        assert cluster_client.scard(tag) < 70  # dead members pruned
        live = ["/f", *paths[60:], "/q/0", "/q/1", "/q/2"]
        assert all(cluster_client.exists(tier.entry_name(keys.key(p))) for p in live)
        members = {m.decode() for m in cluster_client.smembers(tag)}
        assert {keys.key(p).digest for p in live} <= members, len(members)
        assert await tier.purge([], ["t"], None) == 14  # /f, /p/60-69, /q/0-2
        assert not cluster_client.exists(tag)
    finally:
        await tier.close()
