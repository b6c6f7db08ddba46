"""Client conditionals answered 304 from a stored response in any tier (RFC 9110 §13.1,
§15.4.5; RFC 9111 §4.3.2), through the real proxy, origin, Redis and SQLite."""

from __future__ import annotations

import email.utils
import time
from pathlib import Path
from typing import Any

import pytest
from support.fixture_types import MakeProxy
from support.origin import Origin
from support.warm import warm_in_tier

NOW = time.time()
DATE = email.utils.formatdate(NOW, usegmt=True)
MODIFIED = email.utils.formatdate(NOW - 3600, usegmt=True)
HEADERS = {
    "Cache-Control": "max-age=300",
    "Expires": email.utils.formatdate(NOW + 300, usegmt=True),
    "Date": DATE,
    "Vary": "Accept-Encoding",
    "Content-Location": "/c.txt",
    "X-Other": "not on a 304",
}


@pytest.mark.parametrize("tier", ["l1", "l2", "l3"])
async def test_conditionals_answered_from_each_tier(
    tier: str,
    origin: Origin,
    make_proxy: MakeProxy,
    redis_url: str,
    redis_client: Any,
    sqlite_path: Path,
) -> None:
    origin.set("/c", body=b"conditional body", headers=HEADERS, etag='"c1"', last_modified=MODIFIED)
    proxy = await warm_in_tier(tier, "/c", make_proxy, origin, redis_client, sqlite_path)
    hit = f"HIT-{tier.upper()}"

    cases: list[tuple[dict[str, str], int]] = [
        ({"If-None-Match": '"c1"'}, 304),
        ({"If-None-Match": 'W/"c1"'}, 304),  # weak comparison (RFC 9110 §13.1.2)
        ({"If-None-Match": '"x", "c1"'}, 304),
        ({"If-None-Match": "*"}, 304),
        ({"If-None-Match": '"c2"'}, 200),
        ({"If-Modified-Since": MODIFIED}, 304),
        ({"If-Modified-Since": DATE}, 304),  # later than Last-Modified
        ({"If-Modified-Since": email.utils.formatdate(NOW - 7200, usegmt=True)}, 200),
        ({"If-Modified-Since": "not a date"}, 200),  # ignored (§13.1.3)
        # If-None-Match decides alone: a matching date does not make it a 304 (§13.1.3).
        ({"If-None-Match": '"c2"', "If-Modified-Since": DATE}, 200),
    ]
    for headers, status in cases:
        got = await proxy.get("/c", headers=headers)
        assert got.status == status, (headers, got)
        assert got.x_cache == hit, (headers, got)
        if status == 200:
            assert got.body == b"conditional body"
            continue
        assert got.body == b""
        # RFC 9110 §15.4.5: the fields the 200 would have had that guide a cache update.
        for name in ("Cache-Control", "Expires", "Date", "Vary", "Content-Location"):
            assert got.headers[name] == HEADERS[name], (name, got.headers)
        assert got.headers["ETag"] == '"c1"'
        assert got.headers["Last-Modified"] == MODIFIED
        assert "X-Other" not in got.headers
        assert "Content-Range" not in got.headers

    head = await proxy.head("/c", headers={"If-None-Match": '"c1"'})
    assert head.status == 304 and head.x_cache == hit, head
    assert origin.count("/c") == 1


async def test_a_weak_stored_etag_matches_a_strong_if_none_match(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/weak", headers={"Cache-Control": "max-age=300"}, etag='W/"w"')
    proxy = await make_proxy()
    await proxy.get("/weak")

    got = await proxy.get("/weak", headers={"If-None-Match": '"w"'})

    assert got.status == 304 and got.x_cache == "HIT-L1", got
    assert got.headers["ETag"] == 'W/"w"'


async def test_if_modified_since_without_last_modified_uses_the_stored_date(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/nolm", headers={"Cache-Control": "max-age=300", "Date": DATE})
    proxy = await make_proxy()
    await proxy.get("/nolm")

    same = await proxy.get("/nolm", headers={"If-Modified-Since": DATE})
    later = await proxy.get(
        "/nolm", headers={"If-Modified-Since": email.utils.formatdate(NOW + 60, usegmt=True)}
    )
    earlier = await proxy.get(
        "/nolm", headers={"If-Modified-Since": email.utils.formatdate(NOW - 60, usegmt=True)}
    )

    assert same.status == 304 and same.x_cache == "HIT-L1", same
    assert later.status == 304, later
    assert earlier.status == 200 and earlier.body, earlier  # generated after that date


async def test_a_conditional_miss_fetches_unconditionally_and_answers_304(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set(
        "/cold", headers={"Cache-Control": "max-age=300"}, etag='"k"', honor_if_none_match=True
    )
    proxy = await make_proxy()

    got = await proxy.get("/cold", headers={"If-None-Match": '"k"'})
    plain = await proxy.get("/cold")

    assert got.status == 304 and got.x_cache == "MISS", got
    (seen,) = origin.requests_for("/cold")
    assert "If-None-Match" not in seen.headers  # the stored copy must be the whole response
    assert plain.status == 200 and plain.x_cache == "HIT-L1" and plain.body, plain


async def test_conditionals_on_a_stored_error_are_ignored(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/err", status=404, headers={"Cache-Control": "max-age=300"}, etag='"e"')
    proxy = await make_proxy()
    await proxy.get("/err")

    got = await proxy.get("/err", headers={"If-None-Match": '"e"'})

    assert got.status == 404 and got.x_cache == "HIT-L1", got  # RFC 9110 §13.2.1
