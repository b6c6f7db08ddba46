"""The request's states and the pure decisions between them (tierproxy.states).

The X-Cache strings are the ones the orchestrator produced before the states existed (clients
and dashboards read them); the Cache-Status members (RFC 9211, one per tier) are pinned too,
and parsed with an RFC 8941 parser: each case is pinned here, byte for byte.
"""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from support.storage import parse_cache_status, tier_members

from tierproxy.entry import Entry
from tierproxy.origin import OriginResponse
from tierproxy.states import (
    Failed,
    Fetched,
    Final,
    FreshHit,
    NeedsRevalidation,
    OriginFailed,
    Relayed,
    StaleHit,
    Stored,
    Trace,
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


# ---- labels: X-Cache and tierproxy's Cache-Status members ------------------------------------
#
# X-Cache is pinned byte for byte (clients and dashboards read it). Cache-Status is pinned too,
# and every value is also read back with a real RFC 8941 parser (http_sf) and checked for
# RFC 9211 §2 order: one member per tier reached, L3 (closest to the origin) first.

MISSED: Trace = (("l1", "uri-miss"), ("l2", "uri-miss"), ("l3", "uri-miss"))


def _labels(final: Final, now: float = NOW) -> tuple[str, str]:
    x_cache, value = labels(final, now)
    members = tier_members(value)  # parses (RFC 8941) and checks names and order
    assert list(members) == [name for name, _ in reversed(final.tiers)] or not final.tiers
    return x_cache, value


@pytest.mark.parametrize(
    ("tier", "x_cache"), [("l1", "HIT-L1"), ("l2", "HIT-L2"), ("l3", "HIT-L3")]
)
def test_a_fresh_hit_with_only_its_tier_asked(tier: str, x_cache: str) -> None:
    assert _labels(FreshHit(tier, _entry(fresh=10.7))) == (
        x_cache,
        f"tierproxy-{tier}; hit; ttl=10",
    )


def test_an_l2_hit_lists_the_l1_miss_and_the_backfill_into_l1() -> None:
    hit = FreshHit("l2", _entry(fresh=58.2), (("l1", "uri-miss"), ("l2", "hit")))
    assert _labels(hit) == (
        "HIT-L2",
        "tierproxy-l2; hit; ttl=58, tierproxy-l1; fwd=uri-miss; stored",
    )
    [l2, l1] = parse_cache_status(_labels(hit)[1])
    assert (l2.hit, l2.ttl, l1.fwd, l1.stored, l1.hit) == (True, 58, "uri-miss", True, False)


def test_an_l3_hit_after_an_l2_timeout_says_why_l2_did_not_answer() -> None:
    trace: Trace = (("l1", "uri-miss"), ("l2", "timeout"), ("l3", "hit"))
    assert _labels(FreshHit("l3", _entry(fresh=30), trace)) == (
        "HIT-L3",
        (
            "tierproxy-l3; hit; ttl=30, tierproxy-l2; fwd=uri-miss; stored; detail=timeout, "
            "tierproxy-l1; fwd=uri-miss; stored"
        ),
    )


@pytest.mark.parametrize("why", ["timeout", "error", "breaker-open", "skipped", "corrupt"])
def test_a_tier_that_did_not_answer_is_a_uri_miss_with_its_reason(why: str) -> None:
    trace: Trace = (("l1", "uri-miss"), ("l2", why), ("l3", "vary-miss"))
    value = _labels(Fetched(_entry(), "miss", tiers=trace))[1]
    members = tier_members(value)
    assert (members["l2"].fwd, members["l2"].detail) == ("uri-miss", why), value
    assert (members["l3"].fwd, members["l3"].fwd_status, members["l3"].detail) == (
        "vary-miss",
        200,
        None,
    )


def test_hedged_lookups_list_both_tiers() -> None:
    # L3 answered first, fresh: the L2 lookup was cancelled; both are backfilled.
    won = FreshHit("l3", _entry(fresh=5), (("l1", "uri-miss"), ("l2", "cancelled"), ("l3", "hit")))
    assert _labels(won)[1] == (
        "tierproxy-l3; hit; ttl=5, tierproxy-l2; fwd=uri-miss; stored; detail=cancelled, "
        "tierproxy-l1; fwd=uri-miss; stored"
    )
    # L3 answered first with nothing, then L2 with a fresh copy.
    late = FreshHit("l2", _entry(fresh=58), (("l1", "uri-miss"), ("l2", "hit"), ("l3", "uri-miss")))
    assert _labels(late)[1] == (
        "tierproxy-l3; fwd=uri-miss, tierproxy-l2; hit; ttl=58, tierproxy-l1; fwd=uri-miss; stored"
    )
    # L2 answered first with a stale copy, revalidated: L3 (cancelled) gets the answer too.
    trace: Trace = (("l1", "uri-miss"), ("l2", "stale"), ("l3", "cancelled"))
    revalidated = Fetched(_entry(), "stale", revalidated=True, tiers=trace)
    assert _labels(revalidated) == (
        "REVALIDATED",
        (
            "tierproxy-l3; fwd=uri-miss; stored; detail=cancelled, "
            "tierproxy-l2; fwd=stale; fwd-status=304; stored, tierproxy-l1; fwd=uri-miss; stored"
        ),
    )


def test_a_fresh_hit_written_just_past_its_freshness_says_ttl_0() -> None:
    # Found fresh, written a moment later: the full path reads the clock again.
    assert _labels(FreshHit("l3", _entry(fresh=-0.4))) == ("HIT-L3", "tierproxy-l3; hit; ttl=0")


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
def test_stale_hit_has_a_negative_ttl_and_its_reason(reason: str) -> None:
    stale = _entry(fresh=-0.3)
    trace: Trace = (("l1", "uri-miss"), ("l2", "stale"))
    # Within stale-while-revalidate the stale copy is backfilled into L1 too.
    stored = "; stored" if reason == "revalidating" else ""
    assert _labels(StaleHit("l2", stale, reason, trace)) == (
        "STALE-L2",
        f"tierproxy-l2; hit; ttl=-1; detail={reason}, tierproxy-l1; fwd=uri-miss{stored}",
    )
    [l2, _] = parse_cache_status(labels(StaleHit("l2", stale, reason, trace), NOW)[1])
    assert (l2.hit, l2.ttl, l2.detail) == (True, -1, reason)


@pytest.mark.parametrize(
    ("fwd", "collapsed", "value"),
    [
        (
            "miss",
            False,
            (
                "tierproxy-l3; fwd=uri-miss; fwd-status=200; stored, "
                "tierproxy-l2; fwd=uri-miss; stored, tierproxy-l1; fwd=uri-miss; stored"
            ),
        ),
        (
            "miss",
            True,
            (
                "tierproxy-l3; fwd=uri-miss; fwd-status=200; stored; collapsed, "
                "tierproxy-l2; fwd=uri-miss; stored, tierproxy-l1; fwd=uri-miss; stored"
            ),
        ),
    ],
)
def test_fetched_and_stored(fwd: str, collapsed: bool, value: str) -> None:
    assert _labels(Fetched(_entry(), fwd, collapsed=collapsed, tiers=MISSED)) == ("MISS", value)


def test_a_stale_copy_fetched_anew_is_told_on_its_tier() -> None:
    trace: Trace = (("l1", "uri-miss"), ("l2", "stale"))
    assert _labels(Fetched(_entry(), "stale", tiers=trace)) == (
        "MISS",
        "tierproxy-l2; fwd=stale; fwd-status=200; stored, tierproxy-l1; fwd=uri-miss; stored",
    )


def test_a_fetched_entry_reports_its_own_status() -> None:
    assert _labels(Fetched(_entry(status=404), "miss", tiers=(("l1", "vary-miss"),))) == (
        "MISS",
        "tierproxy-l1; fwd=vary-miss; fwd-status=404; stored",
    )


@pytest.mark.parametrize(
    ("collapsed", "value"),
    [
        (False, "tierproxy-l1; fwd=stale; fwd-status=304; stored"),
        (True, "tierproxy-l1; fwd=stale; fwd-status=304; stored; collapsed"),
    ],
)
def test_revalidated(collapsed: bool, value: str) -> None:
    final = Fetched(_entry(), "stale", True, collapsed, (("l1", "stale"),))
    assert _labels(final) == ("REVALIDATED", value)


def test_a_304_that_could_not_freshen_the_copy_is_not_stored() -> None:
    final = Fetched(_entry(), "stale", True, tiers=(("l1", "stale"),), stored=False)
    assert _labels(final) == ("REVALIDATED", "tierproxy-l1; fwd=stale; fwd-status=304")


@pytest.mark.parametrize(
    ("fwd", "reason"), [("miss", "no-store"), ("stale", "private"), ("miss", "too-large")]
)
def test_relayed_unstorable_is_a_bypass_with_its_reason(fwd: str, reason: str) -> None:
    trace: Trace = (("l1", "uri-miss"), ("l2", "stale" if fwd == "stale" else "uri-miss"))
    assert _labels(Relayed(_response(200), fwd, reason, trace)) == (
        "BYPASS",
        (
            f"tierproxy-l2; fwd={'stale' if fwd == 'stale' else 'uri-miss'}; fwd-status=200; "
            f"detail={reason}, tierproxy-l1; fwd=uri-miss"
        ),
    )


@pytest.mark.parametrize("fwd", ["miss", "stale"])
def test_relayed_origin_5xx_is_a_miss(fwd: str) -> None:
    held = "stale" if fwd == "stale" else "uri-miss"
    assert _labels(Relayed(_response(503), fwd, "origin-5xx", (("l1", held),))) == (
        "MISS",
        f"tierproxy-l1; fwd={held}; fwd-status=503; detail=origin-5xx",
    )


@pytest.mark.parametrize(("fwd", "status"), [("bypass", 200), ("method", 201), ("bypass", 502)])
def test_relayed_pass_through_is_told_on_the_first_tier_alone(fwd: str, status: int) -> None:
    assert _labels(Relayed(_response(status), fwd, tiers=(("l1", fwd),))) == (
        "BYPASS",
        f"tierproxy-l1; fwd={fwd}; fwd-status={status}",
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
    assert _labels(Failed(status, reason, "miss", MISSED)) == (
        "MISS",
        (
            f"tierproxy-l3; fwd=uri-miss; detail={reason}, tierproxy-l2; fwd=uri-miss, "
            "tierproxy-l1; fwd=uri-miss"
        ),
    )
    assert _labels(Failed(status, reason, "stale", (("l1", "uri-miss"), ("l2", "stale")))) == (
        "MISS",
        f"tierproxy-l2; fwd=stale; detail={reason}, tierproxy-l1; fwd=uri-miss",
    )
    for fwd in ("bypass", "method"):
        assert _labels(Failed(status, reason, fwd, (("l2", fwd),))) == (
            "BYPASS",
            f"tierproxy-l2; fwd={fwd}; detail={reason}",
        )


def test_a_tier_that_did_not_answer_and_the_fetch_that_failed_share_one_detail() -> None:
    trace: Trace = (("l1", "uri-miss"), ("l2", "breaker-open"))
    value = _labels(Failed(504, "origin-timeout", "miss", trace))[1]
    assert value == (
        'tierproxy-l2; fwd=uri-miss; detail="breaker-open origin-timeout", '
        "tierproxy-l1; fwd=uri-miss"
    )
    assert tier_members(value)["l2"].detail == "breaker-open origin-timeout"


def test_a_detail_that_is_no_token_is_quoted_as_an_sf_string() -> None:
    value = _labels(Relayed(_response(200), "miss", 'a"b\\c é', (("l1", "uri-miss"),)))[1]
    assert value == 'tierproxy-l1; fwd=uri-miss; fwd-status=200; detail="a\\"b\\\\c ?"'
    assert tier_members(value)["l1"].detail == 'a"b\\c ?'


def test_a_request_that_reached_no_tier_has_no_member() -> None:
    assert labels(Fetched(_entry(), "miss"), NOW) == ("MISS", "")
    assert labels(Failed(502, "origin-error", "method"), NOW) == ("BYPASS", "")


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
        entry, "stale", revalidated=True, stored=False
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


def test_the_lookup_trace_goes_on_to_the_final_state() -> None:
    trace: Trace = (("l1", "uri-miss"), ("l2", "stale"))
    held = NeedsRevalidation("l2", _entry(fresh=-1, stale=30, swr=5), trace)
    assert on_stale(held, NOW, True).tiers == trace
    entry = _entry()
    assert after_fetch(Stored(entry, False), held, NOW, tiers=MISSED).tiers == trace
    assert after_fetch(Stored(entry, False), None, NOW, tiers=MISSED).tiers == MISSED
    assert after_fetch(OriginFailed("origin-timeout"), held, NOW).tiers == trace
    assert after_fetch(OriginFailed("shed"), None, NOW, tiers=MISSED) == Failed(
        503, "shed", "miss", MISSED
    )
    value = labels(
        after_fetch(Unstorable(_response(200), "private"), None, NOW, False, MISSED), NOW
    )
    assert tier_members(value[1])["l3"].detail == "private"
