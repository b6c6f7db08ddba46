"""Strict freshness parsing, targeted cache control and what is storable, as tables:
header values in, decision out (RFC 9110 §5.6.7, RFC 9111 §3-§5, RFC 9213). No sockets."""

from __future__ import annotations

import calendar
import time
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from tierproxy import directives, policy
from tierproxy.config import ConfigError, load_settings

NOW = 1_800_000_000.0  # 2027-01-15
POLICY = policy.CachePolicy(default_ttl=60, max_stale=3600)


def h(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def decide(
    resp: Sequence[tuple[str, str]],
    status: int = 200,
    pol: policy.CachePolicy = POLICY,
    req: Sequence[tuple[str, str]] = (),
) -> policy.StoreDecision:
    return policy.decide_storage("GET", h(*req), status, h(*resp), NOW, NOW, pol)


def lifetime(
    resp: Sequence[tuple[str, str]], status: int = 200, pol: policy.CachePolicy = POLICY
) -> float | None:
    """Seconds of freshness a stored response gets; None when it is not stored. (Its ETag
    keeps a response stale on arrival, to be revalidated: its lifetime is then 0.)"""
    decision = decide([*resp, ("ETag", '"v1"')], status, pol)
    return decision.fresh_until - decision.stored_at if decision.storable else None


def imf(ts: float) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(ts))


# ---- HTTP-date ------------------------------------------------------------------------------

EPOCH_1994 = calendar.timegm((1994, 11, 6, 8, 49, 37, 0, 0, 0))
EPOCH_2050 = calendar.timegm((2050, 8, 18, 2, 1, 18, 0, 0, 0))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Sun, 06 Nov 1994 08:49:37 GMT", EPOCH_1994),  # IMF-fixdate
        ("Sunday, 06-Nov-94 08:49:37 GMT", EPOCH_1994),  # RFC 850
        ("Sun Nov  6 08:49:37 1994", EPOCH_1994),  # asctime
        ("Thursday, 18-Aug-50 02:01:18 GMT", EPOCH_2050),  # two digits, < 50 years ahead
        ("THU, 18 AUG 2050 02:01:18 gMT", EPOCH_2050),  # names in any case
        ("Tue, 19 Jan 2038 14:14:08 GMT", 2147523248),  # past 32 bits
        ("Thu, 18 Aug 2050 02:01:18 UTC", None),
        ("Thu, 18 Aug 2050 02:01:18 AEST", None),
        ("Thu, 18 Aug 50 02:01:18 GMT", None),  # two-digit year in IMF-fixdate
        ("Thu 18 Aug 2050 02:01:18 GMT", None),  # no comma
        ("Thu, 18  Aug  2050 02:01:18 GMT", None),  # double spaces
        ("Thu, 18-Aug-2050 02:01:18 GMT", None),  # dashes in IMF-fixdate
        ("Thu, 18 Aug 2050 02.01.18 GMT", None),  # periods
        ("Thu, 18 Aug 2050 2:01:18 GMT", None),  # one-digit hour
        ("Thu, 1 Jan 2026 00:00:00 GMT", None),  # one-digit day
        ("Thu, 18 Aug 2050 2:01:18 GMT, Thu, 18 Aug 2050 2:01:19 GMT", None),  # two lines
        ("Thu, 31 Feb 2050 02:01:18 GMT", None),  # no such day
        ("Thu, 18 Aug 2050 24:01:18 GMT", None),
        ("0", None),
        ("-1", None),
        ("", None),
        ("Thu, ١٨ Aug 2050 02:01:18 GMT", None),  # non-ASCII digits
    ],
)
def test_http_date_accepts_the_three_forms_only(value: str, expected: float | None) -> None:
    assert directives.http_date(value, NOW) == expected


