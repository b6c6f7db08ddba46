"""Client conditionals answered from a stored response (RFC 9110 §13.1.2-13.1.3, §13.2.2;
RFC 9111 §4.3.2): may this GET/HEAD get ``304 Not Modified`` instead of the stored body?

Pure rules, no I/O: the response writer (:mod:`tierproxy.response`) asks
:func:`client_not_modified` for every stored entry it serves, from whichever tier, and keeps
:data:`NOT_MODIFIED_HEADERS` of the entry on the ``304``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from multidict import CIMultiDict, CIMultiDictProxy

from .directives import http_date

if TYPE_CHECKING:
    from .entry import Entry

__all__ = [
    "NOT_MODIFIED_HEADERS",
    "client_not_modified",
    "etag_list_matches_weakly",
    "weakly_equal",
]

AnyHeaders = CIMultiDict[str] | CIMultiDictProxy[str] | Mapping[str, str]

#: RFC 9110 §15.4.5: what a 304 carries when the 200 would have had it (Last-Modified too:
#: it guides the client's cache update).
NOT_MODIFIED_HEADERS = frozenset(
    {"cache-control", "content-location", "date", "etag", "expires", "vary", "last-modified"}
)


def _opaque(tag: str) -> str:
    return tag.strip().removeprefix("W/")


def weakly_equal(a: str, b: str) -> bool:
    """RFC 9110 §8.8.3.2 weak comparison of two entity-tags: the opaque tags are equal."""
    return _opaque(a) == _opaque(b)


def etag_list_matches_weakly(if_none_match: str, etag: str) -> bool:
    """RFC 9110 §13.1.2: ``*``, or any listed entity-tag equal to ``etag`` by weak comparison
    (``W/`` ignored on either side)."""
    if if_none_match.strip() == "*":
        return True
    stored = _opaque(etag)
    return any(_opaque(tag) == stored for tag in if_none_match.split(","))


def client_not_modified(request_headers: AnyHeaders, entry: Entry) -> bool:
    """May the client get ``304`` for ``entry``?

    Only a 2xx but 206 (RFC 9110 §13.2.1: preconditions are ignored when the answer without
    them would not be 2xx). ``If-None-Match`` decides when present (weak comparison); else
    ``If-Modified-Since``, when it is a valid HTTP-date, against the stored ``Last-Modified``
    or, without one, the stored ``Date`` (RFC 9111 §4.3.2), or when the entry has neither, the
    time it was generated. A date after the validator's is not "modified since" either.
    """
    if not 200 <= entry.status < 300 or entry.status == 206:
        return False
    if_none_match = request_headers.get("If-None-Match")
    if if_none_match is not None:
        return entry.etag is not None and etag_list_matches_weakly(if_none_match, entry.etag)
    if_modified_since_raw = request_headers.get("If-Modified-Since")
    if if_modified_since_raw is None:
        return False  # the common case: nothing to parse on a plain hit
    if_modified_since = http_date(if_modified_since_raw, entry.stored_at)
    if if_modified_since is None:
        return False  # RFC 9110 §13.1.3: an invalid date is ignored
    if entry.last_modified is not None:
        validator = http_date(entry.last_modified, entry.stored_at)
    else:
        validator = http_date(_field(entry, "date"), entry.stored_at)
        if validator is None:
            validator = entry.stored_at
    if validator is None:
        return False
    return validator <= if_modified_since


def _field(entry: Entry, name: str) -> str | None:
    for field_name, value in entry.headers:
        if field_name.lower() == name:
            return value
    return None
