"""L2 (Redis) slow, frozen, dead or restarted: requests are still served, within budget.

Faults: SIGSTOP/SIGCONT and SIGKILL+restart of the real redis-server, and the TCP fault
proxy (blackhole / reset) in front of it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any, Literal

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from support.faultproxy import FaultProxy
from support.fixture_types import MakeFaultProxy, MakeProxy
from support.origin import Origin
from support.purge_log import past_purge_log_start
from support.redis_server import RedisServer
from support.storage import redis_key, sqlite_row
from support.wait import wait_for_condition

L2_TIMEOUT = 0.1
L3_TIMEOUT = 0.5
SLACK = 0.5
CACHEABLE = {"Cache-Control": "max-age=300"}
# How Redis is made unavailable: SIGSTOP, SIGKILL, or a fault-proxy mode in front of it.
Unavailable = Literal["frozen", "killed", "blackhole", "reset"]


async def _fill_l2_and_l3(
    make_proxy: MakeProxy,
    origin: Origin,
    redis_client: Any,
    sqlite_path: Path,
    paths: list[str],
    **env: Any,
) -> dict[str, bytes]:
    origin.set_default(headers=CACHEABLE)
    writer = await make_proxy(**env)
    await past_purge_log_start(writer)  # so that a later process trusts these L3 copies
    bodies: dict[str, bytes] = {}
    for path in paths:
        response = await writer.get(path)
        assert response.x_cache == "MISS", response
        bodies[path] = response.body
    for path in paths:
        await wait_for_condition(
            partial(redis_client.exists, redis_key(path, origin.url)), message="L2"
        )
        await wait_for_condition(partial(sqlite_row, sqlite_path, path, origin.url), message="L3")
    await writer.close()
    return bodies


@contextlib.asynccontextmanager
async def _redis_unavailable(
    kind: Unavailable, redis_server: RedisServer, front: FaultProxy
) -> AsyncIterator[None]:
    if kind == "frozen":
        with redis_server.frozen():
            yield
    elif kind == "killed":
        redis_server.kill()
        yield
    else:  # the fault proxy in front of Redis
        front.set_mode(kind)
        try:
            yield
        finally:
            front.set_mode("pass")


@pytest.mark.parametrize("kind", ["frozen", "killed", "blackhole", "reset"])
async def test_requests_are_served_from_l3_within_budget_while_redis_is_unavailable(
    kind: Unavailable,
    origin: Origin,
    make_proxy: MakeProxy,
    redis_server: RedisServer,
    redis_url: str,
    redis_client: Any,
    sqlite_path: Path,
    fault_proxy: MakeFaultProxy,
) -> None:
    front = await fault_proxy(redis_server.port)
    env = {
        "REDIS_URL": front.url("redis", "/0"),
        "L2_TIMEOUT": L2_TIMEOUT,
        "L3_TIMEOUT": L3_TIMEOUT,
    }
    paths = [f"/f{i}" for i in range(5)]
    bodies = await _fill_l2_and_l3(make_proxy, origin, redis_client, sqlite_path, paths, **env)
    proxy = await make_proxy(**env)  # a fresh process: empty L1
    budget = L2_TIMEOUT + L3_TIMEOUT + SLACK

    async with _redis_unavailable(kind, redis_server, front):
        for path in paths:
            response = await proxy.get(path)
            assert response.status == 200, response
            assert response.x_cache == "HIT-L3", response
            assert response.body == bodies[path]
            assert response.elapsed <= budget, (kind, response)
        fresh = await proxy.get("/not-cached")
        assert fresh.status == 200 and fresh.x_cache == "MISS", fresh
        assert fresh.elapsed <= budget + SLACK, (kind, fresh)

    assert origin.count() == len(paths) + 1


async def test_l2_is_used_again_after_redis_restarts_and_the_breaker_cools_down(
    origin: Origin,
    make_proxy: MakeProxy,
    redis_server: RedisServer,
    redis_url: str,
    redis_client: Any,
    sqlite_path: Path,
) -> None:
    origin.set_default(headers=CACHEABLE)
    proxy = await make_proxy(
        L1_MAX_BYTES=0, L2_TIMEOUT=L2_TIMEOUT, BREAKER_FAILURES=2, BREAKER_COOLDOWN=0.5
    )
    assert (await proxy.get("/k")).x_cache == "MISS"
    await wait_for_condition(lambda: sqlite_row(sqlite_path, "/k", origin.url), message="L3 fill")
    await wait_for_condition(
        lambda: redis_client.exists(redis_key("/k", origin.url)), message="L2 fill"
    )

    redis_server.kill()
    for i in range(5):  # enough failures to open the breaker; every request still served
        response = await proxy.get("/k" if i % 2 else f"/n{i}")
        assert response.status == 200, response
        assert response.elapsed <= L2_TIMEOUT + L3_TIMEOUT + SLACK, response

    redis_server.restart()  # empty: the copy must reach L2 again once the breaker lets it

    async def served_from_l2() -> bool:
        return (await proxy.get("/k")).x_cache == "HIT-L2"

    await wait_for_condition(served_from_l2, timeout=8, interval=0.1, message="HIT-L2 again")
    # Redis came back without its purge log: the L3 copy, which might have been purged
    # meanwhile, was revalidated once (tierproxy.invalidation) before it went back to L2.
    assert origin.count("/k") == 2


async def test_cancelled_redis_reads_never_answer_another_keys_request(
    origin: Origin,
    make_proxy: MakeProxy,
    redis_server: RedisServer,
    redis_url: str,
    redis_client: Any,
) -> None:
    """redis-py#2665 / CVE-2023-28858: a cancelled read must not poison the pool."""
    origin.set_default(headers=CACHEABLE)
    proxy = await make_proxy(
        L1_MAX_BYTES=0, SQLITE_PATH="off", L2_TIMEOUT=L2_TIMEOUT, BREAKER_FAILURES=100000
    )
    paths = [f"/c{i}" for i in range(20)]
    for path in paths:
        assert (await proxy.get(path)).x_cache == "MISS"
    for path in paths:
        await wait_for_condition(
            partial(redis_client.exists, redis_key(path, origin.url)), message="L2"
        )

    with redis_server.frozen():
        # Every L2 read times out (is cancelled) mid-command; the origin answers instead.
        during = await asyncio.gather(*(proxy.get(p) for p in paths))
        assert all(r.status == 200 for r in during), during

    for _round in range(3):
        after = await asyncio.gather(*(proxy.get(p) for p in paths))
        for path, response in zip(paths, after):
            assert response.status == 200, response
            assert response.body.startswith(f"origin body for {path} (".encode()), (path, response)
    assert [r.x_cache for r in after].count("HIT-L2") == len(paths), after


