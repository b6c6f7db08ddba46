"""Strict freshness parsing, RFC 9213 targeted cache control and what is stored, end to end:
the real proxy (L1, Redis, SQLite) in front of the real test origin.

Whether a response was stored and is fresh is observed the way a client can: a second
request answered from the cache (``X-Cache: HIT-*``, the first response's body) or from the
origin (its request counter moved on).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support.clock import SteppedClock
from support.fixture_types import MakeProxy, SpawnProxy
from support.origin import Origin
from support.storage import sqlite_count

FIRST_BODY = b"origin body for /r (request 1)"


async def _twice(
    origin: Origin, make_proxy: MakeProxy, *, status: int = 200, **env: Any
) -> tuple[Any, Any]:
    proxy = await make_proxy(**env)
    first = await proxy.get("/r")
    second = await proxy.get("/r")
    assert first.status == status, first
    assert second.status == status, second
    return first, second


# ---- strict freshness parsing ---------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Cache-Control": "max-age=-1"},
        {"Cache-Control": "max-age='3600'"},
        {"Cache-Control": "max-age=3600.5"},
        {"Cache-Control": "s-maxage=-5, max-age=3600"},
        {"Expires": "Thu, 1 Jan 2099 00:00:00 GMT"},  # one-digit day
        {"Expires": "Thu, 01 Jan 2099 0:00:00 GMT"},  # one-digit hour
        {"Expires": "Thu, 01 Jan 2099 00:00:00 UTC"},
        {"Expires": "0"},
        {"Cache-Control": "max-age=3600", "Age": "7200, 0"},
    ],
    ids=[
        "max-age-negative",
        "max-age-single-quoted",
        "max-age-decimal",
        "s-maxage-negative",
        "expires-one-digit-day",
        "expires-one-digit-hour",
        "expires-utc",
        "expires-zero",
        "age-list",
    ],
)
async def test_invalid_freshness_is_stale_not_the_default_ttl(
    headers: dict[str, str], origin: Origin, make_proxy: MakeProxy
) -> None:
    # The default TTL would make the second request a hit: invalid freshness must not.
    origin.set("/r", headers={**headers, "ETag": '"v1"'})
    first, second = await _twice(origin, make_proxy, DEFAULT_TTL=600)

    assert first.x_cache == "MISS", first
    assert second.x_cache in ("MISS", "REVALIDATED"), second
    assert origin.count("/r") == 2


@pytest.mark.parametrize(
    "expires",
    [
        "Thu, 01 Jan 2099 00:00:00 GMT",  # IMF-fixdate
        "Thursday, 01-Jan-60 00:00:00 GMT",  # RFC 850 (2060)
        "Thu Jan  1 00:00:00 2099",  # asctime
    ],
    ids=["imf-fixdate", "rfc850", "asctime"],
)
async def test_the_three_http_date_forms_give_freshness(
    expires: str, origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/r", headers={"Expires": expires})
    first, second = await _twice(origin, make_proxy, DEFAULT_TTL=0)

    assert first.x_cache == "MISS", first
    assert second.x_cache == "HIT-L1", second
    assert second.body == FIRST_BODY
    assert origin.count("/r") == 1


@pytest.mark.parametrize(
    "headers",
    [
        {"Cache-Control": "max-age=" + "9" * 5000},
        {"Cache-Control": "max-age=60", "Age": "9" * 5000},
    ],
    ids=["max-age", "age"],
)
async def test_a_delta_seconds_of_thousands_of_digits_is_capped_not_a_500(
    headers: dict[str, str], origin: Origin, make_proxy: MakeProxy
) -> None:
    """RFC 9111 §1.2.2: too large to hold means 2^31 seconds (for Age: the copy is old)."""
    origin.set("/r", headers=headers)
    _first, second = await _twice(origin, make_proxy, DEFAULT_TTL=0)  # both 200
    if "Age" in headers:  # older than any freshness: expired on arrival, not stored
        assert origin.count("/r") == 2
    else:
        assert (second.x_cache, second.body) == ("HIT-L1", FIRST_BODY), second


# ---- targeted cache control (RFC 9213) ------------------------------------------------------


async def test_cdn_cache_control_shortens_what_cache_control_allows(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    clock = SteppedClock()
    origin.set("/r", headers={"Cache-Control": "max-age=3600", "CDN-Cache-Control": "max-age=5"})
    proxy = await make_proxy(clock=clock)

    assert (await proxy.get("/r")).x_cache == "MISS"
    clock.advance(3)
    assert (await proxy.get("/r")).x_cache == "HIT-L1"
    clock.advance(3)  # past CDN-Cache-Control's 5 s, well within Cache-Control's hour
    after = await proxy.get("/r")
    assert after.x_cache == "MISS", after
    assert origin.count("/r") == 2
    # Cache-Control goes on to the client untouched: it is for the caches after this one.
    assert after.headers["Cache-Control"] == "max-age=3600"


@pytest.mark.parametrize(
    ("headers", "env", "hit"),
    [
        ({"Cache-Control": "no-store", "CDN-Cache-Control": "max-age=600"}, {}, True),
        ({"Cache-Control": "max-age=600", "CDN-Cache-Control": "no-store"}, {}, False),
        ({"Cache-Control": "max-age=600", "CDN-Cache-Control": "private"}, {}, False),
        ({"Cache-Control": "max-age=600", "CDN-Cache-Control": "no-cache"}, {}, False),
        ({"Cache-Control": "no-store", "CDN-Cache-Control": "max-age=600, &&&"}, {}, False),
        ({"Cache-Control": "no-store", "CDN-Cache-Control": 'max-age="600"'}, {}, False),
        (
            {"CDN-Cache-Control": "no-store", "Tierproxy-Cache-Control": "max-age=600"},
            {},
            True,
        ),
        # The operator's target list: off, or another field.
        (
            {"Cache-Control": "no-store", "CDN-Cache-Control": "max-age=600"},
            {"TARGETED_FIELDS": ""},
            False,
        ),
        (
            {"CDN-Cache-Control": "no-store", "X-Edge-Control": "max-age=600"},
            {"TARGETED_FIELDS": "x-edge-control"},
            True,
        ),
    ],
    ids=[
        "cdn-fresh-over-cc-no-store",
        "cdn-no-store-over-cc-fresh",
        "cdn-private",
        "cdn-no-cache",
        "cdn-invalid-field-ignored",
        "cdn-wrong-type-ignored",
        "tierproxy-field-first",
        "targeting-off",
        "operator-field",
    ],
)
async def test_targeted_fields_decide_for_this_cache(
    headers: dict[str, str],
    env: dict[str, str],
    hit: bool,
    origin: Origin,
    make_proxy: MakeProxy,
    redis_url: str,
    sqlite_path: Path,
) -> None:
    origin.set("/r", headers=headers)
    proxy = await make_proxy(**env)
    first = await proxy.get("/r")
    second = await proxy.get("/r")

    assert (first.status, second.status) == (200, 200)
    assert first.x_cache in ("MISS", "BYPASS"), first  # BYPASS: not stored
    if hit:
        assert second.x_cache == "HIT-L1", second
        assert second.body == FIRST_BODY
        assert origin.count("/r") == 1
    else:
        assert second.x_cache in ("MISS", "BYPASS"), second
        assert origin.count("/r") == 2
    for name, value in headers.items():  # targeted fields are passed on, not consumed
        assert second.headers.get(name) == value, second


async def test_a_bad_targeted_fields_setting_stops_start_up(spawn_proxy: SpawnProxy) -> None:
    proc = await spawn_proxy(wait_healthy=False, TARGETED_FIELDS="cdn cache control")

    code = await proc.wait(15)

    assert code == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "TIERPROXY_TARGETED_FIELDS='cdn cache control'" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


# ---- what is stored -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [299, 400, 403, 500, 502, 503, 504, 599])
async def test_any_status_with_explicit_freshness_is_stored_in_every_tier(
    status: int, origin: Origin, make_proxy: MakeProxy, redis_url: str, sqlite_path: Path
) -> None:
    origin.set("/r", status=status, headers={"Cache-Control": "max-age=600"})
    proxy = await make_proxy()
    first = await proxy.get("/r")
    second = await proxy.get("/r")

    assert (first.status, second.status) == (status, status)
    assert first.x_cache == "MISS", first
    assert second.x_cache == "HIT-L1", second
    assert second.body == FIRST_BODY
    assert origin.count("/r") == 1
    await proxy.settle()
    assert sqlite_count(sqlite_path) == 1

    # A fresh process reads it back from L2 (Redis).
    fresh = await make_proxy()
    third = await fresh.get("/r")
    assert (third.status, third.x_cache, third.body) == (status, "HIT-L2", FIRST_BODY)


@pytest.mark.parametrize(
    ("status", "headers", "stored"),
    [
        (501, {"Last-Modified": "Thu, 01 Jan 2026 00:00:00 GMT"}, True),  # heuristic
        (404, {}, True),
        (599, {"Cache-Control": "public"}, True),
        (503, {"Last-Modified": "Thu, 01 Jan 2026 00:00:00 GMT"}, False),
        (599, {}, False),
        (403, {}, False),
        (201, {}, False),
    ],
)
async def test_heuristic_freshness_only_for_the_heuristically_cacheable_statuses(
    status: int, headers: dict[str, str], stored: bool, origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/r", status=status, headers=headers)
    first, second = await _twice(origin, make_proxy, status=status, DEFAULT_TTL=600)

    assert first.x_cache in ("MISS", "BYPASS"), first
    if stored:
        assert second.x_cache == "HIT-L1", second
        assert origin.count("/r") == 1
    else:
        assert second.x_cache in ("MISS", "BYPASS"), second
        assert origin.count("/r") == 2


@pytest.mark.parametrize(("status", "stored"), [(200, True), (404, True), (599, False)])
async def test_must_understand_overrides_no_store_for_understood_statuses(
    status: int, stored: bool, origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set(
        "/r", status=status, headers={"Cache-Control": "max-age=600, no-store, must-understand"}
    )
    first, second = await _twice(origin, make_proxy, status=status)

    assert first.x_cache in ("MISS", "BYPASS"), first
    assert (second.x_cache == "HIT-L1") is stored, second
    assert origin.count("/r") == (1 if stored else 2)


@pytest.mark.parametrize("directive", ["private", "no-cache"])
async def test_qualified_private_and_no_cache_keep_the_named_fields_out_of_the_stored_copy(
    directive: str, origin: Origin, make_proxy: MakeProxy, redis_url: str
) -> None:
    cache_control = f'max-age=600, {directive}="X-User"'
    origin.set("/r", headers={"Cache-Control": cache_control, "X-User": "alice", "X-Kept": "1"})
    proxy = await make_proxy()
    first = await proxy.get("/r")
    second = await proxy.get("/r")

    assert first.headers.get("X-User") == "alice", first  # the client that asked gets it all
    assert second.x_cache == "HIT-L1", second
    assert "X-User" not in second.headers, second
    assert second.headers.get("X-Kept") == "1", second
    assert origin.count("/r") == 1
    from_l2 = await (await make_proxy()).get("/r")
    assert from_l2.x_cache == "HIT-L2", from_l2
    assert "X-User" not in from_l2.headers, from_l2


async def test_a_chunked_response_is_stored_with_its_length_not_its_transfer_coding(
    origin: Origin, make_proxy: MakeProxy, sqlite_path: Path
) -> None:
    origin.set(
        "/r", headers={"Cache-Control": "max-age=600", "Trailer": "X-T"}, size=50_000, chunked=True
    )
    proxy = await make_proxy()
    first = await proxy.get("/r")
    second = await proxy.get("/r")

    assert second.x_cache == "HIT-L1", second
    assert second.body == first.body and len(second.body) == 50_000
    assert second.headers.get("Content-Length") == "50000", second
    assert "Transfer-Encoding" not in second.headers, second
    assert "Trailer" not in second.headers, second
    # The same from L3, read by a fresh process.
    await proxy.settle()
    from_l3 = await (await make_proxy()).get("/r")
    assert from_l3.x_cache == "HIT-L3", from_l3
    assert from_l3.headers.get("Content-Length") == "50000", from_l3
    assert "Transfer-Encoding" not in from_l3.headers, from_l3


# ---- a stored 5xx and stale-on-error --------------------------------------------------------


async def test_a_stored_503_is_a_hit_while_fresh_and_stands_in_when_the_origin_fails(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    clock = SteppedClock()
    origin.set("/r", status=503, headers={"Cache-Control": "max-age=10"})
    proxy = await make_proxy(clock=clock, MAX_STALE=3600)

    assert (await proxy.get("/r")).x_cache == "MISS"
    hit = await proxy.get("/r")
    assert (hit.status, hit.x_cache, hit.body) == (503, "HIT-L1", FIRST_BODY)

    # Stale now; the origin fails outright: the stored 503 stands in, as any stale copy does.
    clock.advance(20)
    origin.set("/r", status=500)
    stale = await proxy.get("/r")
    assert (stale.status, stale.x_cache, stale.body) == (503, "STALE-L1", FIRST_BODY)
    assert origin.count("/r") == 2

    # The origin recovers: its 200 replaces the 503.
    origin.set("/r", headers={"Cache-Control": "max-age=10"})
    recovered = await proxy.get("/r")
    assert (recovered.status, recovered.x_cache) == (200, "MISS"), recovered
    assert (await proxy.get("/r")).x_cache == "HIT-L1"


async def test_a_stale_200_beats_a_fresh_looking_503_on_revalidation(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    clock = SteppedClock()
    origin.set("/r", headers={"Cache-Control": "max-age=10"})
    proxy = await make_proxy(clock=clock, MAX_STALE=3600)
    assert (await proxy.get("/r")).x_cache == "MISS"

    clock.advance(20)
    origin.set("/r", status=503, headers={"Cache-Control": "max-age=600"})
    served = await proxy.get("/r")
    assert (served.status, served.x_cache, served.body) == (200, "STALE-L1", FIRST_BODY)
    # The 503 was not stored over the good copy: the next request asks the origin again.
    again = await proxy.get("/r")
    assert (again.status, again.x_cache) == (200, "STALE-L1"), again
    assert origin.count("/r") == 3
