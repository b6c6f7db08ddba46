"""TIERPROXY_STALE_DEADLINE: a stale copy that may serve is served once the origin is slow.

The origin answers after ORIGIN_LATENCY (well within the origin timeout); with a stale copy
in L1, L2 or L3 the clients get it at the stale deadline, while the one origin fetch goes on
in the background and then refreshes every tier. Copies are made stale by advancing the
proxy's clock (support.clock); the deadline itself is real time, with honest slack.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from pathlib import Path
from typing import Any

import pytest
from support.clock import SteppedClock
from support.fixture_types import MakeProxy
from support.origin import Origin
from support.proxy import ProxyHandle
from support.storage import redis_key, sqlite_row
from support.wait import wait_for_condition

from tierproxy.codec import decode

STALE_DEADLINE = 0.2
ORIGIN_LATENCY = 1.5
SLACK = 0.6  # a loaded CI box: the stale answer still comes well before the origin's
CLIENTS = 8
NEW_BODY = b"the refreshed body"


def _short_lived(origin: Origin, path: str) -> float:
    """``path`` answers max-age=1 with a pinned Date (a whole second), so the entry's expiry
    is exact (RFC 9111 §4.2.3). Returns that Date as epoch seconds."""
    dated = float(math.floor(time.time()))
    headers = {"Cache-Control": "max-age=1", "Date": email.utils.formatdate(dated, usegmt=True)}
    origin.set(path, headers=headers)
    return dated


async def _cache_and_let_expire(
    proxy: ProxyHandle, path: str, stored_at: float, clock: SteppedClock
) -> bytes:
    first = await proxy.get(path)
    assert first.x_cache == "MISS", first
    await proxy.settle()
    clock.advance_to(stored_at + 1.6)
    body: bytes = first.body
    return body


def _stale_served(proxy: ProxyHandle, reason: str) -> float:
    value = proxy.state.metrics.registry.get_sample_value(
        "tierproxy_stale_served_total", {"reason": reason}
    )
    return float(value or 0.0)


@pytest.mark.parametrize("tier", ["l1", "l2", "l3"])
async def test_a_slow_origin_is_answered_from_the_stale_copy_at_the_deadline(
    tier: str,
    origin: Origin,
    make_proxy: MakeProxy,
    redis_url: str,
    redis_client: Any,
    sqlite_path: Path,
) -> None:
    stored_at = _short_lived(origin, "/sd")
    clock = SteppedClock()
    proxy = await make_proxy(STALE_DEADLINE=STALE_DEADLINE, clock=clock)
    assert proxy.tier_names() == ["l1", "l2", "l3"]
    old = await _cache_and_let_expire(proxy, "/sd", stored_at, clock)
    # The stale copy only in the tier under test (the tiers before it lose theirs).
    if tier in ("l2", "l3"):
        proxy.state.tier("l1").clear()
    if tier == "l3":
        assert redis_client.delete(redis_key("/sd", origin.url)) == 1
    origin.set(
        "/sd", headers={"Cache-Control": "max-age=60"}, body=NEW_BODY, latency=ORIGIN_LATENCY
    )

    answers = await asyncio.gather(*(proxy.get("/sd") for _ in range(CLIENTS)))

    for answer in answers:
        assert answer.status == 200, answer
        assert answer.body == old, answer
        assert answer.x_cache == f"STALE-{tier.upper()}", answer
        status = answer.cache_status
        assert status is not None and status.detail == "origin-slow", answer
        assert status.ttl is not None and status.ttl < 0, answer
        assert answer.elapsed < STALE_DEADLINE + SLACK, answer
    assert _stale_served(proxy, "origin-slow") == CLIENTS
    # One origin fetch for all of them (the first one was the MISS), and it goes on.
    assert origin.count("/sd") == 2
    assert origin.active("/sd") == 1

    # Once it has finished, every tier holds its answer, and L1 serves it fresh.
    await wait_for_condition(lambda: origin.active("/sd") == 0, timeout=ORIGIN_LATENCY + 3)
    await proxy.settle()
    fresh = await proxy.get("/sd")
    assert (fresh.x_cache, fresh.body) == ("HIT-L1", NEW_BODY), fresh
    assert decode(redis_client.get(redis_key("/sd", origin.url)), "/sd").body == NEW_BODY
    row = sqlite_row(sqlite_path, "/sd", origin.url)
    assert row is not None and decode(row["value"], "/sd").body == NEW_BODY
    assert origin.count("/sd") == 2


async def test_fetches_left_running_do_not_wait_behind_the_background_backfills(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    # One background slot for backfills: the first fetch a client stopped waiting for must
    # not take it, nor the second wait for the whole origin fetch because it is taken.
    clock = SteppedClock()
    stored_a = _short_lived(origin, "/la")
    _short_lived(origin, "/lb")
    proxy = await make_proxy(
        STALE_DEADLINE=STALE_DEADLINE, BACKFILL_MAX_TASKS=1, REDIS_URL=None, clock=clock
    )
    for path in ("/la", "/lb"):
        assert (await proxy.get(path)).x_cache == "MISS"
    await proxy.settle()
    clock.advance_to(stored_a + 1.6)
    for path in ("/la", "/lb"):
        origin.set(path, headers={"Cache-Control": "max-age=60"}, latency=ORIGIN_LATENCY)

    first = await proxy.get("/la")
    second = await proxy.get("/lb")

    for answer in (first, second):
        assert answer.x_cache == "STALE-L1", answer
        status = answer.cache_status
        assert status is not None and status.detail == "origin-slow", answer
        assert answer.elapsed < STALE_DEADLINE + SLACK, answer
    await wait_for_condition(
        lambda: origin.active("/la") + origin.active("/lb") == 0, timeout=ORIGIN_LATENCY + 3
    )


@pytest.mark.parametrize("case", ["cold", "deadline-off", "past-max-stale"])
async def test_without_a_stale_copy_that_may_serve_a_slow_origin_is_waited_for(
    case: str, origin: Origin, make_proxy: MakeProxy
) -> None:
    stored_at = _short_lived(origin, "/w")
    clock = SteppedClock()
    env: dict[str, Any] = {"STALE_DEADLINE": STALE_DEADLINE}
    if case == "deadline-off":
        env = {}
    if case == "past-max-stale":
        env["MAX_STALE"] = 0
    proxy = await make_proxy(clock=clock, **env)
    if case != "cold":
        await _cache_and_let_expire(proxy, "/w", stored_at, clock)
    origin.set("/w", headers={"Cache-Control": "max-age=60"}, body=NEW_BODY, latency=1.0)

    answer = await proxy.get("/w")

    assert (answer.status, answer.body) == (200, NEW_BODY), answer
    assert answer.x_cache == "MISS", answer
    assert answer.elapsed >= 0.9, answer
    assert _stale_served(proxy, "origin-slow") == 0


async def test_a_slow_origin_that_then_fails_still_leaves_the_stale_copy_in_place(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """The fetch the clients stopped waiting for times out in the background: nothing is
    stored, the next request (its key backing off) is served the same stale copy."""
    stored_at = _short_lived(origin, "/t")
    clock = SteppedClock()
    proxy = await make_proxy(STALE_DEADLINE=STALE_DEADLINE, ORIGIN_TIMEOUT=0.6, clock=clock)
    old = await _cache_and_let_expire(proxy, "/t", stored_at, clock)
    origin.set("/t", hang=True)

    slow = await proxy.get("/t")
    assert (slow.x_cache, slow.body) == ("STALE-L1", old), slow
    assert slow.cache_status is not None and slow.cache_status.detail == "origin-slow"
    await wait_for_condition(lambda: proxy.state.background.pending == 0, timeout=5)

    again = await proxy.get("/t")
    assert (again.x_cache, again.body) == ("STALE-L1", old), again
    assert again.cache_status is not None
    assert again.cache_status.detail in ("origin-backoff", "origin-slow"), again
    assert origin.count("/t") <= 3


async def test_shutdown_waits_for_the_fetch_the_clients_stopped_waiting_for(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """The background fetch is owned, not an orphan: closing the proxy drains it (the
    origin's answer is read to its end before the close returns)."""
    stored_at = _short_lived(origin, "/d")
    clock = SteppedClock()
    proxy = await make_proxy(STALE_DEADLINE=STALE_DEADLINE, clock=clock)
    await _cache_and_let_expire(proxy, "/d", stored_at, clock)
    origin.set("/d", headers={"Cache-Control": "max-age=60"}, body=NEW_BODY, latency=0.8)

    stale = await proxy.get("/d")
    assert stale.x_cache == "STALE-L1", stale
    assert origin.active("/d") == 1
    loop = asyncio.get_running_loop()
    started = loop.time()
    await proxy.close()

    assert loop.time() - started >= 0.8 - STALE_DEADLINE - 0.2  # it waited for the fetch
    assert origin.active("/d") == 0  # ... which ended: nothing left running
    assert proxy.state.background.pending == 0
    assert origin.count("/d") == 2
