"""Adaptive L2 timeouts and background health probes, against a real redis-server.

TIERPROXY_ADAPTIVE_TIMEOUTS=on: the L2 lookup timeout is learned from recent lookups
(tierproxy.latency). Fast local Redis: it settles at a few milliseconds. Redis slowed down
(the delay fault proxy): it climbs back up and L2 hits come back. Redis frozen (SIGSTOP): a
lookup gives up after about the learned timeout, not the configured one.

A tier whose lookups' breaker is open is probed in the background (tierproxy.probes): once
Redis answers again the breaker closes with no client request at all, and the next request
is an L2 hit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any

import pytest
from support.fixture_types import MakeFaultProxy, MakeProxy
from support.origin import Origin
from support.proxy import ProxyHandle
from support.redis_server import RedisServer
from support.storage import redis_key
from support.wait import wait_for_condition

from .conftest import Admin, AdminFor, value

CACHEABLE = {"Cache-Control": "max-age=300"}
WARM_UP = 300  # "a few hundred fast lookups"
# Real timing on a shared 2-core machine: what a lookup may take beyond its timeout.
SLACK = 0.05


async def _warm(proxy: ProxyHandle, origin: Origin, redis_client: Any, path: str) -> None:
    """``path`` stored in L2 (L1 and L3 are off), then WARM_UP L2 hits."""
    origin.set_default(headers=CACHEABLE)
    assert (await proxy.get(path)).x_cache == "MISS"
    await wait_for_condition(
        partial(redis_client.exists, redis_key(path, origin.url)), message="L2"
    )
    # A learned timeout cuts the slowest lookups short by design (p99 x 1.5): on a busy
    # machine a few of them may time out (then the origin answers), never many.
    answers = [(await proxy.get(path)).x_cache for _ in range(WARM_UP)]
    assert answers.count("HIT-L2") >= 0.95 * WARM_UP, answers


async def _l2_timeout(admin: Admin) -> float:
    """The effective L2 timeout, as /readyz and the gauge report it (they agree)."""
    status, body = await admin.readyz()
    assert status == 200, body
    gauge = value(await admin.metrics(), "tierproxy_tier_timeout_seconds", tier="l2")
    reported = float(body["timeouts"]["l2"])
    # Both read the same estimate; it may move between the two reads only if a lookup ran.
    assert gauge == reported, (gauge, reported)
    return reported


async def test_fast_lookups_settle_the_l2_timeout_at_a_few_milliseconds(
    origin: Origin, make_proxy: MakeProxy, admin_for: AdminFor, redis_url: str, redis_client: Any
) -> None:
    proxy = await make_proxy(ADAPTIVE_TIMEOUTS="on", L1_MAX_BYTES=0, SQLITE_PATH="off")
    admin = await admin_for(proxy)
    assert await _l2_timeout(admin) == 0.1  # nothing learned yet: the configured timeout

    await _warm(proxy, origin, redis_client, "/fast")

    learned = await _l2_timeout(admin)
    assert 0.002 <= learned < 0.02, learned
    _, body = await admin.readyz()
    assert body["timeouts"]["origin"] == 2.0
    assert value(await admin.metrics(), "tierproxy_tier_timeout_seconds", tier="origin") == 2.0


async def test_fixed_timeouts_are_reported_as_configured(
    make_proxy: MakeProxy, admin_for: AdminFor, redis_url: str
) -> None:
    admin = await admin_for(await make_proxy(L2_TIMEOUT=0.07, L3_TIMEOUT=0.3))
    _, body = await admin.readyz()
    assert body["timeouts"] == {"l1": 0.01, "l2": 0.07, "l3": 0.3, "origin": 2.0}, body
    assert value(await admin.metrics(), "tierproxy_tier_timeout_seconds", tier="l2") == 0.07


async def test_the_l2_timeout_climbs_back_when_redis_slows_down(
    origin: Origin,
    make_proxy: MakeProxy,
    admin_for: AdminFor,
    redis_server: RedisServer,
    redis_url: str,
    redis_client: Any,
    fault_proxy: MakeFaultProxy,
) -> None:
    front = await fault_proxy(redis_server.port)
    proxy = await make_proxy(
        ADAPTIVE_TIMEOUTS="on",
        REDIS_URL=front.url("redis", "/0"),
        L1_MAX_BYTES=0,
        SQLITE_PATH="off",
        L2_TIMEOUT=0.3,
        BREAKER_COOLDOWN=0.4,  # probes at most 0.1 s apart close a breaker the climb opens
    )
    admin = await admin_for(proxy)
    await _warm(proxy, origin, redis_client, "/slow")
    fast = await _l2_timeout(admin)
    delay = 0.015  # each way: a lookup now takes 30 ms and more
    # Learned through the fault proxy's extra hop (a Python relay): below what the delay
    # will take, which is what the climb needs. (Straight to Redis it settles below 20 ms:
    # test_fast_lookups_settle_the_l2_timeout_at_a_few_milliseconds.)
    assert fast < 2 * delay, fast

    front.set_mode("delay", delay)
    hits = 0
    for _ in range(100):  # bounded; each miss is answered by the (fast) origin meanwhile
        response = await proxy.get("/slow")
        assert response.status == 200, response
        if response.x_cache == "HIT-L2":
            hits += 1
            assert response.elapsed >= 2 * delay, response
            if hits >= 5:
                break
        else:
            await asyncio.sleep(0.02)  # room for a background probe to close the breaker
    climbed = await _l2_timeout(admin)
    assert hits >= 5, (hits, climbed)
    assert climbed > 2 * delay, (fast, climbed)
    # The way up: lookups timed out at the learned timeout until the breaker opened, and a
    # background probe that answered in the new latency lifted the timeout above it (a
    # timeout alone does not widen the next one).
    samples = await admin.metrics()
    assert value(samples, "tierproxy_tier_probes_total", tier="l2", outcome="ok") >= 1
    assert value(samples, "tierproxy_tier_lookups_total", tier="l2", outcome="timeout") >= 5


async def test_a_frozen_redis_costs_a_lookup_the_learned_timeout_not_the_configured_one(
    origin: Origin,
    make_proxy: MakeProxy,
    admin_for: AdminFor,
    redis_server: RedisServer,
    redis_url: str,
    redis_client: Any,
) -> None:
    configured = 0.5
    proxy = await make_proxy(
        ADAPTIVE_TIMEOUTS="on",
        L1_MAX_BYTES=0,
        SQLITE_PATH="off",
        L2_TIMEOUT=configured,
        BREAKER_FAILURES=5,
        BREAKER_COOLDOWN=60,
    )
    admin = await admin_for(proxy)
    await _warm(proxy, origin, redis_client, "/frozen")
    learned = await _l2_timeout(admin)
    # A few ms when the machine is idle (the settle test holds it under 20 ms); with the
    # CPU contended it learns more - what matters here is that it is far below 0.5 s.
    assert learned < configured / 10, learned
    l2 = proxy.state.tier("l2")
    timeouts = value(
        await admin.metrics(), "tierproxy_tier_lookups_total", tier="l2", outcome="timeout"
    )

    with redis_server.frozen():
        # One lookup at the tier itself: exactly the L2 wait.
        started = time.perf_counter()
        assert await l2.get(proxy.state.keys.key("/frozen"), configured) is None
        waited = time.perf_counter() - started
        assert waited <= learned + SLACK, (waited, learned)
        # Whole requests: each costs about the learned timeout (a timeout is a sample at it,
        # not a reason to widen it), all far from 0.5 s.
        elapsed = []
        for i in range(3):
            response = await proxy.get(f"/frozen-{i}")
            assert response.status == 200 and response.x_cache == "MISS", response
            elapsed.append(response.elapsed)
    assert max(elapsed) < configured / 2, (learned, elapsed)
    lookups = await admin.metrics()
    assert (
        value(lookups, "tierproxy_tier_lookups_total", tier="l2", outcome="timeout") - timeouts == 4
    )


async def test_a_frozen_redis_costs_each_request_the_learned_timeout_until_the_breaker_opens(
    origin: Origin,
    make_proxy: MakeProxy,
    admin_for: AdminFor,
    redis_server: RedisServer,
    redis_url: str,
    redis_client: Any,
) -> None:
    # The promise: with a timeout learned at a few milliseconds, a frozen Redis costs
    # each request about that until the breaker opens - not a timeout that doubles at every
    # failure on its way back to the configured 0.1 s.
    failures_to_open, configured = 5, 0.1
    proxy = await make_proxy(
        ADAPTIVE_TIMEOUTS="on",
        L1_MAX_BYTES=0,
        SQLITE_PATH="off",
        L2_TIMEOUT=configured,
        BREAKER_FAILURES=failures_to_open,
        BREAKER_COOLDOWN=60,
    )
    admin = await admin_for(proxy)
    await _warm(proxy, origin, redis_client, "/ice")
    l2 = proxy.state.tier("l2")
    learned = l2.lookup_timeout
    # A few ms on an idle machine; more when the CPU is contended (the whole suite runs).
    assert learned < configured / 2.5, learned
    timeouts = value(
        await admin.metrics(), "tierproxy_tier_lookups_total", tier="l2", outcome="timeout"
    )
    assert l2.breaker.failures == 0  # the warm-up ended with hits

    elapsed: list[float] = []
    used: list[float] = []
    with redis_server.frozen():
        for i in range(3 * failures_to_open):  # bounded: one after another until it opens
            used.append(l2.lookup_timeout)
            response = await proxy.get(f"/ice-{i}")
            assert response.status == 200 and response.x_cache == "MISS", response
            elapsed.append(response.elapsed)
            if l2.breaker.is_open:
                break
        assert l2.breaker.is_open, (learned, used, elapsed)
    samples = await admin.metrics()
    counted = (
        value(samples, "tierproxy_tier_lookups_total", tier="l2", outcome="timeout") - timeouts
    )
    # One after another, each lookup began after the previous one timed out: each counts.
    assert counted == failures_to_open == len(elapsed), (counted, elapsed)
    # The timeout each of them had: the learned one, give or take the p99 reaching the
    # timeouts' own buckets - each timeout sample may lift it about a quarter octave (x 1.19;
    # seen in CI: 2.3, 3.2, 3.8, 4.6, 5.4 ms from 2.3 ms learned), far from the old doubling
    # (x 16 over five lookups).
    assert max(used) <= 3 * learned, (learned, used)
    assert l2.lookup_timeout <= 4 * learned, (learned, l2.lookup_timeout)
    # Whole requests: about the learned timeout each, plus slack for the origin fetches on
    # a loaded machine - below what the configured timeout alone would cost them (5 x 0.1 s).
    assert sum(elapsed) < failures_to_open * 2 * learned + 0.1, (learned, used, elapsed)
    assert sum(elapsed) < failures_to_open * configured, (learned, used, elapsed)


async def test_an_open_l2_breaker_is_closed_by_a_background_probe_without_any_request(
    origin: Origin,
    make_proxy: MakeProxy,
    admin_for: AdminFor,
    redis_server: RedisServer,
    redis_url: str,
    redis_client: Any,
) -> None:
    cooldown = 2.0  # probes every 0.02-0.5 s; a client request would probe only after 2 s
    proxy = await make_proxy(
        L1_MAX_BYTES=0,
        SQLITE_PATH="off",
        L2_TIMEOUT=0.05,
        BREAKER_FAILURES=2,
        BREAKER_COOLDOWN=cooldown,
    )
    admin = await admin_for(proxy)
    origin.set_default(headers=CACHEABLE)
    assert (await proxy.get("/p")).x_cache == "MISS"
    await wait_for_condition(
        partial(redis_client.exists, redis_key("/p", origin.url)), message="L2"
    )

    with redis_server.frozen():
        for i in range(2):
            assert (await proxy.get(f"/q{i}")).status == 200
        _, body = await admin.readyz()
        assert body["tiers"]["l2"] == "breaker-open", body
        opened = time.monotonic()

        # Probes run meanwhile, and time out against the frozen Redis.
        async def probed() -> bool:
            samples = await admin.metrics()
            return value(samples, "tierproxy_tier_probes_total", tier="l2", outcome="timeout") > 0

        await wait_for_condition(probed, timeout=cooldown, message="a probe of the frozen Redis")
    requests_before = origin.count()

    async def l2_up() -> bool:
        return bool((await admin.readyz())[1]["tiers"]["l2"] == "up")

    await wait_for_condition(l2_up, timeout=cooldown, message="the probe to close the breaker")
    assert time.monotonic() - opened < cooldown  # before any request could have probed
    samples = await admin.metrics()
    assert value(samples, "tierproxy_tier_probes_total", tier="l2", outcome="ok") == 1
    assert value(samples, "tierproxy_breaker_open", tier="l2") == 0
    assert origin.count() == requests_before  # no request went anywhere meanwhile

    response = await proxy.get("/p")
    assert response.x_cache == "HIT-L2", response


async def test_the_probes_stop_with_the_proxy(make_proxy: MakeProxy, redis_url: str) -> None:
    def probing() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t.get_name() == "tierproxy-probes"]

    before = len(probing())
    proxy = await make_proxy()
    assert len(probing()) == before + 1
    await proxy.close()
    assert len(probing()) == before


async def test_lookups_near_their_timeout_are_counted_and_logged_once(
    origin: Origin,
    make_proxy: MakeProxy,
    admin_for: AdminFor,
    redis_server: RedisServer,
    redis_url: str,
    fault_proxy: MakeFaultProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tierproxy.latency")
    front = await fault_proxy(redis_server.port)
    timeout = 0.5
    proxy = await make_proxy(
        REDIS_URL=front.url("redis", "/0"), L1_MAX_BYTES=0, SQLITE_PATH="off", L2_TIMEOUT=timeout
    )
    admin = await admin_for(proxy)
    l2 = proxy.state.tier("l2")
    front.set_mode("delay", 0.42 * timeout)  # each way: a lookup takes over 84% of its timeout

    for path in ("/n1", "/n2"):
        started = time.perf_counter()
        assert await l2.get(proxy.state.keys.key(path), timeout) is None  # a miss, not a timeout
        assert 0.8 * timeout < time.perf_counter() - started < timeout

    samples = await admin.metrics()
    assert value(samples, "tierproxy_near_timeout_total", tier="l2") == 2
    assert value(samples, "tierproxy_tier_lookups_total", tier="l2", outcome="miss") == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "tierproxy.latency"]
    assert len(lines) == 1 and lines[0].startswith("l2: 1 operation(s)"), lines


async def test_lookups_timing_out_together_are_one_failure_of_the_tier(
    origin: Origin,
    make_proxy: MakeProxy,
    admin_for: AdminFor,
    redis_server: RedisServer,
    redis_url: str,
    redis_client: Any,
) -> None:
    # A busy loop or a short stall times out every lookup in flight at once: with a learned
    # timeout that is one failure of the tier (they began before the first of them timed
    # out), not twenty breaker failures - and the timeout is not widened for it.
    proxy = await make_proxy(
        ADAPTIVE_TIMEOUTS="on",
        L1_MAX_BYTES=0,
        SQLITE_PATH="off",
        BREAKER_FAILURES=5,
        BREAKER_COOLDOWN=60,
    )
    admin = await admin_for(proxy)
    await _warm(proxy, origin, redis_client, "/together")
    l2 = proxy.state.tier("l2")
    learned = l2.lookup_timeout
    assert learned < 0.05, learned  # well below the 0.1 s budget: they time out at it
    keys = [proxy.state.keys.key(f"/t{i}") for i in range(20)]
    # (The last warm-up lookup may itself have timed out: compare with before.)
    failures = l2.breaker.failures

    with redis_server.frozen():
        found = await asyncio.gather(*(l2.get(key, 0.1) for key in keys))

    assert found == [None] * 20
    assert l2.breaker.failures == failures + 1 and not l2.breaker.is_open
    # Twenty samples at the timeout lift the p99 to its bucket: x 1.5 x a quarter octave.
    assert l2.lookup_timeout <= 2 * learned, (learned, l2.lookup_timeout)
    _, body = await admin.readyz()
    assert body["tiers"]["l2"] == "degraded", body


async def test_an_open_l3_breaker_is_closed_by_a_probe_that_reads_the_file(
    origin: Origin, make_proxy: MakeProxy, admin_for: AdminFor
) -> None:
    proxy = await make_proxy(REDIS_URL=None, L1_MAX_BYTES=0, BREAKER_FAILURES=2, BREAKER_COOLDOWN=2)
    admin = await admin_for(proxy)
    l3 = proxy.state.tier("l3")
    for _ in range(2):  # what two failed lookups do to it
        l3.breaker.failure()
    assert (await admin.readyz())[1]["tiers"]["l3"] == "breaker-open"

    async def l3_up() -> bool:
        return bool((await admin.readyz())[1]["tiers"]["l3"] == "up")

    await wait_for_condition(l3_up, timeout=2, message="a probe to read the L3 file")
    samples = await admin.metrics()
    assert value(samples, "tierproxy_tier_probes_total", tier="l3", outcome="ok") == 1
    assert origin.count() == 0


async def test_origin_fetches_near_their_timeout_are_counted(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    # The origin answers, but only after 90% of TIERPROXY_ORIGIN_TIMEOUT: counted as near.
    origin.set("/slowish", latency=0.45, headers={"Cache-Control": "max-age=60"})
    origin.set("/quick", headers={"Cache-Control": "max-age=60"})
    proxy = await make_proxy(ORIGIN_TIMEOUT=0.5, REQUEST_DEADLINE=3.0)
    near = proxy.state.metrics.near_timeout.labels("origin")
    assert (await proxy.get("/quick")).status == 200
    assert near.value == 0
    slow = await proxy.get("/slowish")
    assert slow.status == 200 and slow.x_cache == "MISS", slow
    assert near.value == 1


async def test_a_probe_that_closes_the_breaker_of_a_tier_still_failing_costs_one_lookup(
    origin: Origin, make_proxy: MakeProxy, redis_client: Any
) -> None:
    # Redis answers PING (the probe) but refuses GET (an ACL): each probe closes the L2
    # breaker, and the first lookup that fails again must reopen it at once - not after
    # another TIERPROXY_BREAKER_FAILURES failed lookups, probe after probe.
    failures_to_open = 3
    proxy = await make_proxy(
        L1_MAX_BYTES=0,
        SQLITE_PATH="off",
        BREAKER_FAILURES=failures_to_open,
        BREAKER_COOLDOWN=2.0,
    )
    origin.set_default(headers=CACHEABLE)
    registry = proxy.state.metrics.registry

    def sample(name: str, **labels: str) -> float:
        return float(registry.get_sample_value(name, labels) or 0.0)

    redis_client.execute_command("ACL", "SETUSER", "default", "-get")
    try:
        for i in range(150):  # about 2 s of requests: several probes close the breaker
            assert (await proxy.get(f"/acl{i % 5}")).status == 200
            await asyncio.sleep(0.01)
    finally:
        redis_client.execute_command("ACL", "SETUSER", "default", "+get")
    errors = sample("tierproxy_tier_lookups_total", tier="l2", outcome="error")
    closed_by_probe = sample("tierproxy_tier_probes_total", tier="l2", outcome="ok")
    assert closed_by_probe >= 1
    assert errors <= failures_to_open + closed_by_probe, (errors, closed_by_probe)