def test_rfc850_year_more_than_50_years_ahead_is_in_the_past() -> None:
    # RFC 9110 §5.6.7: relative to now (2027), "94" is 1994 and "76" is 2076 (49 years on).
    assert directives.http_date("Sunday, 06-Nov-94 08:49:37 GMT", NOW) == EPOCH_1994
    in_2076 = directives.http_date("Friday, 06-Nov-76 08:49:37 GMT", NOW)
    assert in_2076 == calendar.timegm((2076, 11, 6, 8, 49, 37, 0, 0, 0))


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=253402300799))  # up to 9999-12-31
def test_every_imf_fixdate_and_asctime_round_trips(ts: int) -> None:
    parts = time.gmtime(ts)
    assert directives.http_date(imf(ts), NOW) == ts
    asctime = (
        time.strftime("%a %b ", parts)
        + f"{parts.tm_mday:2d}"
        + time.strftime(" %H:%M:%S %Y", parts)
    )
    assert directives.http_date(asctime, NOW) == ts


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
def test_an_expires_that_is_no_http_date_means_already_expired(value: str) -> None:
    """Whatever the text, an Expires that does not parse gives no freshness at all - never
    the default TTL (RFC 9111 §5.3) - and one that parses gives what it says."""
    given_lifetime = lifetime([("Expires", value), ("Date", imf(NOW))])
    parsed = directives.http_date(value, NOW)
    if parsed is None:
        assert given_lifetime in (None, 0.0)
    else:
        assert given_lifetime in (None, min(max(0.0, parsed - NOW), POLICY.max_ttl))


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=0, max_value=4102444800),
    st.integers(min_value=0, max_value=28),
    st.sampled_from(["", " ", "x", ",", "-", "1", ":"]),
)
def test_a_valid_date_with_one_character_changed_is_rejected_or_still_a_date(
    ts: int, position: int, replacement: str
) -> None:
    value = imf(ts)
    mutated = value[:position] + replacement + value[position + 1 :]
    parsed = directives.http_date(mutated, NOW)
    if mutated != value and parsed is not None:
        # Only a digit swapped for another digit can still be a date (a different one).
        assert replacement == "1" and value[position].isdigit()


# ---- delta-seconds and Age ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("0", 0.0),
        ("3600", 3600.0),
        ("003600", 3600.0),
        ("2147483648", 2147483648.0),
        ("99999999999", 2147483648.0),  # RFC 9111 §1.2.2: capped at 2^31
        ("-3600", directives.INVALID),
        ("'3600'", directives.INVALID),
        ("3600.0", directives.INVALID),
        ("a3600", directives.INVALID),
        ("3600a", directives.INVALID),
        ("", directives.INVALID),
        ("٣٦٠٠", directives.INVALID),  # non-ASCII digits
    ],
)
def test_delta_seconds(value: str | None, expected: float | None) -> None:
    assert directives.delta_seconds(value) == expected


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([], 0.0),
        (["7200"], 7200.0),
        (["abc"], 0.0),
        (["-7200"], 0.0),
        (["7200.0"], 0.0),
        (["7200, 0"], 7200.0),  # the first member of a list
        (["0, 7200"], 0.0),
        (["7200", "0"], 7200.0),  # the first line
        (["0", "7200"], 0.0),
        (["7200;foo=bar"], 7200.0),  # a parameter does not make it younger
        (["2147483649"], 2147483648.0),
    ],
)
def test_age_is_parsed_per_rfc9111_section_5_1(lines: list[str], expected: float) -> None:
    assert directives.age_seconds(lines) == expected


# ---- freshness lifetime from Cache-Control and Expires --------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([("Cache-Control", "max-age=3600")], 3600.0),
        ([("Cache-Control", 'max-age="3600"')], 3600.0),  # RFC 9111 §5.2: both forms accepted
        ([("Cache-Control", "max-age=-3600")], 0.0),  # invalid: stale, not the default TTL
        ([("Cache-Control", "max-age='3600'")], 0.0),
        ([("Cache-Control", "max-age=3600.5")], 0.0),
        ([("Cache-Control", "max-age=")], 0.0),
        ([("Cache-Control", "max-age")], 0.0),
        ([("Cache-Control", "s-maxage=-1, max-age=3600")], 0.0),  # s-maxage decides, invalid
        ([("Cache-Control", "s-maxage=10, max-age=3600")], 10.0),
        ([("Expires", imf(NOW + 100))], 100.0),
        ([("Expires", "Thu, 1 Jan 2026 00:00:00 GMT")], 0.0),  # one-digit day: expired
        ([("Expires", "0")], 0.0),
        ([("Cache-Control", "max-age=30"), ("Expires", "0")], 30.0),
        ([("Age", "10"), ("Cache-Control", "max-age=30")], 30.0),
        ([], 60.0),  # no freshness at all: the default TTL
    ],
)
def test_freshness_lifetime(headers: list[tuple[str, str]], expected: float) -> None:
    # With a validator a response stale on arrival is kept (to be revalidated), so the
    # lifetime it got can be read off the decision.
    pol = policy.CachePolicy(default_ttl=60, max_stale=3600)
    decision = decide([*headers, ("ETag", '"v1"')], pol=pol)
    assert decision.storable, decision
    assert decision.fresh_until - decision.stored_at == expected


