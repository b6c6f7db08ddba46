"""Reading and rewriting shared-tier records (tierproxy.codec's format 4) from the tests.

A record is a msgpack list of the entry's fields, the fields Entry derives from them, and a
CRC-32 of every byte before it (a 4-byte bin, the list's last item). :func:`damaged` rewrites
fields and keeps the old CRC (bytes changed in place: what damage does); :func:`forged`
computes a new CRC (what anyone who can write to Redis can do).
"""

from __future__ import annotations

import zlib
from typing import Any

import msgpack

from tierproxy.entry import Entry

FORMAT = 4
# Field positions in a format-4 record (tierproxy.codec.encode).
KEY, STATUS, HEADERS, BODY, STORED_AT, FRESH_UNTIL = 1, 2, 3, 4, 5, 6
ETAG, LAST_MODIFIED, VARY, TAGS, VARIANTS, BODY_LENGTH = 10, 11, 12, 13, 14, 15
WIRE_HEAD, UPSTREAM_CACHE_STATUS, HEAD_FLAGS, RAW_BYTES, SIZE, CRC = 16, 17, 18, 19, 20, 21


def fields(record: bytes) -> list[Any]:
    """The record's fields, as lists (str with their wire bytes: surrogateescape)."""
    out: list[Any] = msgpack.unpackb(record, raw=False, unicode_errors="surrogateescape")
    assert out[0] == FORMAT, "codec format changed: update tests/support/records.py"
    return out


def _pack(items: list[Any]) -> bytes:
    packed: bytes = msgpack.packb(items, use_bin_type=True, unicode_errors="surrogateescape")
    return packed


def damaged(items: list[Any]) -> bytes:
    """``items`` packed again with the CRC they hold (the original record's)."""
    return _pack(items)


def forged(items: list[Any]) -> bytes:
    """``items`` packed again with a CRC that matches them."""
    payload = _pack([*items[:CRC], bytes(4)])[:-4]
    return payload + zlib.crc32(payload).to_bytes(4, "little")


def long_lived(material: str, body: bytes, tags: tuple[str, ...] = ()) -> Entry:
    """A plain 200 for ``material`` that stays fresh for decades: for tests of storage, not of
    freshness."""
    return Entry(
        key=material,
        status=200,
        headers=(("Content-Type", "text/plain"),),
        body=body,
        stored_at=1.0,
        fresh_until=4e9,
        stale_until=4e9,
        swr_until=4e9,
        expires_at=4e9,
        tags=tags,
    )
