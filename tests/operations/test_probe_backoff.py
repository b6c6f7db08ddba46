"""Background health probes back off while a tier keeps failing them (tierproxy.probes).

A real redis-server frozen (SIGSTOP) or killed: the L2 lookups' breaker opens, and the
probes of the dead Redis come at exponentially growing, jittered intervals, capped at half a
cool-down, on the proxy's (stepped) clock - each failed probe re-arming the breaker's
cool-down, so no client request is let through to find out. Redis back (SIGCONT, or
restarted): the next probe closes the breaker and ends the backoff, with no request at all.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any

import pytest
from support.clock import SteppedClock
from support.fixture_types import MakeProxy
from support.origin import Origin
from support.redis_server import RedisServer
from support.storage import redis_key
from support.wait import wait_for_condition

from .conftest import Admin, AdminFor, value

CACHEABLE = {"Cache-Control": "max-age=300"}
COOLDOWN = 32.0  # backoff windows of 4, 8, 16, 16... s on the stepped clock; looks every <= 0.25 s
BASE, CAP = COOLDOWN / 8, COOLDOWN / 2
L2_TIMEOUT = 0.3


async def _probes(admin: Admin) -> float:
    samples = await admin.metrics()
    return sum(
        value(samples, "tierproxy_tier_probes_total", tier="l2", outcome=outcome)
        for outcome in ("timeout", "error", "failed")
    )


async def _wait_probes(admin: Admin, count: int) -> None:
    async def reached() -> bool:
        return await _probes(admin) >= count

    await wait_for_condition(reached, timeout=5, message=f"{count} failed probes")


@pytest.mark.parametrize("fault", ["frozen", "killed"])
async def test_probes_of_a_dead_redis_back_off_and_the_first_answer_closes_the_breaker(
    fault: str,
    origin: Origin,
    make_proxy: MakeProxy,
    admin_for: AdminFor,
    redis_server: RedisServer,
    redis_url: str,
    redis_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tierproxy")
    clock = SteppedClock()
    proxy = await make_proxy(
        clock=clock,
        L1_MAX_BYTES=0,
        SQLITE_PATH="off",
        L2_TIMEOUT=L2_TIMEOUT,
        BREAKER_FAILURES=1,
        BREAKER_COOLDOWN=COOLDOWN,
    )
    admin = await admin_for(proxy)
    origin.set_default(headers=CACHEABLE)
    assert (await proxy.get("/p")).x_cache == "MISS"
    await wait_for_condition(
        partial(redis_client.exists, redis_key("/p", origin.url)), message="L2"
    )
    outcome = "timeout" if fault == "frozen" else "error"

    try:
        if fault == "frozen":
            redis_server.freeze()
        else:
            redis_server.kill()
        assert (await proxy.get("/q")).status == 200  # its lookup fails: the breaker opens
        opened = clock.monotonic()
        assert (await admin.readyz())[1]["tiers"]["l2"] == "breaker-open"
        await _wait_probes(admin, 1)  # the first probe goes at the first look

        samples = await admin.metrics()
        lookups_failed = value(samples, "tierproxy_tier_lookups_total", tier="l2", outcome=outcome)
        windows = []
        for failures in range(1, 7):
            samples = await admin.metrics()
            assert value(samples, "tierproxy_tier_probe_failures", tier="l2") == failures
            wait = value(samples, "tierproxy_tier_probe_backoff_seconds", tier="l2")
            window = min(CAP, BASE * 2 ** (failures - 1))
            assert window / 2 <= wait <= window, (failures, wait)  # equal jitter
            windows.append(wait)
            # No probe before the wait is over: a few looks pass (each <= 0.25 s apart).
            # (The stepped clock moves in real time too: 1.2 s of room for 0.6 s of sleep.)
            clock.advance(wait - 1.2)
            await asyncio.sleep(0.6)
            assert await _probes(admin) == failures
            clock.advance(1.2)
            await _wait_probes(admin, failures + 1)

        # More than a cool-down since the breaker opened, yet no request was let through to
        # the dead Redis as the half-open probe: each failed probe re-armed the cool-down.
        assert clock.monotonic() - opened > COOLDOWN, windows
        for i in range(3):
            assert (await proxy.get(f"/r{i}")).status == 200
        samples = await admin.metrics()
        assert (
            value(samples, "tierproxy_tier_lookups_total", tier="l2", outcome=outcome)
            == lookups_failed
        )
        assert value(samples, "tierproxy_tier_probes_total", tier="l2", outcome="ok") == 0
        wait = value(samples, "tierproxy_tier_probe_backoff_seconds", tier="l2")
    finally:
        if fault == "frozen":
            redis_server.thaw()
        else:
            redis_server.restart()

    # Redis is back: nothing happens until the backoff is over, then the probe closes the
    # breaker with no client request at all.
    requests_before = origin.count()
    clock.advance(wait)

    async def l2_closed() -> bool:
        return value(await admin.metrics(), "tierproxy_breaker_open", tier="l2") == 0

    await wait_for_condition(l2_closed, timeout=5, message="a probe to close the breaker")
    # (Its writes' breaker, opened by a failed backfill, finds out for itself: "degraded".)
    assert (await admin.readyz())[1]["tiers"]["l2"] in ("up", "degraded")
    samples = await admin.metrics()
    assert value(samples, "tierproxy_tier_probes_total", tier="l2", outcome="ok") == 1
    assert value(samples, "tierproxy_tier_probe_failures", tier="l2") == 0
    assert value(samples, "tierproxy_tier_probe_backoff_seconds", tier="l2") == 0
    assert origin.count() == requests_before

    response = await proxy.get("/p")
    assert response.x_cache == ("HIT-L2" if fault == "frozen" else "MISS"), response

    # Each change said once: the backoff starting, the breaker closing.
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("tierproxy")]
    started = [m for m in messages if "probing again with backoff" in m]
    closed = [m for m in messages if "breaker closed: a background probe answered" in m]
    assert len(started) == 1 and len(closed) == 1, messages
