"""Client conditionals on a stored response (RFC 9110 §13.1.2-13.1.3, RFC 9111 §4.3.2)."""

from __future__ import annotations

from typing import Any

import pytest
from multidict import CIMultiDict

from tierproxy.conditionals import client_not_modified, etag_list_matches_weakly
from tierproxy.entry import Entry

NOW = 1_800_000_000.0
LM = "Fri, 15 Jan 2027 08:00:00 GMT"
DATE = "Fri, 15 Jan 2027 09:00:00 GMT"


def _entry(**kw: Any) -> Entry:
    base: dict[str, Any] = {
        "key": "/x",
        "status": 200,
        "headers": (("ETag", '"v1"'), ("Date", DATE)),
        "body": b"x",
        "stored_at": NOW,
        "fresh_until": NOW + 10,
        "stale_until": NOW + 20,
        "swr_until": NOW + 10,
        "expires_at": NOW + 20,
        "etag": '"v1"',
        "last_modified": LM,
    }
    base.update(kw)
    return Entry(**base)


def h(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


@pytest.mark.parametrize(
    ("request_headers", "expected"),
    [
        ([("If-None-Match", '"v1"')], True),
        ([("If-None-Match", 'W/"v1"')], True),  # weak comparison (RFC 9110 §13.1.2)
        ([("If-None-Match", '"a", "v1"')], True),
        ([("If-None-Match", '"a",W/"v1"  ')], True),
        ([("If-None-Match", "*")], True),
        ([("If-None-Match", '"v2"')], False),
        ([("If-Modified-Since", LM)], True),
        ([("If-Modified-Since", "Fri, 15 Jan 2027 08:00:01 GMT")], True),
        ([("If-Modified-Since", "Fri, 15 Jan 2027 07:59:59 GMT")], False),
        ([("If-Modified-Since", "Friday, 15-Jan-27 08:00:00 GMT")], True),  # RFC 850 form
        ([("If-Modified-Since", "yesterday")], False),  # not a date: ignored (§13.1.3)
        # If-None-Match decides alone when present (§13.1.3): a later IMS changes nothing.
        ([("If-None-Match", '"v2"'), ("If-Modified-Since", DATE)], False),
        ([("If-None-Match", '"v1"'), ("If-Modified-Since", "Thu, 01 Jan 1970 00:00:00 GMT")], True),
        ([], False),
    ],
)
def test_client_not_modified(request_headers: list[tuple[str, str]], expected: bool) -> None:
    assert client_not_modified(h(*request_headers), _entry()) is expected


@pytest.mark.parametrize(
    ("ims", "headers", "expected"),
    [
        (DATE, (("Date", DATE),), True),  # no Last-Modified: the stored Date (RFC 9111 §4.3.2)
        ("Fri, 15 Jan 2027 10:00:00 GMT", (("Date", DATE),), True),
        ("Fri, 15 Jan 2027 08:59:59 GMT", (("Date", DATE),), False),  # Date is after it
        # Neither Last-Modified nor Date: when it was generated (stored_at).
        ("Fri, 15 Jan 2027 08:59:59 GMT", (), True),
        ("Thu, 01 Jan 1970 00:00:01 GMT", (), False),
    ],
)
def test_if_modified_since_without_last_modified(
    ims: str, headers: tuple[tuple[str, str], ...], expected: bool
) -> None:
    # stored_at = NOW is Fri, 15 Jan 2027 08:00:00 GMT.
    entry = _entry(headers=headers, etag=None, last_modified=None, stored_at=NOW)
    assert client_not_modified(h(("If-Modified-Since", ims)), entry) is expected


@pytest.mark.parametrize("status", [203, 204])
def test_other_2xx_answer_conditionals(status: int) -> None:
    assert client_not_modified(h(("If-None-Match", '"v1"')), _entry(status=status))


@pytest.mark.parametrize("status", [206, 301, 404, 410])
def test_non_2xx_and_partial_entries_never_304(status: int) -> None:
    # RFC 9110 §13.2.1: conditions are ignored when the answer without them is not 2xx.
    assert not client_not_modified(h(("If-None-Match", '"v1"')), _entry(status=status))
    assert not client_not_modified(h(("If-Modified-Since", DATE)), _entry(status=status))


def test_no_stored_etag_never_matches_if_none_match() -> None:
    assert not client_not_modified(h(("If-None-Match", '"v1"')), _entry(etag=None))
    assert etag_list_matches_weakly("*", '"anything"')
    assert not etag_list_matches_weakly('"v1"', '"v10"')
