"""The request's states and the pure decisions between them (tierproxy.states).

The X-Cache and Cache-Status strings are the ones the orchestrator produced before the states
existed (clients and dashboards read them): each case is pinned here, byte for byte.
"""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from tierproxy.entry import Entry
from tierproxy.origin import OriginResponse
from tierproxy.states import (
    Failed,
    Fetched,
    FreshHit,
    NeedsRevalidation,
    OriginFailed,
    Relayed,
    StaleHit,
    Stored,
    Unstorable,
    after_fetch,
    freshness,
    labels,
    on_stale,
    stale_at_deadline,
    stale_usable,
)

NOW = 1_700_000_000.0


def _entry(
    *, fresh: float = 10, swr: float = 0, stale: float = 30, expires: float = 60, status: int = 200
) -> Entry:
    """An entry stored at NOW - 5, fresh/swr/stale/expiry ``fresh``... seconds after NOW."""
    return Entry(
        key="/k",
        status=status,
        headers=(),
        body=b"x",
        stored_at=NOW - 5,
        fresh_until=NOW + fresh,
        stale_until=NOW + stale,
        swr_until=NOW + swr,
        expires_at=NOW + expires,
    )


def _response(status: int) -> OriginResponse:
    return OriginResponse(status, CIMultiDictProxy(CIMultiDict()), b"", None, b"", NOW, NOW)


# ---- labels: X-Cache and tierproxy's Cache-Status member ------------------------------------


@pytest.mark.parametrize(
    ("tier", "x_cache"), [("l1", "HIT-L1"), ("l2", "HIT-L2"), ("l3", "HIT-L3")]
)
def test_fresh_hit(tier: str, x_cache: str) -> None:
    assert labels(FreshHit(tier, _entry(fresh=10.7)), NOW) == (
        x_cache,
        f"tierproxy; hit; ttl=10; detail={tier}",
    )


def test_a_fresh_hit_written_just_past_its_freshness_says_ttl_0() -> None:
    # Found fresh, written a moment later: the full path reads the clock again.
    assert labels(FreshHit("l3", _entry(fresh=-0.4)), NOW) == (
        "HIT-L3",
        "tierproxy; hit; ttl=0; detail=l3",
    )


@pytest.mark.parametrize(
    "reason",
    [
        "revalidating",
        "origin-down",
        "origin-backoff",
        "origin-slow",
        "origin-timeout",
        "origin-error",
        "origin-5xx",
        "origin-busy",
        "shed",
        "local-error",
    ],
)
def test_stale_hit_has_a_negative_ttl_and_its_reason_quoted(reason: str) -> None:
    stale = _entry(fresh=-0.3)
    assert labels(StaleHit("l2", stale, reason), NOW) == (
        "STALE-L2",
        f'tierproxy; hit; ttl=-1; detail="{reason}"',
    )


@pytest.mark.parametrize(
    ("fwd", "collapsed", "member"),
    [
        ("miss", False, "tierproxy; fwd=miss; fwd-status=200; stored"),
        ("stale", False, "tierproxy; fwd=stale; fwd-status=200; stored"),
        ("miss", True, "tierproxy; fwd=miss; fwd-status=200; stored; collapsed"),
    ],
)
def test_fetched_and_stored(fwd: str, collapsed: bool, member: str) -> None:
    assert labels(Fetched(_entry(), fwd, collapsed=collapsed), NOW) == ("MISS", member)


def test_a_fetched_entry_reports_its_own_status() -> None:
    assert labels(Fetched(_entry(status=404), "miss"), NOW) == (
        "MISS",
        "tierproxy; fwd=miss; fwd-status=404; stored",
    )


@pytest.mark.parametrize(
    ("collapsed", "member"),
    [
        (False, "tierproxy; fwd=stale; fwd-status=304; stored"),
        (True, "tierproxy; fwd=stale; fwd-status=304; stored; collapsed"),
    ],
)
def test_revalidated(collapsed: bool, member: str) -> None:
    assert labels(Fetched(_entry(), "stale", revalidated=True, collapsed=collapsed), NOW) == (
        "REVALIDATED",
        member,
    )