def test_age_header_ages_the_stored_response() -> None:
    decision = decide([("Cache-Control", "max-age=3600"), ("Age", "7200, 0")])
    assert decision.fresh_until < NOW  # stored, but already stale


# ---- what is storable -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "status", [200, 203, 204, 299, 301, 400, 403, 404, 410, 499, 500, 502, 503, 504, 599]
)
@pytest.mark.parametrize(
    "headers",
    [
        [("Cache-Control", "max-age=3600")],
        [("Cache-Control", "s-maxage=3600")],
        [("Expires", imf(NOW + 3600))],
        [("Cache-Control", "public")],
    ],
    ids=["max-age", "s-maxage", "expires", "public"],
)
def test_any_final_status_with_explicit_freshness_is_stored(
    status: int, headers: list[tuple[str, str]]
) -> None:
    decision = decide(headers, status)
    assert decision.storable, decision
    assert decision.fresh_until > NOW


@pytest.mark.parametrize(
    ("status", "stored"),
    [
        (200, True),
        (203, True),
        (204, True),
        (300, True),
        (301, True),
        (308, True),
        (404, True),
        (405, True),
        (410, True),
        (414, True),
        (501, True),
        (201, False),
        (202, False),
        (302, False),
        (403, False),
        (500, False),
        (502, False),
        (503, False),
        (504, False),
        (599, False),
    ],
)
def test_heuristic_freshness_only_for_heuristically_cacheable_statuses(
    status: int, stored: bool
) -> None:
    decision = decide([("Last-Modified", imf(NOW - 86400))], status)
    assert decision.storable is stored, decision
    if not stored:
        assert decision.reason == "no-freshness"


@pytest.mark.parametrize("status", [100, 103, 199, 206, 304, 600])
def test_interim_partial_and_not_modified_responses_are_never_stored(status: int) -> None:
    decision = decide([("Cache-Control", "max-age=3600, public")], status)
    assert (decision.storable, decision.reason) == (False, "status")


@pytest.mark.parametrize(
    ("status", "cache_control", "stored", "reason"),
    [
        (200, "max-age=3600, no-store, must-understand", True, ""),
        (404, "max-age=3600, no-store, must-understand", True, ""),
        (599, "max-age=3600, no-store, must-understand", False, "must-understand"),
        (500, "max-age=3600, must-understand", False, "must-understand"),
        (299, "max-age=3600, must-understand", False, "must-understand"),
        (200, "max-age=3600, no-store", False, "no-store"),
        (599, "max-age=3600, no-store", False, "no-store"),
    ],
)
def test_must_understand(status: int, cache_control: str, stored: bool, reason: str) -> None:
    decision = decide([("Cache-Control", cache_control)], status)
    assert (decision.storable, decision.reason) == (stored, reason)


@pytest.mark.parametrize(
    ("cache_control", "stored", "strip", "fresh"),
    [
        ('max-age=60, private="X-User"', True, {"x-user"}, True),
        ('max-age=60, private="X-User, X-Other"', True, {"x-user", "x-other"}, True),
        ('max-age=60, no-cache="X-User"', True, {"x-user"}, True),
        ('max-age=60, no-cache="x-a", private="x-b"', True, {"x-a", "x-b"}, True),
        ("max-age=60, private", False, set(), False),
        ("max-age=60, no-cache", True, set(), False),  # unqualified: revalidate every time
    ],
)
def test_qualified_no_cache_and_private_strip_the_named_fields(
    cache_control: str, stored: bool, strip: set[str], fresh: bool
) -> None:
    response = [
        ("Cache-Control", cache_control),
        ("X-User", "alice"),
        ("X-Other", "1"),
        ("ETag", '"v1"'),
    ]
    decision = decide(response, pol=policy.CachePolicy(default_ttl=60, max_stale=3600))
    assert decision.storable is stored, decision
    if stored:
        assert decision.strip == strip
        assert (decision.fresh_until > NOW) is fresh
        kept = {name.lower() for name, _ in policy.storable_headers(h(*response), decision.strip)}
        assert not kept & strip
        assert "cache-control" in kept


