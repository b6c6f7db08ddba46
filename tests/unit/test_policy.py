"""RFC 9111 / 5861 decisions as tables: headers in, decision out. No sockets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from tierproxy import policy
from tierproxy.entry import Entry

NOW = 1_800_000_000.0
POLICY = policy.CachePolicy(default_ttl=60, max_stale=3600)


def h(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def decide(
    resp: Sequence[tuple[str, str]],
    req: Sequence[tuple[str, str]] = (),
    status: int = 200,
    method: str = "GET",
    pol: policy.CachePolicy = POLICY,
) -> policy.StoreDecision:
    return policy.decide_storage(method, h(*req), status, h(*resp), NOW, NOW, pol)


@pytest.mark.parametrize(
    ("response_headers", "request_headers", "status", "reason"),
    [
        ([("Cache-Control", "no-store")], [], 200, "no-store"),
        ([("Cache-Control", "max-age=60, private")], [], 200, "private"),
        ([("Cache-Control", 'max-age=60, private=""')], [], 200, "private"),  # names none
        ([("Cache-Control", "max-age=60"), ("Set-Cookie", "a=b")], [], 200, "set-cookie"),
        ([("Cache-Control", "max-age=60")], [("Authorization", "Bearer x")], 200, "authorization"),
        ([("Cache-Control", "max-age=60")], [("Cookie", "sid=1")], 200, "cookie"),
        ([("Cache-Control", "max-age=60"), ("Vary", "Accept, *")], [], 200, "vary-star"),
        ([("Cache-Control", "max-age=60")], [], 304, "status"),
        ([("Cache-Control", "max-age=60")], [], 101, "status"),
        ([("Cache-Control", "max-age=60")], [], 206, "status"),
        ([], [], 302, "no-freshness"),  # not heuristically cacheable
        ([("Cache-Control", "max-age=0")], [], 200, "expired"),  # no validators, nothing to keep
    ],
)
def test_not_storable(
    response_headers: list[tuple[str, str]],
    request_headers: list[tuple[str, str]],
    status: int,
    reason: str,
) -> None:
    pol = policy.CachePolicy(default_ttl=60, max_stale=0)
    decision = decide(response_headers, request_headers, status, pol=pol)
    assert not decision.storable
    assert decision.reason == reason


@pytest.mark.parametrize(
    ("response_headers", "request_headers", "lifetime"),
    [
        ([("Cache-Control", "max-age=100")], [], 100),
        ([("Cache-Control", "max-age=100, s-maxage=7")], [], 7),  # §4.2.1: s-maxage first
        ([("Cache-Control", "MAX-AGE=100")], [], 100),  # directive names are case-insensitive
        ([("Cache-Control", 'max-age="100"')], [], 100),
        (
            [
                ("Expires", "Fri, 15 Jan 2027 08:00:30 GMT"),
                ("Date", "Fri, 15 Jan 2027 08:00:00 GMT"),
            ],
            [],
            30,
        ),
        ([], [], 60),  # default TTL for a heuristically cacheable status
        ([("Cache-Control", "public, max-age=10")], [("Authorization", "x")], 10),  # §3.5
        ([("Cache-Control", "s-maxage=10")], [("Cookie", "a=b")], 10),
        ([("Cache-Control", "max-age=100, no-cache"), ("ETag", '"x"')], [], 0),
    ],
)
def test_storable_with_lifetime(
    response_headers: list[tuple[str, str]], request_headers: list[tuple[str, str]], lifetime: int
) -> None:
    decision = decide(response_headers, request_headers)
    assert decision.storable, decision.reason
    assert decision.fresh_until - decision.stored_at == pytest.approx(lifetime)


@pytest.mark.parametrize(
    "response_headers",
    [
        [("Expires", "Fri, 31 Dec 9999 23:59:59 GMT"), ("Date", "Fri, 15 Jan 2027 08:00:00 GMT")],
        [("Cache-Control", "max-age=999999999999")],
        [("Cache-Control", "public, s-maxage=999999999")],
        [
            (
                "Cache-Control",
                "max-age=999999999, stale-if-error=999999999, stale-while-revalidate=999999999",
            )
        ],
    ],
)
def test_no_lifetime_or_stale_window_exceeds_max_ttl(
    response_headers: list[tuple[str, str]],
) -> None:
    pol = policy.CachePolicy(default_ttl=60, max_stale=3600, max_ttl=1000)
    decision = decide(response_headers, pol=pol)
    assert decision.storable
    assert decision.fresh_until - decision.stored_at == pytest.approx(1000)
    assert decision.swr_until - decision.fresh_until <= 1000
    assert decision.stale_until - decision.fresh_until <= max(1000, 3600)


def test_max_ttl_caps_the_default_ttl_too() -> None:
    pol = policy.CachePolicy(default_ttl=600, max_stale=0, max_ttl=30)
    decision = decide([], pol=pol)
    assert decision.fresh_until - decision.stored_at == pytest.approx(30)


def test_invalid_expires_means_already_expired_but_kept_for_revalidation() -> None:
    decision = decide([("Expires", "0"), ("ETag", '"v"')])
    assert decision.storable
    assert decision.fresh_until == pytest.approx(NOW)
    assert decision.expires_at > NOW


def test_age_header_makes_the_copy_older() -> None:
    decision = decide([("Cache-Control", "max-age=100"), ("Age", "40")])
    assert decision.stored_at == pytest.approx(NOW - 40)
    assert decision.fresh_until == pytest.approx(NOW + 60)


def test_default_ttl_zero_stores_nothing_without_explicit_freshness() -> None:
    pol = policy.CachePolicy(default_ttl=0, max_stale=3600)
    assert decide([], pol=pol).reason == "no-freshness"
    assert decide([("Cache-Control", "max-age=5")], pol=pol).storable


@pytest.mark.parametrize(
    ("cache_control", "stale_for"),
    [
        ("max-age=10", 3600),  # operator's TIERPROXY_MAX_STALE
        ("max-age=10, stale-if-error=7200", 7200),  # the origin allows longer
        ("max-age=10, must-revalidate", 0),  # §4.2.4: never stale
        ("max-age=10, proxy-revalidate", 0),
        ("s-maxage=10", 0),  # §5.2.2.10: s-maxage implies proxy-revalidate
        ("max-age=10, must-revalidate, stale-if-error=30", 30),  # RFC 5861 grant
    ],
)
def test_stale_if_error_window(cache_control: str, stale_for: int) -> None:
    decision = decide([("Cache-Control", cache_control)])
    assert decision.stale_until - decision.fresh_until == pytest.approx(stale_for)


def test_stale_while_revalidate_window() -> None:
    decision = decide([("Cache-Control", "max-age=10, stale-while-revalidate=30")])
    assert decision.swr_until - decision.fresh_until == pytest.approx(30)
    decision = decide([("Cache-Control", "max-age=10, stale-while-revalidate=30, must-revalidate")])
    assert decision.swr_until == decision.fresh_until


@pytest.mark.parametrize(
    ("method", "headers", "has_body", "reason"),
    [
        ("GET", [], False, None),
        ("HEAD", [], False, None),
        ("POST", [], True, "method"),
        ("DELETE", [], False, "method"),
        ("GET", [], True, "request-body"),
        ("GET", [("Cache-Control", "no-store")], False, "request-no-store"),
        ("GET", [("Cache-Control", "no-cache")], False, None),  # preference, not honoured
    ],
)
def test_bypass_reason(
    method: str, headers: list[tuple[str, str]], has_body: bool, reason: str | None
) -> None:
    assert policy.bypass_reason(method, h(*headers), has_body) == reason


def test_parse_cache_control_handles_quotes_and_duplicates() -> None:
    cc = policy.parse_cache_control(['max-age=5, no-cache="a, b"', "max-age=9, Public"])
    assert cc == {"max-age": "5", "no-cache": "a, b", "public": None}


def test_end_to_end_strips_hop_by_hop_and_connection_listed() -> None:
    headers = h(
        ("Connection", "close, X-Secret"),
        ("X-Secret", "1"),
        ("Keep-Alive", "5"),
        ("TE", "trailers"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "x"),
        ("Content-Type", "text/plain"),
    )
    assert policy.end_to_end(headers) == [("Content-Type", "text/plain")]


def _entry(**kw: Any) -> Entry:
    base: dict[str, Any] = {
        "key": "/x",
        "status": 200,
        "headers": (("ETag", '"v1"'),),
        "body": b"x",
        "stored_at": NOW,
        "fresh_until": NOW + 10,
        "stale_until": NOW + 20,
        "swr_until": NOW + 10,
        "expires_at": NOW + 20,
        "etag": '"v1"',
        "last_modified": "Fri, 15 Jan 2027 08:00:00 GMT",
    }
    base.update(kw)
    return Entry(**base)


def test_freshen_from_304_updates_headers_and_lifetime() -> None:
    entry = _entry(headers=(("ETag", '"v1"'), ("Cache-Control", "max-age=10"), ("X-Old", "1")))
    fresh = policy.freshen(
        entry,
        h(("Cache-Control", "max-age=100"), ("ETag", '"v1"')),
        h(),
        NOW + 50,
        NOW + 50,
        POLICY,
    )
    assert fresh is not None
    assert fresh.fresh_until == pytest.approx(NOW + 150)
    assert dict(fresh.headers)["Cache-Control"] == "max-age=100"
    assert dict(fresh.headers)["X-Old"] == "1"
    assert fresh.body == entry.body


@pytest.mark.parametrize(
    ("validators", "updates"),
    [
        ([("ETag", '"v1"')], True),
        ([("ETag", 'W/"v1"')], True),  # the same opaque tag, weakly
        ([("ETag", '"v2"')], False),  # another representation: RFC 9111 §4.3.4
        ([("Last-Modified", "Fri, 15 Jan 2027 08:00:00 GMT")], True),
        ([("Last-Modified", "Fri, 15 Jan 2027 09:00:00 GMT")], False),
        ([("ETag", '"v1"'), ("Last-Modified", "Fri, 15 Jan 2027 09:00:00 GMT")], True),
        ([], True),  # no validator: the stored response it answered
    ],
)
def test_freshen_only_from_a_304_whose_validator_is_the_stored_one(
    validators: list[tuple[str, str]], updates: bool
) -> None:
    fresh = policy.freshen(
        _entry(), h(("Cache-Control", "max-age=100"), *validators), h(), NOW, NOW, POLICY
    )
    assert (fresh is not None) is updates


def test_freshen_refuses_when_the_304_forbids_storing() -> None:
    assert policy.freshen(_entry(), h(("Cache-Control", "no-store")), h(), NOW, NOW, POLICY) is None


def test_storable_headers_drop_age_length_and_cookies() -> None:
    stored = policy.storable_headers(
        h(
            ("Age", "3"),
            ("Content-Length", "1"),
            ("Set-Cookie", "a"),
            ("Surrogate-Key", "t"),
            ("Content-Type", "text/html"),
        )
    )
    assert stored == (("Content-Type", "text/html"),)