async def test_redis_client_cancellations_do_not_poison_or_exhaust_the_pool(
    redis_server: RedisServer, redis_url: str
) -> None:
    """The same regression against redis-py directly, configured as tierproxy configures it."""
    client = aioredis.from_url(
        redis_url,
        socket_timeout=0.2,
        socket_connect_timeout=0.2,
        retry=Retry(NoBackoff(), 0),
        max_connections=200,
    )
    try:
        await client.mset({f"k{i}": f"v{i}" for i in range(100)})

        async def cancelled_get(i: int) -> None:
            with contextlib.suppress(TimeoutError, redis.RedisError):
                async with asyncio.timeout(0.02):
                    await client.get(f"k{i}")

        with redis_server.frozen():
            for _batch in range(10):  # 1,000 cancellations
                await asyncio.gather(*(cancelled_get(i) for i in range(100)))

        # After SIGCONT Redis first works through the backlog of abandoned connections, so a
        # later command may still time out: that is allowed, a wrong value never is.
        expected = [f"v{i}".encode() for i in range(100)]
        clean_rounds = 0

        async def three_clean_rounds() -> bool:
            nonlocal clean_rounds
            got = await asyncio.gather(
                *(client.get(f"k{i}") for i in range(100)), return_exceptions=True
            )
            wrong = [
                (i, value)
                for i, value in enumerate(got)
                if not isinstance(value, Exception) and value != expected[i]
            ]
            assert wrong == [], f"replies delivered to the wrong command: {wrong[:5]}"
            clean_rounds = clean_rounds + 1 if got == expected else 0
            return clean_rounds >= 3

        await wait_for_condition(three_clean_rounds, timeout=10, interval=0.05)

        checker = redis.Redis.from_url(redis_url, socket_timeout=2)
        try:
            await wait_for_condition(
                lambda: checker.info("clients")["connected_clients"] <= 200 + 1,
                message="Redis client connections bounded by the pool",
            )
        finally:
            checker.close()
    finally:
        await client.aclose()
