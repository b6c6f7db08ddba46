"""Origin slow or down: serve stale (RFC 5861 style) or answer 504/502, and revalidate.

An entry is made stale by advancing the proxy's clock past its max-age (support.clock: the
proxy's freshness and breaker cool-downs read it); everything else waits on conditions.
"""

from __future__ import annotations

import email.utils
import math
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.clock import SteppedClock
from support.fixture_types import MakeFaultProxy, MakeProxy
from support.net import refused_url
from support.origin import Origin
from support.proxy import Fetched, ProxyHandle
from support.storage import redis_key, sqlite_row
from support.wait import wait_for_condition

ORIGIN_TIMEOUT = 0.5
SLACK = 0.75  # honest slack for a loaded CI box
TIER_ONLY: dict[str, dict[str, Any]] = {
    "l1": {"REDIS_URL": None, "SQLITE_PATH": "off"},
    "l2": {"L1_MAX_BYTES": 0, "SQLITE_PATH": "off"},
    "l3": {"L1_MAX_BYTES": 0, "REDIS_URL": None},
}


def _short_lived(origin: Origin, path: str, **rule: Any) -> float:
    """Make ``path`` answer max-age=1 with a pinned ``Date`` (a whole second, now or just
    before), so the entry's age - and so its expiry - is exact: RFC 9111 §4.2.3 ages a
    response by its Date. Returns that Date as epoch seconds (= the entry's stored_at).
    """
    dated = float(math.floor(time.time()))
    headers = {"Cache-Control": "max-age=1", "Date": email.utils.formatdate(dated, usegmt=True)}
    origin.set(path, headers={**headers, **rule.pop("headers", {})}, **rule)
    return dated


async def _cache_and_let_expire(
    proxy: ProxyHandle, path: str, stored_at: float, clock: SteppedClock
) -> bytes:
    """GET ``path`` (a MISS), let its backfills land, then advance the proxy's clock 0.6 s
    past its freshness."""
    first = await proxy.get(path)
    assert first.x_cache == "MISS", first
    await proxy.settle()
    clock.advance_to(stored_at + 1.6)
    body: bytes = first.body
    return body


def _assert_stale(
    response: Fetched, *, tier: str, detail: str, body: bytes, stored_at: float, clock: SteppedClock
) -> None:
    assert response.status == 200, response
    assert response.body == body
    assert response.x_cache == f"STALE-{tier.upper()}", response
    status = response.cache_status
    assert status is not None and status.cache == f"tierproxy-{tier}" and status.hit, response
    # Strictly negative for any stale copy is checked by its own test below; here: not fresh.
    assert status.ttl is not None and status.ttl <= 0, response
    assert status.detail == detail, response
    assert response.age is not None, response
    assert 1 <= response.age <= clock.wall() - stored_at + 1, response


@pytest.mark.parametrize("tier", ["l1", "l2", "l3"])
async def test_stale_copy_served_when_origin_hangs(
    tier: str,
    origin: Origin,
    make_proxy: MakeProxy,
    redis_url: str,
    redis_client: Any,
    sqlite_path: Path,
) -> None:
    stored_at = _short_lived(origin, "/s")
    clock = SteppedClock()
    proxy = await make_proxy(ORIGIN_TIMEOUT=ORIGIN_TIMEOUT, clock=clock, **TIER_ONLY[tier])
    body = await _cache_and_let_expire(proxy, "/s", stored_at, clock)
    if tier == "l2":
        assert redis_client.exists(redis_key("/s", origin.url))
    if tier == "l3":
        assert sqlite_row(sqlite_path, "/s", origin.url)

    origin.set("/s", hang=True)
    stale = await proxy.get("/s")

    _assert_stale(
        stale, tier=tier, detail="origin-timeout", body=body, stored_at=stored_at, clock=clock
    )
    assert stale.elapsed <= ORIGIN_TIMEOUT + SLACK, stale
    assert origin.count("/s") == 2