def test_hop_by_hop_transfer_encoding_and_content_length_are_never_stored() -> None:
    response = h(
        ("Cache-Control", "max-age=60"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Length", "10"),
        ("Connection", "close, X-Hop"),
        ("X-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Upgrade", "h2c"),
        ("Trailer", "X-T"),
        ("X-Kept", "yes"),
    )
    kept = [name.lower() for name, _ in policy.storable_headers(response)]
    assert kept == ["cache-control", "x-kept"]


def test_a_304_that_adds_a_qualified_no_cache_strips_the_field_from_the_freshened_copy() -> None:
    from tierproxy.entry import Entry

    entry = Entry(
        key="/a",
        status=200,
        headers=(("Cache-Control", "max-age=60"), ("X-User", "alice")),
        body=b"x",
        stored_at=NOW - 100,
        fresh_until=NOW - 40,
        stale_until=NOW + 3000,
        swr_until=NOW - 40,
        expires_at=NOW + 3000,
        etag='"v1"',
    )
    refreshed = policy.freshen(
        entry, h(("Cache-Control", 'max-age=60, no-cache="X-User"')), h(), NOW, NOW, POLICY
    )
    assert refreshed is not None
    assert "X-User" not in CIMultiDict(refreshed.headers)
    assert refreshed.fresh_until == NOW + 60


# ---- targeted cache control (RFC 9213) ------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # The targeted field wins over Cache-Control, both ways.
        ([("CDN-Cache-Control", "max-age=3600"), ("Cache-Control", "max-age=1")], 3600.0),
        ([("CDN-Cache-Control", "max-age=1"), ("Cache-Control", "max-age=3600")], 1.0),
        ([("CDN-Cache-Control", "max-age=10000"), ("Cache-Control", "no-store")], 10000.0),
        ([("CDN-Cache-Control", "no-store"), ("Cache-Control", "max-age=10000")], None),
        ([("CDN-Cache-Control", "private"), ("Cache-Control", "max-age=10000")], None),
        ([("CDN-Cache-Control", "no-cache"), ("Cache-Control", "max-age=10000")], 0.0),
        # ... and replaces Expires.
        ([("CDN-Cache-Control", "max-age=3600"), ("Expires", "0")], 3600.0),
        ([("CDN-Cache-Control", "max-age=0"), ("Expires", imf(NOW + 10000))], 0.0),
        ([("CDN-Cache-Control", "foobar, max-age=3600")], 3600.0),
        ([("CDN-Cache-Control", "max-age=99999999999")], POLICY.max_ttl),
        # A targeted field without freshness: the heuristic, not Cache-Control's.
        ([("CDN-Cache-Control", "none"), ("Cache-Control", "max-age=5")], 60.0),
        # Invalid as a Structured Field, or a known directive of the wrong type: ignored.
        ([("CDN-Cache-Control", "max-age=10000, &&&&&"), ("Cache-Control", "no-store")], None),
        ([("CDN-Cache-Control", 'max-age="10000"'), ("Cache-Control", "max-age=5")], 5.0),
        ([("CDN-Cache-Control", "max-age=-1"), ("Cache-Control", "max-age=5")], 5.0),
        ([("CDN-Cache-Control", "max-age=1.5"), ("Cache-Control", "max-age=5")], 5.0),
        ([("CDN-Cache-Control", "max-age =100"), ("Cache-Control", "max-age=5")], 5.0),
        ([("CDN-Cache-Control", "MaX-aGe=100"), ("Cache-Control", "max-age=5")], 5.0),
        ([("CDN-Cache-Control", ""), ("Cache-Control", "max-age=5")], 5.0),  # empty: ignored
        ([("CDN-Cache-Control", "private=1"), ("Cache-Control", "max-age=5")], 5.0),
        # Parameters on members are ignored; ?0 switches a directive off.
        ([("CDN-Cache-Control", "max-age=30;x=1")], 30.0),
        ([("CDN-Cache-Control", "max-age=30, no-store=?0")], 30.0),
        # Field lines are combined before parsing.
        ([("CDN-Cache-Control", "max-age=30"), ("CDN-Cache-Control", "s-maxage=7")], 7.0),
        # Qualified private as a String or an Inner List: those fields stripped.
        ([("CDN-Cache-Control", 'max-age=30, private="x-user"')], 30.0),
        ([("CDN-Cache-Control", "max-age=30, private=(x-user x-other)")], 30.0),
        # The tierproxy-targeted field comes first in the default list.
        (
            [("Tierproxy-Cache-Control", "max-age=40"), ("CDN-Cache-Control", "max-age=30")],
            40.0,
        ),
        (
            [("Tierproxy-Cache-Control", "max-age=oops"), ("CDN-Cache-Control", "max-age=30")],
            30.0,
        ),
    ],
)
def test_targeted_fields_take_precedence(
    headers: list[tuple[str, str]], expected: float | None
) -> None:
    assert lifetime(headers) == expected


