"""Health and readiness: /readyz is 503 only when the proxy cannot serve at all.

The rule (tierproxy/admin.py): ready from the moment every tier is open until shutdown
begins. Tier states (up / degraded / breaker-open / disabled) are reported, never a reason to
be unready: the proxy still answers from other tiers, stale copies or with a fast 502/504.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
from support.fixture_types import MakeProxy, SpawnProxy
from support.origin import Origin
from support.redis_server import RedisServer

from tierproxy.config import load_settings
from tierproxy.server import build_app

from .conftest import AdminFor, parse_metrics, value


async def test_healthz_answers_while_the_loop_runs(
    make_proxy: MakeProxy, admin_for: AdminFor
) -> None:
    admin = await admin_for(await make_proxy())
    response = await admin.request("GET", "/healthz")
    assert (response.status, response.body) == (200, b"ok\n")


async def test_ready_with_every_tier_up(
    origin: Origin, make_proxy: MakeProxy, admin_for: AdminFor, redis_url: str
) -> None:
    admin = await admin_for(await make_proxy())

    status, body = await admin.readyz()

    assert status == 200, body
    assert body["ready"] is True
    assert body["tiers"] == {"l1": "up", "l2": "up", "l3": "up", "origin": "up"}
    assert body["invalidation"] == "connected"
    assert body["purge_lease"] == "held"
    assert body["inflight"] == 0 and body["background_tasks"] == 0


async def test_tiers_that_are_off_are_disabled_and_the_proxy_is_ready(
    make_proxy: MakeProxy, admin_for: AdminFor
) -> None:
    admin = await admin_for(await make_proxy(L1_MAX_BYTES=0, REDIS_URL=None, SQLITE_PATH="off"))

    status, body = await admin.readyz()

    assert status == 200, body
    assert body["tiers"] == {"l1": "disabled", "l2": "disabled", "l3": "disabled", "origin": "up"}
    assert body["invalidation"] == "disabled"
    assert body["purge_lease"] == "disabled"


async def test_degraded_then_breaker_open_redis_keeps_the_proxy_ready(
    origin: Origin,
    make_proxy: MakeProxy,
    admin_for: AdminFor,
    redis_server: RedisServer,
    redis_url: str,
) -> None:
    origin.set_default(headers={"Cache-Control": "no-store"})
    proxy = await make_proxy(
        L1_MAX_BYTES=0, L2_TIMEOUT=0.05, BREAKER_FAILURES=2, BREAKER_COOLDOWN=60
    )
    admin = await admin_for(proxy)

    with redis_server.frozen():
        assert (await proxy.get("/a")).status == 200
        degraded = await admin.readyz()
        assert (await proxy.get("/b")).status == 200
        opened = await admin.readyz()
        served = await proxy.get("/c")  # skipped L2 entirely: no wait on the frozen Redis

    assert degraded[0] == 200 and degraded[1]["tiers"]["l2"] == "degraded", degraded
    assert opened[0] == 200 and opened[1]["tiers"]["l2"] == "breaker-open", opened
    assert opened[1]["tiers"]["l3"] == "up"
    assert served.status == 200 and served.elapsed < 0.05 + 0.5, served


async def test_failing_origin_is_degraded_not_unready(
    origin: Origin, make_proxy: MakeProxy, admin_for: AdminFor
) -> None:
    origin.set_default(status=503)
    proxy = await make_proxy()
    admin = await admin_for(proxy)

    assert (await proxy.get("/down")).status == 503
    status, body = await admin.readyz()
    assert status == 200, body
    assert body["tiers"]["origin"] == "degraded"

    origin.set_default(status=200, headers={"Cache-Control": "no-store"})
    assert (await proxy.get("/up")).status == 200
    status, body = await admin.readyz()
    assert body["tiers"]["origin"] == "up", body


async def test_not_ready_before_start_up_and_after_shutdown_begins(
    origin: Origin, sqlite_path: Path, make_proxy: MakeProxy, admin_for: AdminFor
) -> None:
    unstarted = build_app(
        load_settings({"TIERPROXY_ORIGIN": origin.url, "TIERPROXY_SQLITE_PATH": str(sqlite_path)})
    )
    status, body = await (await admin_for(unstarted)).readyz()
    assert status == 503 and body["ready"] is False, body

    proxy = await make_proxy()
    admin = await admin_for(proxy)
    assert (await admin.readyz())[0] == 200
    await proxy.close()  # runs the app's cleanup: shutdown has begun (and ended)
    status, body = await admin.readyz()
    assert status == 503 and body["ready"] is False, body
    # Liveness is separate: the loop still answers.
    assert (await admin.request("GET", "/healthz")).status == 200


async def test_spawned_proxy_serves_health_readiness_and_metrics_on_the_admin_port(
    origin: Origin, spawn_proxy: SpawnProxy, redis_url: str
) -> None:
    proc = await spawn_proxy()
    async with aiohttp.ClientSession() as session:
        async with session.get(proc.admin_url + "/readyz") as resp:
            assert resp.status == 200
            body = await resp.json()
        async with session.get(proc.admin_url + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        # The admin listener never proxies.
        async with session.get(proc.admin_url + "/some/path") as resp:
            assert resp.status == 404
    assert body["tiers"] == {"l1": "up", "l2": "up", "l3": "up", "origin": "up"}, body
    assert body["invalidation"] == "connected", body
    assert value(parse_metrics(text), "tierproxy_invalidation_connected") == 1
    assert origin.count() == 0
