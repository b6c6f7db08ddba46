"""``python -m tierproxy serve`` as a real process: configuration errors, start-up failures,
the admin listener, graceful SIGTERM (in-flight requests finish, backfills are drained).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.fixture_types import MakeFaultProxy, MakeProxy, SpawnProxy
from support.origin import Origin
from support.proxy import SpawnedProxy, fetch
from support.redis_server import RedisServer
from support.storage import redis_key, sqlite_exclusive_lock, sqlite_row
from support.wait import wait_for_condition

CACHEABLE = {"Cache-Control": "max-age=300"}


def _stderr_lines(proc: SpawnedProxy) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


BAD_ENV = [
    pytest.param("TIERPROXY_ORIGIN_TIMEOUT", "-1", id="negative-timeout"),
    pytest.param("TIERPROXY_L2_TIMEOUT", "abc", id="non-number-timeout"),
    pytest.param("TIERPROXY_ORIGIN", "ftp://x", id="ftp-origin"),
    pytest.param("TIERPROXY_ORIGIN", None, id="missing-origin"),
    pytest.param("TIERPROXY_MAX_ENTRY_BYTES", "lots", id="non-number-size"),
    pytest.param("TIERPROXY_PORT", "http", id="non-number-port"),
    pytest.param("TIERPROXY_REDIS_URL", "memcached://127.0.0.1:1", id="bad-redis-scheme"),
]


@pytest.mark.parametrize(("name", "value"), BAD_ENV)
async def test_bad_configuration_exits_2_with_one_line_naming_the_variable(
    name: str, value: str | None, spawn_proxy: SpawnProxy
) -> None:
    proc = await spawn_proxy(wait_healthy=False, **{name: value})

    code = await proc.wait(15)

    assert code == 2, proc.stderr
    lines = _stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert name in lines[0], lines[0]
    if value:
        assert value in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("which", ["PORT", "ADMIN_PORT"])
async def test_port_already_taken_stops_start_up_with_a_clear_error(
    which: str, spawn_proxy: SpawnProxy
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = await spawn_proxy(wait_healthy=False, **{which: port})

        code = await proc.wait(15)

    assert code != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert str(port) in proc.stderr or f"TIERPROXY_{which}" in proc.stderr, proc.stderr


async def test_unwritable_sqlite_path_stops_start_up_with_a_clear_error(
    spawn_proxy: SpawnProxy, tmp_path: Path
) -> None:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("I am a file, not a directory")
    proc = await spawn_proxy(wait_healthy=False, SQLITE_PATH=not_a_dir / "cache.sqlite3")

    code = await proc.wait(15)

    assert code != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "TIERPROXY_SQLITE_PATH" in proc.stderr or str(not_a_dir) in proc.stderr, proc.stderr


async def test_served_process_caches_and_admin_listener_is_never_proxied(
    origin: Origin, spawn_proxy: SpawnProxy
) -> None:
    origin.set_default(headers=CACHEABLE)
    proc = await spawn_proxy()

    async with aiohttp.ClientSession() as session:
        miss = await fetch(session, "GET", proc.url + "/a")
        hit = await fetch(session, "GET", proc.url + "/a")
        health = await fetch(session, "GET", proc.admin_url + "/healthz")
        ready = await fetch(session, "GET", proc.admin_url + "/readyz")
        stray = await fetch(session, "GET", proc.admin_url + "/a")

    assert (miss.x_cache, hit.x_cache) == ("MISS", "HIT-L1"), (miss, hit)
    assert health.status == 200
    assert ready.status in (200, 503)
    assert ready.headers["Content-Type"].startswith("application/json"), ready
    assert stray.status == 404, stray
    assert origin.count() == 1


async def test_sigterm_lets_an_in_flight_request_finish_and_exits_0(
    origin: Origin, spawn_proxy: SpawnProxy
) -> None:
    origin.set("/slow", latency=0.5)
    proc = await spawn_proxy()

    async with aiohttp.ClientSession() as session:
        in_flight = asyncio.ensure_future(fetch(session, "GET", proc.url + "/slow"))
        await wait_for_condition(lambda: origin.count("/slow") == 1, message="origin reached")
        proc.terminate()
        response = await in_flight

    assert response.status == 200, response
    assert response.body == b"origin body for /slow (request 1)"
    assert await proc.wait(15) == 0, proc.stderr


async def test_sigterm_drains_pending_backfills_then_exits_0(
    origin: Origin,
    spawn_proxy: SpawnProxy,
    redis_server: RedisServer,
    redis_url: str,
    redis_client: Any,
    sqlite_path: Path,
    fault_proxy: MakeFaultProxy,
) -> None:
    origin.set_default(headers=CACHEABLE)
    slow_redis = await fault_proxy(redis_server.port, mode="delay", delay=0.15)
    # Lookups and writes get time to spare on the slow link (0.3 s a round trip; a new
    # redis-py connection for the writes takes several): this tests draining, not timeouts.
    proc = await spawn_proxy(
        REDIS_URL=slow_redis.url("redis", "/0"), L2_TIMEOUT=2, L2_WRITE_TIMEOUT=5
    )
    paths = [f"/d{i}" for i in range(20)]

    async with aiohttp.ClientSession() as session:
        responses = await asyncio.gather(*(fetch(session, "GET", proc.url + p) for p in paths))
        assert [r.status for r in responses] == [200] * len(paths), responses
        proc.terminate()  # at once: the L2 writes (≥ 0.3 s each through the slow link) pend
        code = await proc.wait(15)

    assert code == 0, proc.stderr
    missing_l3 = [p for p in paths if sqlite_row(sqlite_path, p, origin.url) is None]
    missing_l2 = [p for p in paths if not redis_client.exists(redis_key(p, origin.url))]
    assert missing_l3 == [], proc.stderr
    assert missing_l2 == [], proc.stderr


async def test_backfill_pending_on_a_locked_l3_lands_when_drained(
    origin: Origin, make_proxy: MakeProxy, sqlite_path: Path
) -> None:
    origin.set_default(headers=CACHEABLE)
    proxy = await make_proxy(L1_MAX_BYTES=0)
    await proxy.get("/warm")
    await wait_for_condition(
        lambda: sqlite_row(sqlite_path, "/warm", origin.url), message="L3 fill"
    )

    with sqlite_exclusive_lock(sqlite_path):
        response = await proxy.get("/pending")
        assert response.status == 200, response
        assert response.elapsed < 1.0, response  # the client never waits for a backfill
        assert proxy.state.background.pending >= 1
        assert sqlite_row(sqlite_path, "/pending", origin.url) is None

    await proxy.drain(5)
    assert proxy.state.background.pending == 0
    assert sqlite_row(sqlite_path, "/pending", origin.url) is not None


@pytest.mark.parametrize(
    ("l2", "shutdown_timeout", "origin_asked"),
    [
        # The origin hangs: aiohttp waited the timeout, then the timeout again after "asking"
        # the handler to stop, which it does not notice.
        pytest.param(False, 2, True, id="origin-hangs"),
        # 2.2 s more of L2 lookup (no reply), then handed over to the hanging origin.
        pytest.param(True, 3, True, id="lookup-then-origin"),
        # The lookup outlasts the timeout: cut then, not left to wait without bound.
        pytest.param(True, 1, False, id="lookup-outlasts-timeout"),
    ],
)
async def test_sigterm_cuts_a_request_in_flight_at_the_shutdown_timeout(
    origin: Origin,
    spawn_proxy: SpawnProxy,
    redis_server: RedisServer,
    fault_proxy: MakeFaultProxy,
    l2: bool,
    shutdown_timeout: float,
    origin_asked: bool,
) -> None:
    """TIERPROXY_SHUTDOWN_TIMEOUT bounds how long a request in flight holds the shutdown, in
    all, wherever the request is: looked up by the hit path, then handed over to the full
    path, then waiting on the origin. That took up to three timeouts (the lookup's wait,
    then aiohttp's two), so a Kubernetes grace period sized for the timeout was cut short by
    SIGKILL. A lookup that outlasts the whole timeout leaves the rest no time, which must
    not become "no limit" (aiohttp's reading of a timeout of 0)."""
    origin.set("/hang", hang=True, headers=CACHEABLE)
    env: dict[str, Any] = {
        "SHUTDOWN_TIMEOUT": shutdown_timeout,
        "ORIGIN_TIMEOUT": 30,
        "REQUEST_DEADLINE": 30,
    }
    blackhole = None
    if l2:
        blackhole = await fault_proxy(redis_server.port)
        env.update(REDIS_URL=blackhole.url("redis", "/0"), L2_TIMEOUT=2.5)
    proc = await spawn_proxy(**env)
    if blackhole is not None:
        blackhole.set_mode("blackhole")  # the L2 lookup gets no reply: it waits its 2.5 s
    loop = asyncio.get_running_loop()

    async with aiohttp.ClientSession() as session:
        in_flight = asyncio.ensure_future(
            session.get(proc.url + "/hang", timeout=aiohttp.ClientTimeout(total=20))
        )
        await asyncio.sleep(0.3)  # in the L2 lookup, or (no L2) waiting on the origin
        assert origin.count("/hang") == (0 if l2 else 1)
        proc.terminate()
        terminated = loop.time()
        with contextlib.suppress(aiohttp.ClientError):
            response = await in_flight
            assert response.status >= 500, response  # (never a 200 of a cut-off body)
            response.release()
        cut_after = loop.time() - terminated

    assert origin.count("/hang") == (1 if origin_asked else 0)
    # One timeout from SIGTERM, with slack either side.
    assert shutdown_timeout - 0.2 <= cut_after <= shutdown_timeout + 0.8, cut_after
    assert await proc.wait(15) == 0, proc.stderr