@pytest.mark.parametrize(
    ("fwd", "reason"), [("miss", "no-store"), ("stale", "private"), ("miss", "too-large")]
)
def test_relayed_unstorable_is_a_bypass_with_its_reason(fwd: str, reason: str) -> None:
    assert labels(Relayed(_response(200), fwd, reason), NOW) == (
        "BYPASS",
        f'tierproxy; fwd={fwd}; fwd-status=200; detail="{reason}"',
    )


@pytest.mark.parametrize("fwd", ["miss", "stale"])
def test_relayed_origin_5xx_is_a_miss(fwd: str) -> None:
    assert labels(Relayed(_response(503), fwd, "origin-5xx"), NOW) == (
        "MISS",
        f'tierproxy; fwd={fwd}; fwd-status=503; detail="origin-5xx"',
    )


@pytest.mark.parametrize(("fwd", "status"), [("bypass", 200), ("method", 201), ("bypass", 502)])
def test_relayed_pass_through_has_no_detail(fwd: str, status: int) -> None:
    assert labels(Relayed(_response(status), fwd), NOW) == (
        "BYPASS",
        f"tierproxy; fwd={fwd}; fwd-status={status}",
    )


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (504, "origin-timeout"),
        (502, "origin-error"),
        (503, "origin-busy"),
        (503, "shed"),
        (500, "local-error"),
    ],
)
def test_failed(status: int, reason: str) -> None:
    assert labels(Failed(status, reason, "miss"), NOW) == (
        "MISS",
        f'tierproxy; fwd=miss; detail="{reason}"',
    )
    assert labels(Failed(status, reason, "stale"), NOW) == (
        "MISS",
        f'tierproxy; fwd=stale; detail="{reason}"',
    )
    for fwd in ("bypass", "method"):
        assert labels(Failed(status, reason, fwd), NOW) == (
            "BYPASS",
            f'tierproxy; fwd={fwd}; detail="{reason}"',
        )


def test_a_detail_is_quoted_as_an_sf_string() -> None:
    assert labels(Relayed(_response(200), "miss", 'a"b\\c'), NOW)[1] == (
        'tierproxy; fwd=miss; fwd-status=200; detail="a\\"b\\\\c"'
    )


# ---- freshness -------------------------------------------------------------------------------


def test_freshness_boundaries() -> None:
    entry = _entry(fresh=10, expires=60)
    assert freshness(entry, NOW + 9.999) == "fresh"
    assert freshness(entry, NOW + 10) == "stale"
    assert freshness(entry, NOW + 59.999) == "stale"
    assert freshness(entry, NOW + 60) == "expired"


def test_stale_usable_until_its_stale_limit() -> None:
    entry = _entry(fresh=-1, stale=30)
    assert stale_usable(entry, NOW + 29.9)
    assert not stale_usable(entry, NOW + 30)


# ---- on_stale --------------------------------------------------------------------------------


def test_within_stale_while_revalidate_the_copy_is_served_whatever_the_breaker() -> None:
    copy = NeedsRevalidation("l3", _entry(fresh=-1, swr=5))
    for allowed in (True, False):
        assert on_stale(copy, NOW, allowed) == StaleHit("l3", copy.entry, "revalidating")


def test_with_the_breaker_open_a_usable_copy_is_served_at_once() -> None:
    copy = NeedsRevalidation("l1", _entry(fresh=-1, stale=30))
    assert on_stale(copy, NOW, origin_allowed=False) == StaleHit("l1", copy.entry, "origin-down")


def test_with_the_breaker_open_a_copy_past_its_stale_limit_still_asks_the_origin() -> None:
    copy = NeedsRevalidation("l1", _entry(fresh=-10, stale=-1))
    assert on_stale(copy, NOW, origin_allowed=False) is copy


def test_with_the_origin_allowed_a_stale_copy_is_revalidated() -> None:
    copy = NeedsRevalidation("l2", _entry(fresh=-1, stale=30))
    assert on_stale(copy, NOW, origin_allowed=True) is copy