async def test_stale_copy_served_when_origin_answers_500(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    stored_at = _short_lived(origin, "/s500")
    clock = SteppedClock()
    proxy = await make_proxy(clock=clock)
    body = await _cache_and_let_expire(proxy, "/s500", stored_at, clock)

    origin.set("/s500", status=500, body=b"boom")
    stale = await proxy.get("/s500")

    _assert_stale(
        stale, tier="l1", detail="origin-5xx", body=body, stored_at=stored_at, clock=clock
    )
    assert stale.elapsed <= SLACK, stale
    assert origin.count("/s500") == 2


@pytest.mark.parametrize("failure", ["refused", "reset"])
async def test_stale_copy_served_when_origin_connection_fails(
    failure: str, origin: Origin, make_proxy: MakeProxy, fault_proxy: MakeFaultProxy
) -> None:
    front = await fault_proxy(origin.port)
    stored_at = _short_lived(origin, "/sc")
    clock = SteppedClock()
    proxy = await make_proxy(ORIGIN=front.url(), clock=clock)
    body = await _cache_and_let_expire(proxy, "/sc", stored_at, clock)

    if failure == "refused":
        await front.stop_listening(drop_open=True)
    else:
        front.set_mode("reset")
    stale = await proxy.get("/sc")

    _assert_stale(
        stale, tier="l1", detail="origin-error", body=body, stored_at=stored_at, clock=clock
    )
    assert stale.elapsed <= SLACK, stale


async def test_new_process_serves_stale_l3_copy_when_origin_is_down(
    origin: Origin, make_proxy: MakeProxy, sqlite_path: Path
) -> None:
    stored_at = _short_lived(origin, "/down")
    clock = SteppedClock()
    writer = await make_proxy(clock=clock)
    await writer.get("/down")
    await wait_for_condition(
        lambda: sqlite_row(sqlite_path, "/down", origin.url), message="L3 fill"
    )
    body = (await writer.get("/down")).body
    await writer.close()
    clock.advance_to(stored_at + 1.6)

    # The same origin (keys are namespaced by origin), now refusing connections.
    url = origin.url
    await origin.close()
    reader = await make_proxy(ORIGIN=url, clock=clock)
    stale = await reader.get("/down")

    _assert_stale(
        stale, tier="l3", detail="origin-error", body=body, stored_at=stored_at, clock=clock
    )


async def test_stale_copy_reports_a_negative_ttl_even_when_less_than_a_second_stale(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """RFC 9211 §2.5 / DESIGN: a stale copy's Cache-Status ttl is negative, never 0."""
    stored_at = _short_lived(origin, "/ttl")
    clock = SteppedClock()
    proxy = await make_proxy(clock=clock)
    first = await proxy.get("/ttl")
    assert first.x_cache == "MISS", first
    clock.advance_to(stored_at + 1.3)  # stale by 0.3 s

    origin.set("/ttl", status=500)
    stale = await proxy.get("/ttl")

    assert stale.x_cache == "STALE-L1", stale
    assert stale.cache_status is not None and stale.cache_status.ttl is not None, stale
    assert stale.cache_status.ttl <= -1, stale


async def test_copy_older_than_max_stale_is_not_served(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    stored_at = _short_lived(origin, "/old")
    clock = SteppedClock()
    proxy = await make_proxy(ORIGIN_TIMEOUT=ORIGIN_TIMEOUT, MAX_STALE=1, clock=clock)
    first = await proxy.get("/old")
    assert first.x_cache == "MISS", first
    clock.advance_to(stored_at + 2.6)  # past fresh (1 s) + max-stale (1 s)

    origin.set("/old", hang=True)
    response = await proxy.get("/old")

    assert response.status == 504, response
    assert response.body != first.body


async def test_origin_timeout_with_nothing_cached_is_504_plain_text(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/hang", hang=True)
    proxy = await make_proxy(ORIGIN_TIMEOUT=ORIGIN_TIMEOUT)

    response = await proxy.get("/hang")

    assert response.status == 504, response
    assert response.headers["Content-Type"].startswith("text/plain"), response
    assert b"time" in response.body.lower(), response  # "timeout" / "timed out"
    assert response.elapsed <= ORIGIN_TIMEOUT + SLACK, response


async def test_origin_refusing_connections_with_nothing_cached_is_502_plain_text(
    make_proxy: MakeProxy,
) -> None:
    proxy = await make_proxy(ORIGIN=refused_url())

    response = await proxy.get("/x")

    assert response.status == 502, response
    assert response.headers["Content-Type"].startswith("text/plain"), response
    assert response.body.strip(), response
    assert response.elapsed <= SLACK, response


async def test_origin_resetting_connections_with_nothing_cached_is_502(
    origin: Origin, make_proxy: MakeProxy, fault_proxy: MakeFaultProxy
) -> None:
    front = await fault_proxy(origin.port, mode="reset")
    proxy = await make_proxy(ORIGIN=front.url())

    response = await proxy.get("/x")

    assert response.status == 502, response
    assert response.headers["Content-Type"].startswith("text/plain"), response


async def test_origin_blackholed_with_nothing_cached_is_504(
    origin: Origin, make_proxy: MakeProxy, fault_proxy: MakeFaultProxy
) -> None:
    front = await fault_proxy(origin.port, mode="blackhole")
    proxy = await make_proxy(ORIGIN=front.url(), ORIGIN_TIMEOUT=ORIGIN_TIMEOUT)

    response = await proxy.get("/x")

    assert response.status == 504, response
    assert response.elapsed <= ORIGIN_TIMEOUT + SLACK, response


async def test_origin_500_with_nothing_cached_is_passed_through(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/e", status=500, body=b"origin says no")
    proxy = await make_proxy()

    response = await proxy.get("/e")

    assert response.status == 500, response
    assert response.body == b"origin says no"


async def test_stale_entry_with_etag_is_revalidated_with_if_none_match(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    stored_at = _short_lived(origin, "/r", etag='"v1"', honor_if_none_match=True)
    clock = SteppedClock()
    proxy = await make_proxy(clock=clock)
    body = await _cache_and_let_expire(proxy, "/r", stored_at, clock)

    # The origin's 304 (with a current Date) grants a new lifetime.
    origin.set(
        "/r", headers={"Cache-Control": "max-age=300"}, etag='"v1"', honor_if_none_match=True
    )
    revalidated = await proxy.get("/r")

    assert revalidated.status == 200, revalidated
    assert revalidated.x_cache == "REVALIDATED", revalidated
    assert revalidated.body == body
    assert revalidated.headers["ETag"] == '"v1"'
    assert origin.requests[-1].headers.get("If-None-Match") == '"v1"'
    assert origin.count("/r") == 2
    # The 304 refreshed the entry: the next request is a hit again.
    after = await proxy.get("/r")
    assert after.x_cache == "HIT-L1", after
    assert origin.count("/r") == 2


async def test_stale_entry_with_last_modified_is_revalidated_with_if_modified_since(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    last_modified = "Tue, 01 Oct 2024 10:00:00 GMT"
    stored_at = _short_lived(origin, "/lm", last_modified=last_modified)
    clock = SteppedClock()
    proxy = await make_proxy(clock=clock)
    await _cache_and_let_expire(proxy, "/lm", stored_at, clock)

    origin.set("/lm", headers={"Cache-Control": "max-age=300"}, body=b"new version")
    refreshed = await proxy.get("/lm")

    assert origin.requests[-1].headers.get("If-Modified-Since") == last_modified
    assert refreshed.status == 200 and refreshed.body == b"new version", refreshed
    after = await proxy.get("/lm")
    assert after.x_cache == "HIT-L1" and after.body == b"new version", after


async def test_hit_never_waits_on_a_hanging_origin(origin: Origin, make_proxy: MakeProxy) -> None:
    origin.set("/fast", headers={"Cache-Control": "max-age=300"})
    proxy = await make_proxy(ORIGIN_TIMEOUT=2.0)
    await proxy.get("/fast")

    origin.set("/fast", hang=True)
    hit = await proxy.get("/fast")

    assert hit.x_cache == "HIT-L1", hit
    assert hit.elapsed < 0.5, hit


@pytest.mark.parametrize(
    ("size", "env"),
    [(20_000, {}), (300_000, {"MAX_ENTRY_BYTES": 65_536})],
    ids=["buffered", "streamed"],
)
async def test_truncated_origin_response_is_never_served_as_complete_or_stored(
    size: int, env: dict[str, Any], origin: Origin, make_proxy: MakeProxy, sqlite_path: Path
) -> None:
    origin.set("/cut", size=size, close_mid_body=True, headers={"Cache-Control": "max-age=300"})
    proxy = await make_proxy(**env)

    try:
        response = await proxy.get("/cut")
    except aiohttp.ClientPayloadError:
        pass  # streamed, and the truncation was passed on as a broken body: fine
    else:
        assert response.status == 502, response

    await proxy.settle()
    assert sqlite_row(sqlite_path, "/cut", origin.url) is None
    origin.set("/cut", size=size, headers={"Cache-Control": "max-age=300"})
    again = await proxy.get("/cut")
    assert again.status == 200 and len(again.body) == size, again
    assert origin.count("/cut") == 2


async def test_stale_copies_served_at_once_while_the_origin_breaker_is_open(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    # After BREAKER_FAILURES consecutive origin failures, a request holding a usable stale copy
    # no longer waits out the origin timeout; one request per cooldown probes the origin, and
    # once it answers again copies are refreshed as usual.
    clock = SteppedClock()
    proxy = await make_proxy(
        ORIGIN_TIMEOUT=ORIGIN_TIMEOUT,
        BREAKER_FAILURES=2,
        BREAKER_COOLDOWN=1.0,
        REDIS_URL=None,
        SQLITE_PATH="off",
        clock=clock,
    )
    stored_at = _short_lived(origin, "/ob")
    body = await _cache_and_let_expire(proxy, "/ob", stored_at, clock)
    origin.set("/ob", hang=True)
    for _ in range(2):  # two timeouts open the breaker
        slow = await proxy.get("/ob")
        _assert_stale(
            slow, tier="l1", detail="origin-timeout", body=body, stored_at=stored_at, clock=clock
        )
    asked = origin.count("/ob")
    fast = await proxy.get("/ob")
    _assert_stale(
        fast, tier="l1", detail="origin-down", body=body, stored_at=stored_at, clock=clock
    )
    assert fast.elapsed < ORIGIN_TIMEOUT / 2, fast
    assert origin.count("/ob") == asked  # the origin was not asked at all

    origin.release()
    origin.set("/ob", body=b"fresh again", headers={"Cache-Control": "max-age=60"})
    # After the cooldown one request probes, succeeds, and closes the breaker.
    clock.advance(1.0)

    async def refreshed() -> bool:
        response = await proxy.get("/ob")
        return response.body == b"fresh again" and response.x_cache in ("MISS", "REVALIDATED")

    await wait_for_condition(refreshed, timeout=5)
    assert (await proxy.get("/ob")).x_cache == "HIT-L1"
