"""Load shedding (TIERPROXY_MAX_INFLIGHT): above the limit of requests that need the origin
at once, a request that would go to the origin gets its stale copy or ``503`` at once; hits
in every tier, and requests sharing another request's fetch, are served as ever.

A real origin that hangs holds the requests in flight; nothing here is mocked.
"""

from __future__ import annotations

import asyncio
import email.utils
from typing import Any

import pytest
from support.clock import SteppedClock
from support.fixture_types import MakeProxy
from support.origin import Origin
from support.proxy import Fetched, ProxyHandle
from support.wait import wait_for_condition

CACHEABLE = {"Cache-Control": "max-age=300"}
# Long enough that nothing in these tests is answered by a timeout: a shed answer comes at
# once, well before any of them.
SLOW = {"ORIGIN_TIMEOUT": 8.0, "REQUEST_DEADLINE": 9.0, "ORIGIN_QUEUE_TIMEOUT": 8.0}
SHED_WITHIN = 1.0  # seconds: "at once", with slack for a loaded CI machine

TIER_ONLY: dict[str, dict[str, Any]] = {
    "l1": {"REDIS_URL": None, "SQLITE_PATH": "off"},
    "l2": {"L1_MAX_BYTES": 0, "SQLITE_PATH": "off"},
    "l3": {"L1_MAX_BYTES": 0, "REDIS_URL": None},
}


def _metric(proxy: ProxyHandle, name: str, **labels: str) -> float:
    value = proxy.state.metrics.registry.get_sample_value(name, labels)
    return float(value or 0.0)


def _assert_shed(answer: Fetched, fwd: str = "miss", x_cache: str = "MISS") -> None:
    assert answer.status == 503, answer
    assert answer.headers.get("Retry-After") == "1", answer
    assert answer.x_cache == x_cache, answer
    # The member of the tier it was sent on from: why it went forward, and that it was shed.
    member = answer.cache_status
    assert member is not None and member.fwd == ("uri-miss" if fwd == "miss" else fwd), answer
    assert member.detail == "shed" and member.fwd_status is None, answer
    assert b"too many requests waiting for the origin" in answer.body, answer
    assert answer.elapsed < SHED_WITHIN, answer


async def _hold(proxy: ProxyHandle, origin: Origin, paths: list[str]) -> list[asyncio.Task[Any]]:
    """Requests for ``paths`` that the (hanging) origin holds in flight."""
    tasks = [asyncio.create_task(proxy.get(path)) for path in paths]
    await wait_for_condition(
        lambda: all(origin.count(path) == 1 for path in paths),
        timeout=5,
        message=f"the origin to hold {paths}",
    )
    return tasks


@pytest.mark.parametrize("tier", ["l1", "l2", "l3"])
async def test_misses_over_the_limit_are_shed_at_once_while_hits_are_served(
    tier: str, origin: Origin, make_proxy: MakeProxy, redis_url: str
) -> None:
    proxy = await make_proxy(MAX_INFLIGHT=2, BREAKER_FAILURES=1, **SLOW, **TIER_ONLY[tier])
    origin.set("/cached", headers=CACHEABLE)
    assert (await proxy.get("/cached")).x_cache == "MISS"
    await proxy.settle()  # stored in the one tier
    origin.set_default(hang=True, headers=CACHEABLE)
    held = await _hold(proxy, origin, ["/held0", "/held1"])
    try:
        shed = await asyncio.gather(*(proxy.get(f"/miss{i}") for i in range(4)))
        for answer in shed:
            _assert_shed(answer)
        # Hits never need the origin: never shed.
        for _ in range(3):
            hit = await proxy.get("/cached")
            assert hit.status == 200 and hit.x_cache == f"HIT-{tier.upper()}", hit
        assert all(origin.count(f"/miss{i}") == 0 for i in range(4))
        assert _metric(proxy, "tierproxy_shed_total", fwd="miss") == 4
        assert _metric(proxy, "tierproxy_origin_inflight") == 2
        # Shedding says nothing about the origin: its breaker (open after one failure here)
        # and the keys' backoff never hear of it.
        breaker = proxy.state.readthrough.origin_breaker
        assert breaker.failures == 0 and breaker.state() == "closed"
        assert _metric(proxy, "tierproxy_origin_fetches_total", outcome="timeout") == 0
        assert len(proxy.state.readthrough.upstream.backoff) == 0
        assert not held[0].done() and not held[1].done()
    finally:
        origin.release()
    for answer in await asyncio.wait_for(asyncio.gather(*held), 10):
        assert answer.status == 200 and answer.x_cache == "MISS", answer
    # Released: everything works again.
    again = await proxy.get("/miss0")
    assert again.status == 200 and again.x_cache == "MISS", again
    assert _metric(proxy, "tierproxy_origin_inflight") == 0