def test_while_its_key_backs_off_a_usable_copy_is_served_at_once() -> None:
    copy = NeedsRevalidation("l2", _entry(fresh=-1, stale=30))
    assert on_stale(copy, NOW, True, key_allowed=False) == StaleHit(
        "l2", copy.entry, "origin-backoff"
    )
    # The breaker's answer comes first: the whole origin is down, not just this key.
    assert on_stale(copy, NOW, False, key_allowed=False) == StaleHit(
        "l2", copy.entry, "origin-down"
    )
    # Within stale-while-revalidate it is still a background revalidation.
    swr = NeedsRevalidation("l2", _entry(fresh=-1, swr=5))
    assert on_stale(swr, NOW, True, key_allowed=False) == StaleHit("l2", swr.entry, "revalidating")


def test_while_its_key_backs_off_a_copy_past_its_stale_limit_still_asks_the_origin() -> None:
    copy = NeedsRevalidation("l1", _entry(fresh=-10, stale=-1))
    assert on_stale(copy, NOW, True, key_allowed=False) is copy


def test_the_stale_deadline_applies_only_to_a_copy_that_may_stand_in() -> None:
    usable = _entry(fresh=-1, stale=30)
    assert stale_at_deadline(usable, NOW, 0.2)
    assert not stale_at_deadline(usable, NOW, 0)  # off
    assert not stale_at_deadline(_entry(fresh=-10, stale=-1), NOW, 0.2)


# ---- after_fetch -----------------------------------------------------------------------------


def test_a_stored_answer_is_fetched() -> None:
    entry = _entry()
    assert after_fetch(Stored(entry, revalidated=False), None, NOW) == Fetched(entry, "miss")
    held = NeedsRevalidation("l1", _entry(fresh=-1))
    assert after_fetch(Stored(entry, revalidated=True), held, NOW, collapsed=True) == Fetched(
        entry, "stale", revalidated=True, collapsed=True
    )
    # A 304 whose copy could not be freshened is still this request's answer.
    assert after_fetch(Stored(entry, True, keep=False), held, NOW) == Fetched(
        entry, "stale", revalidated=True
    )


def test_an_unstorable_answer_is_relayed_with_its_reason() -> None:
    response = _response(200)
    assert after_fetch(Unstorable(response, "no-store"), None, NOW) == Relayed(
        response, "miss", "no-store"
    )
    held = NeedsRevalidation("l1", _entry(fresh=-1))
    assert after_fetch(Unstorable(response, "private", invalidates=True), held, NOW) == Relayed(
        response, "stale", "private"
    )


@pytest.mark.parametrize(
    "reason",
    ["origin-timeout", "origin-slow", "origin-error", "origin-busy", "shed", "local-error"],
)
def test_an_origin_failure_is_answered_with_a_usable_stale_copy(reason: str) -> None:
    held = NeedsRevalidation("l2", _entry(fresh=-1, stale=30))
    assert after_fetch(OriginFailed(reason), held, NOW) == StaleHit("l2", held.entry, reason)


def test_an_origin_5xx_is_answered_with_a_usable_stale_copy() -> None:
    held = NeedsRevalidation("l1", _entry(fresh=-1, stale=30))
    failed = OriginFailed("origin-5xx", _response(500))
    assert after_fetch(failed, held, NOW) == StaleHit("l1", held.entry, "origin-5xx")


def test_an_origin_5xx_without_a_usable_copy_is_relayed() -> None:
    response = _response(502)
    assert after_fetch(OriginFailed("origin-5xx", response), None, NOW) == Relayed(
        response, "miss", "origin-5xx"
    )
    too_old = NeedsRevalidation("l1", _entry(fresh=-10, stale=-1))
    assert after_fetch(OriginFailed("origin-5xx", response), too_old, NOW) == Relayed(
        response, "stale", "origin-5xx"
    )


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        ("origin-timeout", 504),
        ("origin-slow", 504),
        ("origin-error", 502),
        ("origin-busy", 503),
        ("shed", 503),
        ("local-error", 500),
    ],
)
def test_an_origin_failure_without_a_usable_copy_fails_with_its_status(
    reason: str, status: int
) -> None:
    assert after_fetch(OriginFailed(reason), None, NOW) == Failed(status, reason, "miss")
    too_old = NeedsRevalidation("l3", _entry(fresh=-10, stale=-1))
    assert after_fetch(OriginFailed(reason), too_old, NOW) == Failed(status, reason, "stale")
