"""RFC 9111 storability and freshness, observed end to end.

Uncacheable responses are fetched every time and never reach Redis or SQLite; freshness
comes from s-maxage, max-age, Expires, else TIERPROXY_DEFAULT_TTL - measured as the moment
the proxy goes back to the origin.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.clock import SteppedClock
from support.fixture_types import MakeProxy
from support.origin import Origin
from support.storage import redis_tier_keys, sqlite_count

NOT_CACHED = {"MISS", "BYPASS"}

UNCACHEABLE = [
    pytest.param({"headers": {"Cache-Control": "no-store"}}, {}, id="no-store"),
    pytest.param({"headers": {"Cache-Control": "private, max-age=300"}}, {}, id="private"),
    pytest.param(
        {"headers": {"Cache-Control": "max-age=300", "Set-Cookie": "session=abc; Path=/"}},
        {},
        id="set-cookie",
    ),
    pytest.param(
        {"headers": {"Cache-Control": "max-age=300"}},
        {"Authorization": "Bearer secret-token"},
        id="authorization-without-public",
    ),
    pytest.param({"status": 500}, {}, id="status-500"),
    pytest.param({"status": 503}, {}, id="status-503"),
    pytest.param({"headers": {"Cache-Control": "max-age=300", "Vary": "*"}}, {}, id="vary-star"),
]


@pytest.mark.parametrize(("rule", "request_headers"), UNCACHEABLE)
async def test_uncacheable_response_is_fetched_every_time_and_never_stored(
    rule: dict[str, Any],
    request_headers: dict[str, str],
    origin: Origin,
    make_proxy: MakeProxy,
    redis_url: str,
    redis_client: Any,
    sqlite_path: Path,
) -> None:
    origin.set("/u", **rule)
    proxy = await make_proxy()

    first = await proxy.get("/u", headers=request_headers)
    second = await proxy.get("/u", headers=request_headers)

    expected_status = rule.get("status", 200)
    assert (first.status, second.status) == (expected_status, expected_status)
    assert first.x_cache in NOT_CACHED, first
    assert second.x_cache in NOT_CACHED, second
    assert second.body == b"origin body for /u (request 2)"
    assert origin.count("/u") == 2
    for name, value in request_headers.items():  # end-to-end request headers reach the origin
        assert origin.requests[-1].headers.get(name) == value
    await proxy.settle()
    assert redis_tier_keys(redis_client) == []
    assert sqlite_count(sqlite_path) == 0


@pytest.mark.parametrize(
    "cache_control", ["public, max-age=300", "s-maxage=300"], ids=["public", "s-maxage"]
)
async def test_authorized_response_is_cached_when_marked_public_or_s_maxage(
    cache_control: str, origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/auth", headers={"Cache-Control": cache_control})
    proxy = await make_proxy()
    auth = {"Authorization": "Bearer t"}

    first = await proxy.get("/auth", headers=auth)
    second = await proxy.get("/auth", headers=auth)

    assert first.x_cache == "MISS", first
    assert second.x_cache == "HIT-L1", second
    assert origin.count("/auth") == 1


async def test_response_without_freshness_is_not_stored_when_default_ttl_is_zero(
    origin: Origin, make_proxy: MakeProxy, sqlite_path: Path
) -> None:
    proxy = await make_proxy(DEFAULT_TTL=0)

    first = await proxy.get("/nottl")
    second = await proxy.get("/nottl")

    assert first.x_cache in NOT_CACHED and second.x_cache in NOT_CACHED, (first, second)
    assert origin.count("/nottl") == 2
    await proxy.settle()
    assert sqlite_count(sqlite_path) == 0


def _http_date(offset: float) -> str:
    return email.utils.formatdate(time.time() + offset, usegmt=True)


# (response headers, proxy env, expected lifetime in seconds)
FRESHNESS = [
    pytest.param(
        lambda: {"Cache-Control": "s-maxage=2, max-age=600"}, {}, 2, id="s-maxage-over-max-age"
    ),
    pytest.param(
        lambda: {"Cache-Control": "max-age=2", "Expires": _http_date(600)},
        {"DEFAULT_TTL": 600},
        2,
        id="max-age-over-expires-and-default",
    ),
    pytest.param(lambda: {"Expires": _http_date(3)}, {"DEFAULT_TTL": 600}, 3, id="expires"),
    pytest.param(dict, {"DEFAULT_TTL": 2}, 2, id="default-ttl"),
]


@pytest.mark.parametrize(("headers", "env", "lifetime"), FRESHNESS)
async def test_freshness_lifetime_decides_when_the_origin_is_asked_again(
    headers: Callable[[], dict[str, str]],
    env: dict[str, Any],
    lifetime: float,
    origin: Origin,
    make_proxy: MakeProxy,
) -> None:
    clock = SteppedClock()
    origin.set("/fresh", headers=headers())
    proxy = await make_proxy(clock=clock, **env)

    first = await proxy.get("/fresh")
    assert first.x_cache == "MISS", first
    stored = clock.wall()

    # Second-resolution HTTP dates may shorten a lifetime by up to a second; never lengthen it.
    clock.advance_to(stored + lifetime - 1.1)
    before = await proxy.get("/fresh")
    assert before.x_cache == "HIT-L1", before
    assert origin.count("/fresh") == 1

    clock.advance_to(stored + lifetime + 0.1)
    after = await proxy.get("/fresh")
    assert after.status == 200, after
    assert after.x_cache in ("MISS", "REVALIDATED"), after
    assert origin.count("/fresh") == 2


async def test_a_copy_refetched_after_the_clock_moved_on_is_fresh_again(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    # The origin's Date comes from the proxy's clock (as a real origin's agrees with the
    # proxy's time): a copy fetched after the clock moved on is as fresh as the first was.
    clock = SteppedClock()
    origin.set("/again", headers={"Cache-Control": "max-age=30"}, size=10)
    proxy = await make_proxy(REDIS_URL=None, SQLITE_PATH="off", clock=clock)
    assert (await proxy.get("/again")).x_cache == "MISS"
    clock.advance(40)
    refetched = await proxy.get("/again")
    assert refetched.x_cache == "MISS", refetched
    assert refetched.age == 0, refetched
    hit = await proxy.get("/again")
    assert hit.x_cache == "HIT-L1", hit
    assert origin.count("/again") == 2
