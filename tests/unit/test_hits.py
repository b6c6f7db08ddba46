"""The hit path's header block (``Entry.wire_head``): stored headers as aiohttp writes them,
never a split line."""

from __future__ import annotations

import dataclasses
import math

import pytest
from aiohttp.helpers import rfc822_formatted_time
from hypothesis import given
from hypothesis import strategies as st
from support.storage import parse_cache_status

from tierproxy.entry import Entry


def entry(status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Entry:
    return Entry(
        key="/a",
        status=status,
        headers=headers,
        body=b"x",
        stored_at=0.0,
        fresh_until=1.0,
        stale_until=1.0,
        swr_until=1.0,
        expires_at=1.0,
    )


def test_head_is_the_status_line_and_stored_lines_in_order() -> None:
    head = entry(
        200,
        (
            ("Content-Type", "text/plain"),
            ("Link", "</a>"),
            ("Link", "</b>"),
            ("X-Title", "caf\u00e9"),
        ),
    ).wire_head
    assert head == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nLink: </a>\r\n"
        b"Link: </b>\r\nX-Title: caf\xc3\xa9\r\n"
    )


def test_obs_text_bytes_are_written_as_received() -> None:
    # aiohttp decodes header bytes as UTF-8 with surrogateescape: latin-1 "caf\xe9" arrives as
    # "caf\udce9" and must leave as the same four bytes.
    head = entry(200, (("X-Name", b"caf\xe9".decode("utf-8", "surrogateescape")),)).wire_head
    assert head == b"HTTP/1.1 200 OK\r\nX-Name: caf\xe9\r\n"


def test_tierproxys_own_fields_are_not_among_the_stored_lines() -> None:
    stored = entry(
        200,
        (("X-Cache", "HIT"), ("Cache-Status", "cdn; hit"), ("X-Request-ID", "o"), ("X-Kept", "1")),
    )
    assert stored.wire_head == b"HTTP/1.1 200 OK\r\nX-Kept: 1\r\n"
    assert stored.upstream_cache_status == b"cdn; hit, "


def test_unknown_status_has_an_empty_reason_as_in_aiohttp() -> None:
    assert entry(299).wire_head == b"HTTP/1.1 299 \r\n"


@pytest.mark.parametrize(
    "name, value",
    [
        ("X-Evil", "a\r\nSet-Cookie: s=1"),  # a tampered shared-tier entry: response splitting
        ("X-Evil", "a\nb"),
        ("X-Evil\r\nSet-Cookie", "s=1"),
        ("X-Bad", "\ud800"),  # a surrogate no byte decodes to: not encodable
        ("X-Nul", "a\x00b"),  # a control character aiohttp refuses too
    ],
)
def test_unsafe_header_lines_are_left_to_the_full_path(name: str, value: str) -> None:
    assert entry(200, ((name, value),)).wire_head is None


def _labelled_lines(head: bytes) -> dict[bytes, bytes]:
    lines = head.split(b"\r\n")
    return dict(line.split(b": ", 1) for line in lines[1:] if b": " in line)


@pytest.mark.parametrize("tier", ["l1", "l2", "l3"])
@pytest.mark.parametrize("left", [0.2, 1.0, 59.9, 3600.0])
@pytest.mark.parametrize("traced", [False, True])
def test_the_hit_head_carries_the_labels_of_its_final_state(
    tier: str, left: float, traced: bool
) -> None:
    from tierproxy.response import fresh_hit_head
    from tierproxy.states import FreshHit, Trace, labels

    # With the lookup's trace (the hit path's L2/L3 hits: the tiers before missed), or without
    # (an L1 hit, or a tier asked alone): remembered apart.
    names = ["l1", "l2", "l3"]
    trace: Trace = ()
    if traced:
        trace = (*((name, "uri-miss") for name in names[: names.index(tier)]), (tier, "hit"))

    now = 1_000_000.0
    stored = Entry(
        key="/a",
        status=200,
        headers=(("Cache-Status", "cdn; hit"),),
        body=b"xy",
        stored_at=now - 7.5,
        fresh_until=now + left,
        stale_until=now + left,
        swr_until=now + left,
        expires_at=now + left,
    )
    for _ in range(2):  # built once, then remembered: the same either way
        labelled = fresh_hit_head(tier, stored, now, "rid-1", trace)
        assert labelled is not None
        head, x_cache = labelled
        expected_x_cache, member = labels(FreshHit(tier, stored, trace), now)
        lines = _labelled_lines(head)
        assert x_cache == expected_x_cache
        assert lines[b"X-Cache"] == expected_x_cache.encode()
        # RFC 9211 §2: the upstream cache's member first, tierproxy's last.
        assert lines[b"Cache-Status"] == b"cdn; hit, " + member.encode()
        upstream, *ours = parse_cache_status(lines[b"Cache-Status"].decode())
        assert upstream.cache == "cdn" and upstream.hit
        expected = [name for name, _ in reversed(trace)] if trace else [tier]
        assert [m.cache for m in ours] == [f"tierproxy-{name}" for name in expected]
        assert ours[0].hit and ours[0].ttl == max(0, math.floor(left))
        assert all(m.fwd == "uri-miss" and m.stored for m in ours[1:])
        assert lines[b"Age"] == b"7"
        assert lines[b"X-Request-ID"] == b"rid-1"
        assert lines[b"Content-Length"] == b"2"


