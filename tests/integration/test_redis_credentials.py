"""Redis credentials: TIERPROXY_REDIS_PASSWORD (or the URL's), used by every connection and
never written to a log line or a start-up error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis
from support.fixture_types import SpawnProxy
from support.origin import Origin
from support.proxy import fetch
from support.redis_server import RedisServer, find_redis_server
from support.storage import redis_key
from support.wait import wait_for_condition

PASSWORD = "sekrit-redis-pw-42"
CACHEABLE = {"Cache-Control": "max-age=300"}


@pytest.fixture
def auth_redis(tmp_path: Path) -> Iterator[RedisServer]:
    binary = find_redis_server()
    if binary is None:
        pytest.skip("redis-server not found")
    server = RedisServer(binary, tmp_path / "auth-redis", extra_args=["--requirepass", PASSWORD])
    try:
        server.start()
        yield server
    finally:
        server.stop()


async def test_password_from_the_variable_is_used_and_never_logged(
    origin: Origin, spawn_proxy: SpawnProxy, auth_redis: RedisServer
) -> None:
    origin.set_default(headers=CACHEABLE)
    url = f"redis://127.0.0.1:{auth_redis.port}/0"
    env = {"REDIS_URL": url, "REDIS_PASSWORD": PASSWORD, "LOG_LEVEL": "DEBUG", "SQLITE_PATH": "off"}
    a = await spawn_proxy(**env)
    b = await spawn_proxy(**env)
    wrong = await spawn_proxy(
        REDIS_URL=f"redis://:{PASSWORD}-wrong@127.0.0.1:{auth_redis.port}/0",
        LOG_LEVEL="DEBUG",
        SQLITE_PATH="off",
    )
    client = redis.Redis(host="127.0.0.1", port=auth_redis.port, password=PASSWORD)
    try:
        async with aiohttp.ClientSession() as session:
            assert (await fetch(session, "GET", a.url + "/a")).x_cache == "MISS"
            await wait_for_condition(
                lambda: client.exists(redis_key("/a", origin.url)), message="A's L2 copy"
            )
            # B's lookups (the pipelined reader) authenticate too.
            hit = await fetch(session, "GET", b.url + "/a")
            assert hit.status == 200 and hit.x_cache == "HIT-L2", hit
            # A wrong password: L2 unavailable, requests still answered.
            missed = await fetch(session, "GET", wrong.url + "/a")
            assert missed.status == 200, missed
    finally:
        client.close()
    for proc in (a, b, wrong):
        proc.terminate()
        await proc.wait()
        assert PASSWORD not in proc.stderr + proc.stdout
    assert "Redis" in wrong.stderr + wrong.stdout  # it did say L2 is unreachable


async def test_bad_url_is_a_one_line_start_up_error_without_the_password(
    spawn_proxy: SpawnProxy,
) -> None:
    proc = await spawn_proxy(
        wait_healthy=False, REDIS_URL=f"redis+sentinel://:{PASSWORD}@127.0.0.1:26390"
    )
    assert await proc.wait() == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "TIERPROXY_REDIS_URL" in lines[0] and "service_name" in lines[0], lines
    assert PASSWORD not in proc.stderr + proc.stdout
