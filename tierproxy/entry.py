"""The cached entry: what every tier stores and every hit serves."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from itertools import chain
from operator import itemgetter
from typing import Any, NamedTuple, cast

__all__ = ["OWN_HEADERS", "Entry", "Headers", "Variant", "has_raw_bytes", "restore", "wire"]

Headers = tuple[tuple[str, str], ...]


class Variant(NamedTuple):
    """One stored variant of a URL, as its variant index lists it (see tierproxy.variants)."""

    vid: str  # its id: tierproxy.variants.variant_id(values)
    values: Headers  # the normalised request values it was chosen by (lower-case names)
    language: str  # its Content-Language, case-folded members joined by "," ("" = none)
    encoding: str  # its Content-Encoding, likewise ("" = none: identity)
    expires_at: float  # when its record may be dropped (Entry.expires_at)


# Response fields tierproxy writes itself on every response: an upstream's copy is never
# replayed next to them. X-Cache and X-Request-ID are replaced (and not stored, see
# policy.storable_headers); an upstream Cache-Status is kept and tierproxy's member appended
# after its members (RFC 9211 §2: listed from the origin towards the user agent).
OWN_HEADERS = frozenset({"x-cache", "x-request-id", "cache-status"})

# What aiohttp's serialiser refuses in a field line (RFC 9110 §5.5: CR, LF, NUL and other
# controls but HTAB); a stored line holding one (only possible in a tampered shared-tier entry)
# is never written by the hit path.
FORBIDDEN_IN_HEADER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

# Bits of Entry.head_flags: stored fields that spare aiohttp from adding its own.
# The reason phrases aiohttp writes (aiohttp 3.14 builds its own table exactly so, from the
# standard library; tests/unit/test_aiohttp_internals.py checks that the two agree).
REASON_PHRASES = {status.value: status.phrase for status in HTTPStatus}

HAS_CONTENT_TYPE = 1
HAS_DATE = 2
HAS_SERVER = 4

# Bytes charged per entry for what sys.getsizeof does not see: the L1 index's dict slot and
# linked-list node, and allocator rounding. tests/integration/test_l1_memory_bound.py checks the
# sum against a spawned proxy's resident memory (it errs on the generous side: header names
# the parser shares between responses are counted for each entry).
_INDEX_OVERHEAD = 160

# What Entry.hit_memo holds beyond a copy of the stored head: the per-hit lines but the
# request id (Age, X-Cache, Cache-Status, Content-Length, and those aiohttp would add: about
# 250 bytes), the tuple and its small values; on the generous side.
HIT_MEMO_BYTES = 512


def wire(text: str) -> bytes:
    """The bytes a header str came from: aiohttp decodes header bytes as UTF-8 with
    surrogateescape, so any byte (obs-text, e.g. latin-1 ``caf\\xe9``) round-trips exactly."""
    return text.encode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored response.

    Timestamps are wall-clock epoch seconds: entries cross processes (Redis, SQLite).
    ``stored_at`` is when the origin generated the response (corrected for any ``Age`` it
    arrived with), so ``Age`` = now - stored_at (RFC 9111 §4.2.3).

    Header names and values are ``str`` as aiohttp decodes them (UTF-8, surrogateescape):
    :func:`wire` gives back the exact bytes, which is what the codec stores and what every
    response path writes.
    """

    key: str  # the normalised key material; checked on decode so one URL never gets another's bytes
    status: int
    headers: Headers  # end-to-end response headers, as the origin sent them (minus hop-by-hop)
    body: bytes
    stored_at: float
    fresh_until: float  # fresh while now < fresh_until
    stale_until: float  # may be served stale on origin failure while now < stale_until
    swr_until: float  # may be served stale while revalidating in the background (RFC 5861)
    expires_at: float  # drop from storage after this (kept past stale_until for revalidation)
    etag: str | None = None
    last_modified: str | None = None
    vary: Headers = ()  # request header (lower-case name, value) pairs this variant was chosen by
    tags: tuple[str, ...] = ()  # surrogate keys
    # Non-empty only in a URL's variant index (a response that varies): the variants stored,
    # least recently used first; each is a record of its own (tierproxy.variants). An index
    # is never a response: only tiers/base.GuardedTier reads it.
    variants: tuple[Variant, ...] = ()
    # Built once per entry, never per hit (and counted in ``size``): the status line and the
    # stored header lines as HTTP/1.1 bytes, without the fields tierproxy writes itself (see
    # OWN_HEADERS); None when a stored line is unsafe to write (the full path refuses it).
    wire_head: bytes | None = field(init=False, repr=False, compare=False, hash=False)
    # The upstream's Cache-Status members followed by ", " (b"" without one): tierproxy's
    # member is appended to them.
    upstream_cache_status: bytes = field(init=False, repr=False, compare=False, hash=False)
    head_flags: int = field(init=False, repr=False, compare=False, hash=False)
    # True when a stored header holds bytes that are not UTF-8 (obs-text): aiohttp's own
    # serialiser would drop them, so the full path writes this entry's head itself.
    raw_bytes: bool = field(init=False, repr=False, compare=False, hash=False)
    # What holding this entry costs in memory, in bytes (L1 charges it against its bound).
    size: int = field(init=False, repr=False, compare=False, hash=False)
    # The hit path's head for this entry at its latest hit, but the request id
    # (tierproxy.response.fresh_hit_head): it changes at most once a second, where a hit
    # comes many times. None until the first hit; never copied (dataclasses.replace builds
    # an entry anew), and charged in ``size`` (HIT_MEMO_BYTES beyond the stored head).
    hit_memo: tuple[Any, ...] | None = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        # Runs for every entry built from a response (an entry decoded from L2/L3 gets these
        # fields from its record instead: restore below): the common case (no field
        # tierproxy writes itself) is built with C-level joins, not a loop per field.
        setattr_ = object.__setattr__
        headers = self.headers
        status_line = b"HTTP/1.1 %d %s\r\n" % (
            self.status,
            REASON_PHRASES.get(self.status, "").encode(),
        )
        names = frozenset(map(str.lower, map(itemgetter(0), headers)))
        upstream = b""
        getsizeof = sys.getsizeof
        if names & OWN_HEADERS:
            head, upstream = _head_without_own(status_line, headers)
            raw_bytes = has_raw_bytes(headers)
            size = _pairs_size(headers)
        else:
            # "name: value" per field, CRLF after each: ": ".join of a pair is C, no call per field
            block = "\r\n".join(map(_COLON_SPACE.join, headers)) + "\r\n" if headers else ""
            raw_bytes = False
            if block.isascii():
                # An ASCII str takes _ASCII_STR + its length: the pairs' size without a
                # call per string (": " and CRLF are 4 characters of each line).
                count = len(headers)
                size = getsizeof(headers) + count * (72 + 2 * _ASCII_STR - 4) + len(block)
            else:
                size = _pairs_size(headers)
                try:
                    block.encode("utf-8")
                except UnicodeEncodeError:
                    raw_bytes = True
            head = None
            # One CR and one LF per line, no other control character (RFC 9110 §5.5).
            if block.count("\r") == block.count("\n") == len(
                headers
            ) and not _CONTROL_BUT_CRLF.search(block):
                try:
                    head = status_line + wire(block)
                except UnicodeEncodeError:  # a surrogate no byte decodes to: not from the wire
                    head = None
        setattr_(self, "wire_head", head)
        setattr_(self, "upstream_cache_status", upstream)
        setattr_(
            self,
            "head_flags",
            (
                (HAS_CONTENT_TYPE if "content-type" in names else 0)
                | (HAS_DATE if "date" in names else 0)
                | (HAS_SERVER if "server" in names else 0)
            ),
        )
        setattr_(self, "raw_bytes", raw_bytes)
        setattr_(self, "hit_memo", None)
        size += getsizeof(self) + getsizeof(self.body) + getsizeof(self.key) + _INDEX_OVERHEAD
        if head is not None:
            size += 2 * getsizeof(head) + HIT_MEMO_BYTES  # the head, and the hit path's copy
        if upstream:
            size += getsizeof(upstream)
        for text in (self.etag, self.last_modified):
            if text is not None:
                size += getsizeof(text)
        if self.vary:
            size += _pairs_size(self.vary)
        if self.tags:
            size += getsizeof(self.tags) + sum(map(getsizeof, self.tags))
        if self.variants:
            size += getsizeof(self.variants) + sum(
                getsizeof(v)
                + 40
                + len(v.vid)
                + len(v.language)
                + len(v.encoding)
                + _pairs_size(v.values)
                for v in self.variants
            )
        setattr_(self, "size", size)

    def age(self, now: float) -> int:
        return max(0, int(now - self.stored_at))