def _fresh_copy(stored: Entry) -> Entry:
    """The same entry built anew: no head remembered from an earlier hit."""
    copy = dataclasses.replace(stored)
    assert copy.hit_memo is None
    return copy


_TRACES = [(), (("l1", "uri-miss"), ("l2", "hit")), (("l1", "uri-miss"), ("l3", "hit"))]


@given(
    hits=st.lists(
        st.tuples(
            # Quarter seconds land on either side of each boundary: Age turns at x.5, the
            # ttl at x.75 (stored_at and fresh_until below); any float in between too.
            st.one_of(
                st.integers(min_value=-12, max_value=280).map(lambda quarters: quarters / 4),
                st.floats(min_value=-3.0, max_value=70.0, allow_nan=False),
            ),
            st.sampled_from(["l1", "l2", "l3"]),
            st.sampled_from(range(len(_TRACES))),
            st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True),
        ),
        min_size=1,
        max_size=12,
    ),
    dated=st.booleans(),
)
def test_a_remembered_hit_head_is_the_head_built_anew(
    hits: list[tuple[float, str, int, str]], dated: bool
) -> None:
    """Entry.hit_memo: whatever the order of hits (the clock may even step back), each head
    is byte for byte the one an entry with nothing remembered gives - Age, ttl, trace and the
    request id of that very hit included."""
    from tierproxy.response import fresh_hit_head

    now = 1_000_000.0
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "text/plain"),)
    if dated:
        headers += (("Date", "Fri, 04 Dec 2026 09:00:00 GMT"),)
    stored = Entry(
        key="/a",
        status=200,
        headers=headers,
        body=b"xy",
        stored_at=now - 0.5,
        fresh_until=now + 60.75,
        stale_until=now + 120,
        swr_until=now + 120,
        expires_at=now + 120,
    )
    for offset, tier, trace_at, rid in hits:
        at = now + offset
        trace = _TRACES[trace_at]
        for _ in range(3):  # (without a stored Date, aiohttp's Date line may turn a second)
            date_before = rfc822_formatted_time()
            got = fresh_hit_head(tier, stored, at, rid, trace)
            expected = fresh_hit_head(tier, _fresh_copy(stored), at, rid, trace)
            if dated or rfc822_formatted_time() == date_before:
                break
        assert got == expected
        assert got is not None
        lines = _labelled_lines(got[0])
        assert lines[b"Age"] == b"%d" % max(0, int(at - stored.stored_at))
        assert lines[b"X-Request-ID"] == rid.encode()


def test_a_remembered_hit_head_takes_the_date_of_its_second() -> None:
    """An entry stored without a Date gets aiohttp's (RFC 9110 §6.6.1), which turns every
    second of real time: a head remembered in one second is not written in the next."""
    import time

    from tierproxy.response import fresh_hit_head

    now = 1_000_000.0
    stored = entry(200, (("Content-Type", "text/plain"),))
    stored = dataclasses.replace(stored, fresh_until=now + 10, expires_at=now + 10)
    first = fresh_hit_head("l1", stored, now, "rid-1")
    assert first is not None and stored.hit_memo is not None
    time.sleep(1.0 - time.time() % 1.0 + 0.01)  # into the next second of real time
    date = rfc822_formatted_time()
    second = fresh_hit_head("l1", stored, now, "rid-1")
    assert second is not None
    assert _labelled_lines(second[0])[b"Date"] == date.encode()
    assert _labelled_lines(first[0])[b"Date"] != date.encode()