async def test_requests_sharing_a_fetch_in_flight_are_not_shed(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(MAX_INFLIGHT=2, REDIS_URL=None, SQLITE_PATH="off", **SLOW)
    origin.set_default(hang=True, headers=CACHEABLE)
    held = await _hold(proxy, origin, ["/one", "/two"])
    # The limit is reached; more requests for a key in flight wait on its one fetch: they need
    # no origin connection of their own, so they are neither shed nor counted.
    waiters = [asyncio.create_task(proxy.get("/one")) for _ in range(5)]
    try:
        await wait_for_condition(
            lambda: _metric(proxy, "tierproxy_coalesced_waiters_total") >= 5,
            timeout=5,
            message="five requests to wait on the fetch of /one",
        )
        assert not any(waiter.done() for waiter in waiters)
        _assert_shed(await proxy.get("/three"))  # a new key still is
        assert _metric(proxy, "tierproxy_origin_inflight") == 2
    finally:
        origin.release()
    answers = await asyncio.wait_for(asyncio.gather(*held, *waiters), 10)
    assert all(answer.status == 200 for answer in answers), answers
    assert all(answer.body == answers[0].body for answer in answers[2:]), answers
    assert origin.count("/one") == 1
    assert _metric(proxy, "tierproxy_shed_total", fwd="miss") == 1


async def test_pass_through_requests_count_and_are_shed(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(MAX_INFLIGHT=2, REDIS_URL=None, SQLITE_PATH="off", **SLOW)
    origin.set_default(hang=True)
    # Two POSTs (never cached) take the two places: a miss is shed...
    posts = [asyncio.create_task(proxy.request("POST", f"/post{i}", data=b"x")) for i in (0, 1)]
    try:
        await wait_for_condition(
            lambda: origin.count(method="POST") == 2, timeout=5, message="two POSTs at the origin"
        )
        _assert_shed(await proxy.get("/miss"))
        # ...and so is a third POST, a pass-through GET, a DELETE.
        _assert_shed(await proxy.request("POST", "/post2", data=b"x"), "method", "BYPASS")
        _assert_shed(
            await proxy.get("/nocache", headers={"Cache-Control": "no-store"}), "bypass", "BYPASS"
        )
        _assert_shed(await proxy.request("DELETE", "/gone"), "method", "BYPASS")
        assert origin.count() == 2
        assert _metric(proxy, "tierproxy_shed_total", fwd="method") == 2
        assert _metric(proxy, "tierproxy_shed_total", fwd="bypass") == 1
        assert proxy.state.readthrough.origin_breaker.failures == 0
    finally:
        origin.release()
    for answer in await asyncio.wait_for(asyncio.gather(*posts), 10):
        assert answer.status == 200, answer
    after = await proxy.request("POST", "/post2", data=b"x")
    assert after.status == 200 and after.x_cache == "BYPASS", after


def _date_of(fetched: Fetched) -> float:
    """When a response was generated, from its Date header (whole seconds)."""
    return email.utils.parsedate_to_datetime(fetched.headers["Date"]).timestamp()


async def test_a_request_holding_a_usable_stale_copy_gets_it_instead_of_being_shed(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    clock = SteppedClock()
    proxy = await make_proxy(MAX_INFLIGHT=1, REDIS_URL=None, SQLITE_PATH="off", clock=clock, **SLOW)
    origin.set("/s", headers={"Cache-Control": "max-age=1"})  # stale-usable: TIERPROXY_MAX_STALE
    origin.set("/strict", headers={"Cache-Control": "max-age=1, must-revalidate"}, etag='"v1"')
    first = await proxy.get("/s")
    assert (await proxy.get("/strict")).x_cache == "MISS"
    clock.advance_to(_date_of(first) + 2.2)  # past max-age=1, whole-second Date
    origin.set_default(hang=True)
    held = await _hold(proxy, origin, ["/hold"])
    try:
        stale = await proxy.get("/s")
        assert stale.status == 200 and stale.x_cache == "STALE-L1", stale
        assert stale.cache_status is not None and stale.cache_status.detail == "shed", stale
        assert stale.body == first.body and stale.elapsed < SHED_WITHIN, stale
        # A stale copy that may not stand in for the origin (must-revalidate): 503.
        _assert_shed(await proxy.get("/strict"), "stale")
        assert origin.count("/s") == 1 and origin.count("/strict") == 1
        assert _metric(proxy, "tierproxy_stale_served_total", reason="shed") == 1
        assert _metric(proxy, "tierproxy_shed_total", fwd="stale") == 2
        assert proxy.state.readthrough.origin_breaker.failures == 0
    finally:
        origin.release()
    assert (await asyncio.wait_for(held[0], 10)).status == 200
    origin.set_default()
    fresh = await proxy.get("/s")
    assert fresh.status == 200 and fresh.x_cache in ("MISS", "REVALIDATED"), fresh


async def test_a_shed_request_does_not_use_up_the_origin_breakers_probe(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    clock = SteppedClock()
    proxy = await make_proxy(
        MAX_INFLIGHT=1,
        BREAKER_FAILURES=1,
        BREAKER_COOLDOWN=5.0,
        REDIS_URL=None,
        SQLITE_PATH="off",
        clock=clock,
        **SLOW,
    )
    origin.set("/s", headers={"Cache-Control": "max-age=1"})
    first = await proxy.get("/s")
    clock.advance_to(_date_of(first) + 2.2)  # /s is stale, and may serve on error
    origin.set("/fail", status=500)
    assert (await proxy.get("/fail")).status == 500
    breaker = proxy.state.readthrough.origin_breaker
    assert breaker.state() == "open"
    clock.advance(5.5)  # past the cool-down: the next request for /s may probe the origin
    origin.set_default(hang=True)
    held = await _hold(proxy, origin, ["/hold"])  # (misses go to the origin, breaker or not)
    try:
        # Each request for /s is let through as the breaker's probe, then shed: the probe is
        # handed back, so the next one probes too (not "origin-down" for a cool-down).
        for _ in range(3):
            stale = await proxy.get("/s")
            assert stale.x_cache == "STALE-L1", stale
            assert stale.cache_status is not None and stale.cache_status.detail == "shed", stale
            assert breaker.state() == "open" and breaker.failures == 1
        assert origin.count("/s") == 1
    finally:
        origin.release()
    assert (await asyncio.wait_for(held[0], 10)).status == 200
    assert breaker.state() == "closed"  # /hold's answer closed it
    origin.set_default()
    assert (await proxy.get("/s")).x_cache in ("MISS", "REVALIDATED")


async def test_shedding_is_off_at_zero(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(
        MAX_INFLIGHT=0, ORIGIN_MAX_CONNECTIONS=1, REDIS_URL=None, SQLITE_PATH="off", **SLOW
    )
    origin.set_default(hang=True, headers=CACHEABLE)
    held = await _hold(proxy, origin, ["/a"])
    queued = asyncio.create_task(proxy.get("/b"))  # waits for the one origin connection
    try:
        await wait_for_condition(
            lambda: _metric(proxy, "tierproxy_origin_inflight") == 2,
            timeout=5,
            message="/b to wait for an origin connection",
        )
        assert not queued.done()
    finally:
        origin.release()
    for answer in await asyncio.wait_for(asyncio.gather(*held, queued), 10):
        assert answer.status == 200, answer
    assert _metric(proxy, "tierproxy_shed_total", fwd="miss") == 0
