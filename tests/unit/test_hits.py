"""The hit path's header encoding: stored headers as aiohttp writes them, never a split line."""

from __future__ import annotations

import pytest

from tierproxy.entry import Entry
from tierproxy.hits import encode_head


def entry(status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Entry:
    return Entry(key="/a", status=status, headers=headers, body=b"x", stored_at=0.0,
                 fresh_until=1.0, stale_until=1.0, swr_until=1.0, expires_at=1.0)


def test_head_is_the_status_line_and_stored_lines_in_order():
    head = encode_head(entry(200, (("Content-Type", "text/plain"), ("Link", "</a>"),
                                   ("Link", "</b>"), ("X-Title", "caf\u00e9"))))
    assert head == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nLink: </a>\r\n"
                    b"Link: </b>\r\nX-Title: caf\xc3\xa9\r\n")


def test_unknown_status_has_an_empty_reason_as_in_aiohttp():
    assert encode_head(entry(299)) == b"HTTP/1.1 299 \r\n"


@pytest.mark.parametrize("name, value", [
    ("X-Evil", "a\r\nSet-Cookie: s=1"),  # a tampered shared-tier entry: response splitting
    ("X-Evil", "a\nb"),
    ("X-Evil\r\nSet-Cookie", "s=1"),
    ("X-Bad", "\udce9"),  # not encodable
])
def test_unsafe_header_lines_are_left_to_the_full_path(name, value):
    assert encode_head(entry(200, ((name, value),))) is None