def test_targeted_private_field_names_are_stripped() -> None:
    for value in ('max-age=30, private="x-user"', "max-age=30, private=(x-user x-other)"):
        decision = decide([("CDN-Cache-Control", value), ("X-User", "a")])
        assert decision.storable and "x-user" in decision.strip, (value, decision)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ((), 1.0),  # off: Cache-Control only
        (("cdn-cache-control",), 3600.0),
        (("tierproxy-cache-control",), 40.0),
        (("x-mine",), 1.0),
    ],
)
def test_the_target_list_is_the_operators(fields: tuple[str, ...], expected: float) -> None:
    pol = policy.CachePolicy(default_ttl=60, max_stale=3600, targeted_fields=fields)
    headers = [
        ("Cache-Control", "max-age=1"),
        ("CDN-Cache-Control", "max-age=3600"),
        ("Tierproxy-Cache-Control", "max-age=40"),
    ]
    assert lifetime(headers, pol=pol) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30))
def test_a_targeted_field_never_breaks_the_decision(value: str) -> None:
    """Any printable value: either a valid field that replaces Cache-Control, or one that is
    ignored - in which case the decision is exactly Cache-Control's."""
    with_field = decide([("CDN-Cache-Control", value), ("Cache-Control", "max-age=5")])
    parsed = directives.targeted_directives(["cdn-cache-control"], [("cdn-cache-control", [value])])
    if parsed is None:
        assert with_field == decide([("Cache-Control", "max-age=5")])
    else:  # it decides alone: Cache-Control's max-age=5 is not what made it fresh
        assert with_field.reason in ("", "no-store", "private", "expired"), (parsed, with_field)
        if with_field.storable and "max-age" not in parsed and "s-maxage" not in parsed:
            assert with_field.fresh_until - with_field.stored_at in (0.0, POLICY.default_ttl)


# ---- TIERPROXY_TARGETED_FIELDS --------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, ("tierproxy-cache-control", "cdn-cache-control")),
        ("", ()),
        ("  ", ()),
        ("CDN-Cache-Control", ("cdn-cache-control",)),
        ("x-a, cdn-cache-control, X-A", ("x-a", "cdn-cache-control")),
    ],
)
def test_targeted_fields_setting(raw: str | None, expected: tuple[str, ...]) -> None:
    env = {"TIERPROXY_ORIGIN": "http://127.0.0.1:9"}
    if raw is not None:
        env["TIERPROXY_TARGETED_FIELDS"] = raw
    assert load_settings(env).targeted_fields == expected


@pytest.mark.parametrize("raw", ["bad name", "cache-control", ",x", "x,,y", "x;y", "é"])
def test_a_bad_targeted_fields_setting_is_refused(raw: str) -> None:
    env = {"TIERPROXY_ORIGIN": "http://127.0.0.1:9", "TIERPROXY_TARGETED_FIELDS": raw}
    with pytest.raises(ConfigError, match="TIERPROXY_TARGETED_FIELDS=") as caught:
        load_settings(env)
    assert "\n" not in str(caught.value)


def test_only_the_request_that_fetched_gets_the_fields_left_out_of_the_stored_copy() -> None:
    from tierproxy.entry import Entry
    from tierproxy.states import Fetched, Stored, after_fetch

    stored = Entry(
        key="/a",
        status=200,
        headers=(("Cache-Control", 'max-age=60, private="X-User"'),),
        body=b"x",
        stored_at=NOW,
        fresh_until=NOW + 60,
        stale_until=NOW + 60,
        swr_until=NOW + 60,
        expires_at=NOW + 60,
    )
    own = (*stored.headers, ("X-User", "alice"))
    outcome = Stored(stored, revalidated=False, own_headers=own)

    leader = after_fetch(outcome, None, NOW, collapsed=False)
    waiter = after_fetch(outcome, None, NOW, collapsed=True)

    assert isinstance(leader, Fetched) and isinstance(waiter, Fetched)
    assert leader.entry.headers == own
    assert waiter.entry.headers == stored.headers


@pytest.mark.parametrize("digits", [11, 4300, 5000, 100_000])
def test_a_delta_seconds_of_any_length_is_capped_never_an_error(digits: int) -> None:
    """RFC 9111 §1.2.2: a delta-seconds too large to hold is 2^31 - also past the longest
    integer str() converts (4300 digits): an origin's max-age or Age of 5000 nines is no 500."""
    nines = "9" * digits
    assert directives.delta_seconds(nines) == directives.DELTA_SECONDS_CAP
    assert directives.age_seconds([nines]) == directives.DELTA_SECONDS_CAP
    assert directives.delta_seconds("0" * digits + "7") == 7.0
