"""Entry <-> bytes for the shared tiers (L2, L3): msgpack with a format version.

An entry that cannot be read back exactly — another format version, truncated bytes, a body
whose length or checksum differs from what was stored, or an entry stored under another key —
raises :class:`CorruptEntry`; callers treat it as a miss and delete it.

Header names and values, validators, Vary values and tags are stored as the bytes that came
over the wire: aiohttp decodes header bytes as UTF-8 with ``surrogateescape``, so any byte
(obs-text such as latin-1 ``caf\xe9``, RFC 9110 §5.5) is a lone surrogate in the ``str``, which
msgpack's strict UTF-8 refuses. Packing and unpacking with ``unicode_errors="surrogateescape"``
writes exactly the bytes received and reads back the same ``str``: lossless both ways, and
done in msgpack's C code (no per-field Python on the lookup path).

An entry that cannot be encoded raises :class:`Unencodable`: that entry is not stored in the
shared tiers (a bug to log), which says nothing about the tier's health.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import msgpack

from .entry import Entry, Variant

__all__ = ["FORMAT_VERSION", "CorruptEntry", "Unencodable", "decode", "encode", "unpack"]

# 2: str fields carry the wire bytes (surrogateescape), where 1 refused non-UTF-8 ones.
# 3: a URL that varies has a variant index (Entry.variants) and one record per variant.
# The version is part of every shared-tier key (tierproxy.keys.KeySpace) as well: a record
# of another version is not even looked up, and one found all the same is a miss.
FORMAT_VERSION = 3


class CorruptEntry(Exception):
    """Stored bytes that are not a valid entry for the requested key."""


class Unencodable(Exception):
    """An entry that cannot be serialised: a bug, never a sign that a tier is down."""


def _flatten(pairs: tuple[tuple[str, str], ...]) -> list[str]:
    return [item for pair in pairs for item in pair]


def _all_str(items: list[Any]) -> bool:
    return not items or set(map(type, items)) == {str}  # C-level: no generator per item


def _pairs(flat: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(flat, list) or len(flat) % 2 or not _all_str(flat):
        raise CorruptEntry("bad header list")
    return tuple(zip(flat[0::2], flat[1::2], strict=True))


def _checksum(
    body: bytes,
    status: int,
    headers: list[str],
    times: tuple[float, ...],
    etag: str | None,
    last_modified: str | None,
    vary: list[str],
    tags: list[str],
    variants: list[Any],
) -> int:
    """CRC-32 of the body and of everything else a response is built from (status, header
    bytes, lifetimes, validators, Vary values, tags): damage to any of them is a miss, never
    a wrong header or a wrong lifetime served. The key is checked apart (it must be the one
    asked for)."""
    text = "\0".join(
        (
            "\n".join(headers),
            "\n".join(vary),
            "\n".join(tags),
            _variants_text(variants) if variants else "",
            "\x01" if etag is None else etag,
            "\x01" if last_modified is None else last_modified,
        )
    )
    crc = zlib.crc32(_NUMBERS.pack(status, *times), zlib.crc32(body))
    return zlib.crc32(text.encode("utf-8", "surrogateescape"), crc)


def _variants_text(variants: list[Any]) -> str:
    return "\n".join(
        f"{v[0]}\x02{chr(2).join(v[1])}\x02{v[2]}\x02{v[3]}\x02{v[4]!r}" for v in variants
    )


_NUMBERS = struct.Struct("<H5d")  # status and the five timestamps, as the checksum sees them


def unpack(data: bytes) -> Any:
    """msgpack bytes -> objects, str fields with their exact wire bytes (module docstring)."""
    try:
        return msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True, unicode_errors="surrogateescape"
        )
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types on garbage
        raise CorruptEntry(f"undecodable: {type(exc).__name__}") from None


def encode(entry: Entry) -> bytes:
    """The entry's bytes; :class:`Unencodable` if it has something msgpack cannot hold."""
    body = entry.body
    headers, vary, tags = _flatten(entry.headers), _flatten(entry.vary), list(entry.tags)
    variants = [
        [v.vid, _flatten(v.values), v.language, v.encoding, float(v.expires_at)]
        for v in entry.variants
    ]
    times = (
        entry.stored_at,
        entry.fresh_until,
        entry.stale_until,
        entry.swr_until,
        entry.expires_at,
    )
    try:
        crc = _checksum(
            body,
            entry.status,
            headers,
            times,
            entry.etag,
            entry.last_modified,
            vary,
            tags,
            variants,
        )
        packed: bytes = msgpack.packb(
            [
                FORMAT_VERSION,
                entry.key,
                entry.status,
                headers,
                body,
                *times,
                entry.etag,
                entry.last_modified,
                vary,
                tags,
                variants,
                len(body),
                crc,
            ],
            use_bin_type=True,
            unicode_errors="surrogateescape",
        )
    except Exception as exc:  # noqa: BLE001 - msgpack and str.encode raise unrelated types
        raise Unencodable(f"{type(exc).__name__}: {exc}") from None
    return packed


