"""L2 on a real 3-master Redis Cluster (``redis+cluster://``).

Entries spread over every node; a second replica answers them from L2; purge by key and by tag
work (no command spans two slots) and reach the other replica's L1 over the purge channel.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
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


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterSet]:
    binary = find_redis_server()
    if binary is None:
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail("redis-server not found; CI=true so this is a failure", pytrace=False)
        pytest.skip("redis-server not found")
    servers = RedisClusterSet(binary, tmp_path / "cluster")
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


@pytest.fixture
def cluster_client(cluster: RedisClusterSet) -> Iterator[Any]:
    client = RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port, socket_timeout=2)
    try:
        yield client
    finally:
        client.close()


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