class _Unbuilt:
    """Entry's memory layout (the same slots, in the same order) without its frozen
    ``__setattr__`` and ``__post_init__``: :func:`restore` fills one with plain attribute
    stores and then makes it an Entry (``__class__`` assignment: CPython allows it between
    classes of the same layout, and refuses it otherwise): about a third of what one
    ``object.__setattr__`` call per field costs."""

    __slots__ = Entry.__slots__


def restore(
    key: str,
    status: int,
    headers: Headers,
    body: bytes,
    stored_at: float,
    fresh_until: float,
    stale_until: float,
    swr_until: float,
    expires_at: float,
    etag: str | None,
    last_modified: str | None,
    vary: Headers,
    tags: tuple[str, ...],
    variants: tuple[Variant, ...],
    wire_head: bytes | None,
    upstream_cache_status: bytes,
    head_flags: int,
    raw_bytes: bool,
    size: int,
) -> Entry:
    """An Entry with its derived fields as given, WITHOUT running ``__post_init__``: for the
    codec, which stores what ``__post_init__`` built when the entry was stored (building them
    again cost most of an L2/L3 hit). The caller vouches that the derived fields are what
    ``__post_init__`` would build from the others, or at least safe to write
    (tierproxy.codec checks them); anything else builds an Entry the ordinary way."""
    entry: Any = _Unbuilt()  # (its slots are Entry's: mypy cannot see them)
    entry.key = key
    entry.status = status
    entry.headers = headers
    entry.body = body
    entry.stored_at = stored_at
    entry.fresh_until = fresh_until
    entry.stale_until = stale_until
    entry.swr_until = swr_until
    entry.expires_at = expires_at
    entry.etag = etag
    entry.last_modified = last_modified
    entry.vary = vary
    entry.tags = tags
    entry.variants = variants
    entry.wire_head = wire_head
    entry.upstream_cache_status = upstream_cache_status
    entry.head_flags = head_flags
    entry.raw_bytes = raw_bytes
    entry.size = size
    entry.hit_memo = None
    entry.__class__ = Entry
    return cast(Entry, entry)


