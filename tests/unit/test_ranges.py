"""Byte ranges from a stored response (RFC 9110 §14): parsing, decisions, If-Range, multipart."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierproxy import ranges
from tierproxy.ranges import Full, Partial, Unsatisfiable, decide

DATE = "Fri, 15 Jan 2027 08:00:00 GMT"
NOW = 1_800_000_000.0  # wall clock for RFC 850 two-digit years (2027)
EARLIER = "Fri, 15 Jan 2027 07:00:00 GMT"
SAME_SECOND = "Fri, 15 Jan 2027 08:00:00 GMT"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes=0-1", [(0, 1)]),
        ("bytes=5-", [(5, None)]),
        ("bytes=-5", [(None, 5)]),
        ("BYTES=0-0", [(0, 0)]),  # range units are case-insensitive (§14.1)
        ("bytes=0-1, 3-4,  -2", [(0, 1), (3, 4), (None, 2)]),
        ("bytes=0-1,,3-4", [(0, 1), (3, 4)]),  # empty list elements are allowed (§5.6.1)
        ("bytes=-0", [(None, 0)]),  # valid, but never satisfiable
        ("bytes=99999999999999999999999-", [(10**18, None)]),  # past any body
        ("bytes=3-2", None),  # last-pos below first-pos: invalid
        ("bytes=a-b", None),
        ("bytes=1", None),
        ("bytes=-", None),
        ("bytes=", None),
        ("bytes", None),
        ("items=0-1", None),  # another unit: ignored
        ("bytes=0-1;x", None),
        ("bytes=+1-2", None),
        ("bytes=0x1-2", None),
        ("bytes=\u0661-2", None),  # a non-ASCII digit is no digit here
        ("bytes=" + ",".join(f"{i}-{i}" for i in range(ranges.MAX_RANGES)), "ok"),
        ("bytes=" + ",".join(f"{i}-{i}" for i in range(ranges.MAX_RANGES + 1)), None),
    ],
)
def test_parse_range(value: str, expected: list[ranges.RangeSpec] | str | None) -> None:
    parsed = ranges.parse_range(value)
    if expected == "ok":
        assert parsed is not None and len(parsed) == ranges.MAX_RANGES
    else:
        assert parsed == expected


@pytest.mark.parametrize(
    ("specs", "length", "expected"),
    [
        ([(0, 1)], 10, [(0, 1)]),
        ([(5, None)], 10, [(5, 9)]),
        ([(5, 100)], 10, [(5, 9)]),  # a last-pos past the end is the end (§14.1.2)
        ([(None, 3)], 10, [(7, 9)]),
        ([(None, 30)], 10, [(0, 9)]),  # a suffix longer than the body: the whole body
        ([(None, 0)], 10, []),
        ([(10, None)], 10, []),  # first-pos at the length: unsatisfiable
        ([(10, None), (2, 3)], 10, [(2, 3)]),  # the unsatisfiable one is left out
        ([(0, 0)], 0, []),
        ([(None, 5)], 0, []),
    ],
)
def test_resolve(
    specs: list[ranges.RangeSpec], length: int, expected: list[tuple[int, int]]
) -> None:
    assert ranges.resolve(specs, length) == expected


@pytest.mark.parametrize(
    ("range_value", "length", "expected"),
    [
        (None, 10, Full("no-range")),
        ("bytes=0-1", 10, Partial(((0, 1),))),
        ("bytes=1-", 10, Partial(((1, 9),))),
        ("bytes=-1", 10, Partial(((9, 9),))),
        ("bytes=0-", 10, Partial(((0, 9),))),  # the whole body, still as a 206
        ("bytes=10-", 10, Unsatisfiable()),
        ("bytes=-0", 10, Unsatisfiable()),
        ("bytes=0-0", 0, Unsatisfiable()),
        ("bytes=-5", 0, Full("empty")),  # satisfiable but holds no byte
        ("bytes=5-3", 10, Full("ignored")),
        ("pages=1-2", 10, Full("ignored")),
        ("bytes=0-9,20-29", 1000, Partial(((0, 9), (20, 29)))),
        ("bytes=0-9,5-29", 1000, Full("overlapping")),  # §14.2: refused
        ("bytes=0-9,9-29", 1000, Full("overlapping")),
        ("bytes=-500,0-600", 1000, Full("overlapping")),
        ("bytes=20-29,0-9", 1000, Partial(((20, 29), (0, 9)))),  # two out of order: fine
        ("bytes=40-49,20-29,0-9", 1000, Full("out-of-order")),
        ("bytes=0-0,2-2", 20, Full("smaller-whole")),  # multipart would be larger
        ("bytes=0-0,1000-2000", 1000, Partial(((0, 0),))),  # one satisfiable: single part
    ],
)
def test_decide(range_value: str | None, length: int, expected: ranges.Decision) -> None:
    assert decide(range_value, None, length, part_overhead=60, now=NOW) == expected


@pytest.mark.parametrize(
    ("if_range", "etag", "last_modified", "date", "expected"),
    [
        ('"v1"', '"v1"', None, None, True),
        ('"v2"', '"v1"', None, None, False),
        ('"v1"', 'W/"v1"', None, None, False),  # a weak stored tag never matches
        ('W/"v1"', 'W/"v1"', None, None, False),  # nor a weak requested one
        ('"v1"', None, None, None, False),
        (EARLIER, None, EARLIER, DATE, True),  # Last-Modified before Date: strong
        (EARLIER, '"v1"', EARLIER, DATE, True),
        (DATE, None, DATE, DATE, False),  # same second as Date: implicitly weak (§8.8.2.2)
        (EARLIER, None, EARLIER, None, False),  # no Date: cannot tell, weak
        (DATE, None, EARLIER, DATE, False),  # not the stored Last-Modified
        ("Friday, 15-Jan-27 07:00:00 GMT", None, EARLIER, DATE, True),  # RFC 850 form
        ("not a date", None, EARLIER, DATE, False),
    ],
)
def test_if_range_matches(
    if_range: str, etag: str | None, last_modified: str | None, date: str | None, expected: bool
) -> None:
    assert ranges.if_range_matches(if_range, etag, last_modified, date, NOW) is expected


def test_if_range_decides_between_partial_and_full() -> None:
    assert decide("bytes=0-1", '"v1"', 10, etag='"v1"', now=NOW) == Partial(((0, 1),))
    assert decide("bytes=0-1", '"v2"', 10, etag='"v1"', now=NOW) == Full("if-range")
    # If-Range without a valid Range changes nothing: the Range is ignored anyway.
    assert decide("bytes=x", '"v1"', 10, etag='"v1"', now=NOW) == Full("ignored")
    # An If-Range that does not match wins over an unsatisfiable range: the whole 200.
    assert decide("bytes=50-", '"v2"', 10, etag='"v1"', now=NOW) == Full("if-range")


def test_multipart_body_is_rfc9110_multipart_byteranges() -> None:
    body = b"0123456789abcdefghij"
    boundary = "b0und"
    built = ranges.multipart(body, ((0, 1), (10, 12)), "text/plain", boundary)
    assert built == (
        b"--b0und\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-1/20\r\n\r\n01"
        b"\r\n--b0und\r\nContent-Type: text/plain\r\nContent-Range: bytes 10-12/20\r\n\r\nabc"
        b"\r\n--b0und--\r\n"
    )
    without_type = ranges.multipart(body, ((0, 0), (5, 5)), None, boundary)
    assert b"Content-Type" not in without_type


def test_part_overhead_never_underestimates_a_multipart_body() -> None:
    body = bytes(range(200)) * 10
    boundary = "0123456789abcdef01234567"
    chosen = ((0, 9), (100, 109), (1000, 1009))
    overhead = ranges.part_overhead(boundary, "application/octet-stream")
    estimate = sum(
        last - first + 1 + overhead + len(ranges.content_range(first, last, len(body)))
        for first, last in chosen
    )
    assert estimate >= len(ranges.multipart(body, chosen, "application/octet-stream", boundary))


# ---- properties ----------------------------------------------------------------------------

_RANGE_LIKE = st.one_of(
    st.text(max_size=60),
    st.from_regex(re.compile(r"[bByYtTeEsS]{0,6}=[0-9 ,\-]{0,40}"), fullmatch=True),
    st.lists(
        st.tuples(
            st.one_of(st.none(), st.integers(0, 10**25)),
            st.one_of(st.none(), st.integers(0, 10**25)),
        ),
        max_size=20,
    ).map(
        lambda specs: (
            "bytes="
            + ",".join(f"{'' if a is None else a}-{'' if b is None else b}" for a, b in specs)
        )
    ),
)


@given(
    value=_RANGE_LIKE,
    if_range=st.one_of(st.none(), st.text(max_size=40)),
    length=st.integers(0, 10**6),
)
def test_any_range_header_never_raises(value: str, if_range: str | None, length: int) -> None:
    decision = decide(value, if_range, length, etag='"v1"', last_modified=DATE, date=DATE, now=NOW)
    match decision:
        case Partial(chosen):
            assert chosen
            for first, last in chosen:
                assert 0 <= first <= last < length
        case Full() | Unsatisfiable():
            pass


@given(body=st.binary(min_size=1, max_size=300), data=st.data())
def test_any_satisfiable_single_range_returns_exactly_those_bytes(
    body: bytes, data: st.DataObject
) -> None:
    length = len(body)
    first = data.draw(st.integers(0, length - 1))
    last = data.draw(st.integers(first, length + 50))
    form = data.draw(st.sampled_from(["a-b", "a-", "-n"]))
    if form == "a-b":
        value, expected = f"bytes={first}-{last}", body[first : last + 1]
    elif form == "a-":
        value, expected = f"bytes={first}-", body[first:]
    else:
        suffix = data.draw(st.integers(1, length + 50))
        value, expected = f"bytes=-{suffix}", body[-suffix:]
    decision = decide(value, None, length, now=NOW)
    assert isinstance(decision, Partial)
    ((start, end),) = decision.ranges
    assert body[start : end + 1] == expected
    assert ranges.content_range(start, end, length) == f"bytes {start}-{end}/{length}"
