"""The hit path's header block (``Entry.wire_head``): stored headers as aiohttp writes them,
never a split line."""

from __future__ import annotations

import math

import pytest
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