# What an empty ASCII str takes (CPython's compact ASCII object); one of n characters: this + n.
_ASCII_STR = sys.getsizeof("")

# A field line may hold HTAB but no other control character; CR and LF are counted apart.
_CONTROL_BUT_CRLF = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


_COLON_SPACE = ": "


def _pairs_size(pairs: Headers) -> int:
    """Memory held by a tuple of (name, value) pairs: the tuples and their strings."""
    return (
        sys.getsizeof(pairs)
        + 72 * len(pairs)  # 72: one (name, value) tuple
        + sum(map(sys.getsizeof, chain.from_iterable(pairs)))
    )


def has_raw_bytes(headers: Iterable[tuple[str, str]]) -> bool:
    """Whether a field holds bytes that are not UTF-8 (obs-text, RFC 9110 §5.5): aiohttp
    decodes them with surrogateescape and its serialiser drops the surrogates, so such a head
    must be written byte-exact by tierproxy itself."""
    for name, value in headers:
        if not (name.isascii() and value.isascii()):
            try:
                name.encode("utf-8")
                value.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def _head_without_own(status_line: bytes, headers: Headers) -> tuple[bytes | None, bytes]:
    """The head without the fields tierproxy writes itself (OWN_HEADERS), and the upstream's
    Cache-Status members followed by ", " (b"" without one); the head is None when a stored
    line is unsafe to write."""
    lines = [status_line]
    upstream: list[bytes] = []
    safe = True
    for name, value in headers:
        try:
            line = wire(name) + b": " + wire(value)
        except UnicodeEncodeError:  # a surrogate no byte decodes to: not from the wire
            safe = False
            continue
        if FORBIDDEN_IN_HEADER.search(name) or FORBIDDEN_IN_HEADER.search(value):
            safe = False
        lname = name.lower()
        if lname in OWN_HEADERS:
            if lname == "cache-status" and value.strip():
                upstream.append(line[len(name) + 2 :].strip())
            continue
        lines.append(line + b"\r\n")
    return (b"".join(lines) if safe else None, b", ".join(upstream) + b", " if upstream else b"")