def decode(data: bytes, key: str) -> Entry:
    """Decode ``data`` stored for ``key``; raise :class:`CorruptEntry` unless it is exactly that."""
    fields = unpack(data)
    if not isinstance(fields, list) or not fields or fields[0] != FORMAT_VERSION:
        raise CorruptEntry("unknown format version")
    if len(fields) != 17:
        raise CorruptEntry("wrong field count")
    (
        _version,
        stored_key,
        status,
        headers,
        body,
        stored_at,
        fresh_until,
        stale_until,
        swr_until,
        expires_at,
        etag,
        last_modified,
        vary,
        tags,
        variants,
        body_len,
        crc,
    ) = fields
    if stored_key != key:
        raise CorruptEntry("entry belongs to another key")
    if not isinstance(body, bytes) or len(body) != body_len:
        raise CorruptEntry("body length mismatch")
    if not isinstance(status, int) or not 100 <= status <= 599:
        raise CorruptEntry("bad status")
    times = (stored_at, fresh_until, stale_until, swr_until, expires_at)
    if not all(isinstance(t, (int, float)) for t in times):
        raise CorruptEntry("bad timestamps")
    if not (etag is None or isinstance(etag, str)) or not (
        last_modified is None or isinstance(last_modified, str)
    ):
        raise CorruptEntry("bad validators")
    if not isinstance(tags, list) or not _all_str(tags):
        raise CorruptEntry("bad tags")
    if not (
        isinstance(headers, list)
        and _all_str(headers)
        and isinstance(vary, list)
        and _all_str(vary)
    ):
        raise CorruptEntry("bad header list")
    if not isinstance(variants, list) or (variants and not all(map(_is_variant, variants))):
        raise CorruptEntry("bad variant index")
    if _checksum(body, status, headers, times, etag, last_modified, vary, tags, variants) != crc:
        raise CorruptEntry("checksum mismatch")
    return Entry(
        key=key,
        status=status,
        headers=_pairs(headers),
        body=body,
        stored_at=float(stored_at),
        fresh_until=float(fresh_until),
        stale_until=float(stale_until),
        swr_until=float(swr_until),
        expires_at=float(expires_at),
        etag=etag,
        last_modified=last_modified,
        vary=_pairs(vary),
        tags=tuple(tags),
        variants=tuple(
            Variant(vid, _pairs(values), language, encoding, float(expires))
            for vid, values, language, encoding, expires in variants
        )
        if variants
        else (),
    )


def _is_variant(item: Any) -> bool:
    return (
        isinstance(item, list)
        and len(item) == 5
        and isinstance(item[0], str)
        and isinstance(item[1], list)
        and _all_str(item[1])
        and len(item[1]) % 2 == 0
        and isinstance(item[2], str)
        and isinstance(item[3], str)
        and isinstance(item[4], (int, float))
    )
