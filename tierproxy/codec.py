"""Entry <-> bytes for the shared tiers (L2, L3): msgpack with a format version and a CRC.

A record is a msgpack list: the entry's fields, then what :class:`~tierproxy.entry.Entry`
derives from them, then the CRC-32 of every byte before it (a 4-byte bin). An entry that
cannot be read back exactly — another format version, truncated or damaged bytes (any byte:
the CRC covers them all), a body whose length differs from the stored one, or an entry stored
under another key — raises :class:`CorruptEntry`; callers treat it as a miss and delete it.

Wire-ready: the record holds what ``Entry.__post_init__`` built when the entry was stored (its
HTTP/1.1 head, upstream Cache-Status members, head flags, raw-bytes flag and size), and
decoding restores the Entry with them (:func:`tierproxy.entry.restore`) instead of building
them again on every L2/L3 hit. Whoever can write to Redis can also forge a valid CRC, so every
field is still checked for its type (a forged record raises CorruptEntry, never anything
else), and the stored head is checked before it can ever be written to a client: exactly the
status line for the stored status, then field lines ``token ": " value CRLF`` with no control
character in a value but HTAB (RFC 9110 §5.5, §5.6.2), and no field tierproxy writes itself
or never stores (framing, hop-by-hop, Age, X-Cache, ...: see ``_UNSTORABLE``). An entry whose
head does not pass these checks (a header name that is not a token, say: never from aiohttp's
parser) is stored with no head, which the full path serves.

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

import math
import re
import zlib
from typing import Any

import msgpack

from .entry import OWN_HEADERS, REASON_PHRASES, Entry, Variant, restore
from .policy import HOP_BY_HOP, NOT_STORED

__all__ = ["FORMAT_VERSION", "CorruptEntry", "Unencodable", "decode", "encode", "unpack"]

# 2: str fields carry the wire bytes (surrogateescape), where 1 refused non-UTF-8 ones.
# 3: a URL that varies has a variant index (Entry.variants) and one record per variant.
# 4: one CRC-32 over the whole record (it was over the fields a response is built from), and
#    the fields Entry derives stored with the others (wire-ready: see the module docstring).
# The version is part of every shared-tier key (tierproxy.keys.KeySpace) as well: a record
# of another version is not even looked up, and one found all the same is a miss.
FORMAT_VERSION = 4

_FIELDS = 22  # in a record's list: see encode()
# A record ends with the CRC-32 of all its bytes before it, little-endian (as a 4-byte msgpack
# bin: the list's last item). The CRC-32 of such bytes, CRC included, is always this constant
# (the CRC's residue), so checking one costs one zlib.crc32 of the record as it is.
_CRC_BYTES = 4
_CRC_PLACEHOLDER = bytes(_CRC_BYTES)
_CRC_RESIDUE = 0x2144DF1C

# Fields never in a stored head: framing and hop-by-hop ones (RFC 9110 §7.6.1), those
# tierproxy writes itself on every response (Age, X-Cache, X-Request-ID, Cache-Status) and
# those the policy never stores. A forged head holding one could frame a response its own
# way, or smuggle a second one.
_UNSTORABLE = HOP_BY_HOP | NOT_STORED | OWN_HEADERS
# Of those, the ones that frame a message (RFC 9112 §6; hop-by-hop fields, Connection and
# Transfer-Encoding among them): never among a record's stored header fields either.
_FRAMING = HOP_BY_HOP | {"content-length"}
# A head after its status line, lower-cased: field lines, each a name (a token, RFC 9110
# §5.6.2) that is not one of _UNSTORABLE nor a Proxy-* field (never the origin's business),
# ": ", a value with no control character but HTAB (§5.5), CRLF. One regex, one pass.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9a-z]+"
_FIELD_LINES = re.compile(
    rb"(?:(?!(?:%s|proxy(?:-%s)?):)%s: [^\x00-\x08\x0a-\x1f\x7f]*+\r\n)*+"
    % (b"|".join(re.escape(name.encode()) for name in sorted(_UNSTORABLE)), _TOKEN, _TOKEN)
)
_STATUS_LINES = {
    status: b"HTTP/1.1 %d %s\r\n" % (status, REASON_PHRASES.get(status, "").encode())
    for status in range(100, 600)
}
# Upstream Cache-Status members followed by ", " (Entry.upstream_cache_status): with a head,
# which the hit path writes them after, no control character but HTAB; without one, no CR or
# LF (the full path hands them to aiohttp's serialiser, which refuses those two only).
_MEMBERS = re.compile(rb"(?:[^\x00-\x08\x0a-\x1f\x7f]*, )?")
_MEMBERS_WITHOUT_HEAD = re.compile(rb"(?:[^\r\n]*, )?")
_OPTIONAL_STR = (str, type(None))


class CorruptEntry(Exception):
    """Stored bytes that are not a valid entry for the requested key."""


class Unencodable(Exception):
    """An entry that cannot be serialised: a bug, never a sign that a tier is down."""


# Heads found valid lately (_head_ok): a hot entry's every hit decodes the same head, and the
# check (a regex over the lower-cased head) is about a third of a decode. Exact bytes, so a
# head is only ever taken for one already checked; bounded by count and bytes, emptied when
# full.
_HEADS_OK: set[bytes] = set()
_HEADS_OK_MAX = 1024
_HEADS_OK_MAX_BYTES = 1 << 20
_heads_ok_bytes = 0


# Records decoded lately, with the Entry decode built for each: a hot L2/L3 entry comes back
# byte for byte at every hit, and decoding it again (the CRC, msgpack, every field's check)
# builds the same frozen Entry - most of an L2 hit's decode. Found by key and CRC (a record's
# last 4 bytes: a small tuple to hash, where hashing the whole record would cost about what
# its CRC does), then compared byte for byte: only exactly equal bytes stored for the same
# key are taken, anything else is decoded, or refused, as ever.
#
# Bounded by count and bytes, a record counting its bytes plus its Entry's size (what L1
# charges for it: every str and tuple it holds; a record whose entry would take over a
# sixteenth of the bound is not kept). A record is kept the second time it is decoded lately
# (_SEEN_ONCE): with L1 on, most records are decoded once, their entry then in L1. Once full,
# nothing is evicted for a newcomer: load cycling over more keys than fit would replace every
# record before it came back, and that churn (likely: objects promoted toward the collector's
# oldest generation, freed soon after) cost more than decoding: L2 hits over 2,000 keys in
# turn ran 21 % slower with an evicting memo than with none (python -m loadtest.ab --keys 2000).
# After _DECODED_REFUSALS newcomers were refused it is emptied, so a hot set that changed
# gets in. Records over _DECODED_MAX_RECORD bytes are never kept (one would crowd the others
# out for what its memcmp would save).
_DECODED: dict[tuple[str, bytes], tuple[bytes, Entry]] = {}
_DECODED_MAX = 1024
_DECODED_MAX_BYTES = 8 << 20
_DECODED_MAX_RECORD = 64 << 10
_DECODED_REFUSALS = 16 * _DECODED_MAX
_decoded_bytes = 0
_decoded_refused = 0
_SEEN_ONCE: set[tuple[str, bytes]] = set()  # (key, CRC) decoded once lately; emptied when full
_SEEN_ONCE_MAX = 4096


def _remember(found_by: tuple[str, bytes], data: bytes, entry: Entry) -> None:
    global _decoded_bytes, _decoded_refused
    cost = len(data) + entry.size
    if cost > _DECODED_MAX_BYTES // 16:
        return
    if len(_DECODED) >= _DECODED_MAX or _decoded_bytes + cost > _DECODED_MAX_BYTES:
        _decoded_refused += 1
        if _decoded_refused < _DECODED_REFUSALS:
            return
        _DECODED.clear()
        _decoded_bytes = _decoded_refused = 0
    _DECODED[found_by] = (data, entry)
    _decoded_bytes += cost


def _head_ok(status: int, head: bytes) -> bool:
    """Whether ``head`` is one tierproxy may write for ``status`` (module docstring)."""
    global _heads_ok_bytes
    line = _STATUS_LINES[status]
    if not head.startswith(line):
        return False
    if head in _HEADS_OK:
        return True
    if _FIELD_LINES.fullmatch(head.lower(), len(line)) is None:
        return False
    if len(head) > _HEADS_OK_MAX_BYTES // 64:
        return True  # (one such head would crowd the others out: checked each time)
    if len(_HEADS_OK) >= _HEADS_OK_MAX or _heads_ok_bytes + len(head) > _HEADS_OK_MAX_BYTES:
        _HEADS_OK.clear()
        _heads_ok_bytes = 0
    _HEADS_OK.add(head)
    _heads_ok_bytes += len(head)
    return True


def _unpack(data: bytes) -> Any:
    # use_list=False: every msgpack array is a tuple, as Entry holds its tags (and Headers)
    try:
        return msgpack.unpackb(
            data, raw=False, use_list=False, strict_map_key=True, unicode_errors="surrogateescape"
        )
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types on garbage
        raise CorruptEntry(f"undecodable: {type(exc).__name__}") from None


def _flatten(pairs: tuple[tuple[str, str], ...]) -> list[str]:
    return [item for pair in pairs for item in pair]


def _pairs(flat: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    items = iter(flat)  # (an even count of str: checked by the caller)
    return tuple(zip(items, items))


def _members_ok(head: bytes | None, upstream: bytes) -> bool:
    return (_MEMBERS if head is not None else _MEMBERS_WITHOUT_HEAD).fullmatch(upstream) is not None


def unpack(data: bytes) -> Any:
    """A record -> its msgpack objects, once its CRC matches; str fields with their exact wire
    bytes (module docstring). ``fields[1]`` is the key material (tiers/base.decode_unkeyed)."""
    if zlib.crc32(data) != _CRC_RESIDUE:
        raise CorruptEntry("checksum mismatch")
    return _unpack(data)


def encode(entry: Entry) -> bytes:
    """The entry's bytes; :class:`Unencodable` if it has something msgpack cannot hold."""
    body = entry.body
    head = entry.wire_head
    if head is not None and not _head_ok(entry.status, head):
        head = None  # not one decode would accept: the full path serves this entry
    try:
        packed: bytes = msgpack.packb(
            [
                FORMAT_VERSION,
                entry.key,
                entry.status,
                _flatten(entry.headers),
                body,
                float(entry.stored_at),
                float(entry.fresh_until),
                float(entry.stale_until),
                float(entry.swr_until),
                float(entry.expires_at),
                entry.etag,
                entry.last_modified,
                _flatten(entry.vary),
                entry.tags,
                [
                    (v.vid, _flatten(v.values), v.language, v.encoding, float(v.expires_at))
                    for v in entry.variants
                ],
                len(body),
                # What Entry.__post_init__ derived (tierproxy.entry.restore):
                head,
                entry.upstream_cache_status,
                entry.head_flags,
                entry.raw_bytes,
                entry.size,
                _CRC_PLACEHOLDER,  # the CRC's 4 bytes (a msgpack bin) are the record's last
            ],
            use_bin_type=True,
            unicode_errors="surrogateescape",
        )
    except Exception as exc:  # noqa: BLE001 - msgpack and float() raise unrelated types
        raise Unencodable(f"{type(exc).__name__}: {exc}") from None
    payload = packed[:-_CRC_BYTES]
    record = payload + zlib.crc32(payload).to_bytes(_CRC_BYTES, "little")
    # Never store what decode refuses (only a hand-built entry can be so).
    if not 200 <= entry.status <= 599:
        raise Unencodable(f"status {entry.status} is not a final one")
    if not _FRAMING.isdisjoint(name.lower() for name, _ in entry.headers):
        raise Unencodable("a framing field among the stored ones")
    if not _members_ok(head, entry.upstream_cache_status):
        raise Unencodable("upstream Cache-Status members hold CR or LF")
    if not len(body) <= entry.size <= _max_size(record):
        raise Unencodable(f"size {entry.size} out of bounds for a {len(record)}-byte record")
    return record


def _min_size(
    record: bytes,
    headers: tuple[str, ...],
    vary: tuple[str, ...],
    tags: tuple[str, ...],
    variants: tuple[Any, ...],
) -> int:
    """The least Entry.size decode accepts: the record's bytes (each held at least once), plus
    what each string (a str object: 49 bytes and more) and each variant (a tuple of five, its
    pairs) takes beyond its characters - far below what Entry.__post_init__ counts for them."""
    return len(record) + 48 * (len(headers) + len(vary) + len(tags)) + 160 * len(variants)


def _utf8(headers: tuple[str, ...], upstream: bytes) -> bool:
    """Whether the header strings and upstream Cache-Status members are UTF-8 text."""
    text = "".join(headers)
    if not (text.isascii() and upstream.isascii()):
        try:
            text.encode("utf-8")
            upstream.decode("utf-8")
        except UnicodeError:
            return False
    return True


def _max_size(record: bytes) -> int:
    """The largest Entry.size decode accepts for a record: far more than any real entry's
    (a few hundred bytes a header at worst), far less than a forged size that would make L1
    evict everything for one entry."""
    return 64 * len(record) + 65536


def decode(data: bytes, key: str) -> Entry:
    """Decode ``data`` stored for ``key``; raise :class:`CorruptEntry` unless it is exactly that.

    The CRC only tells damage apart: a record written by someone who can also compute a CRC is
    checked field by field, cheaply (C-level type checks), so that it raises nothing but
    CorruptEntry and its head is never one tierproxy would not write (module docstring).
    The same bytes decoded lately for the same key give the same Entry (``_DECODED``)."""
    if len(data) > _DECODED_MAX_RECORD:
        return _decode(data, key)
    found_by = (key, data[-_CRC_BYTES:])
    known = _DECODED.get(found_by)
    if known is not None and known[0] == data:
        return known[1]
    entry = _decode(data, key)
    if found_by in _SEEN_ONCE:
        _remember(found_by, data, entry)
    else:
        if len(_SEEN_ONCE) >= _SEEN_ONCE_MAX:
            _SEEN_ONCE.clear()
        _SEEN_ONCE.add(found_by)
    return entry


def _decode(data: bytes, key: str) -> Entry:
    fields = unpack(data)
    if type(fields) is not tuple or not fields or fields[0] != FORMAT_VERSION:
        raise CorruptEntry("unknown format version")
    if len(fields) != _FIELDS:
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
        head,
        upstream,
        flags,
        raw_bytes,
        size,
        _crc,
    ) = fields
    if stored_key != key:
        raise CorruptEntry("entry belongs to another key")
    if type(body) is not bytes or len(body) != body_len:
        raise CorruptEntry("body length mismatch")
    # A final status only (RFC 9111 §3: nothing else is stored): a 1xx served as the answer
    # would be taken for an interim response, and the next response for this one.
    if type(status) is not int or not 200 <= status <= 599:
        raise CorruptEntry("bad status")
    if not (
        type(stored_at)
        is type(fresh_until)
        is type(stale_until)
        is type(swr_until)
        is type(expires_at)
        is float
        and math.isfinite(stored_at + fresh_until + stale_until + swr_until + expires_at)
    ):
        raise CorruptEntry("bad timestamps")
    if not (isinstance(etag, _OPTIONAL_STR) and isinstance(last_modified, _OPTIONAL_STR)):
        raise CorruptEntry("bad validators")
    # Header names and values, Vary's, tags: tuples of str (an even count for pairs): checked
    # all at once (str.join refuses anything else).
    if not (
        type(headers) is type(vary) is type(tags) is tuple
        and _all_str(headers + vary + tags)
        and not len(headers) % 2
        and not len(vary) % 2
    ):
        raise CorruptEntry("bad header list")
    if not _FRAMING.isdisjoint(map(str.lower, headers[::2])):
        # Never stored (tierproxy.policy), and the full path serves these fields as they are:
        # a forged one could frame a response its own way.
        raise CorruptEntry("a framing field among the stored ones")
    if type(variants) is not tuple or (variants and not all(map(_is_variant, variants))):
        raise CorruptEntry("bad variant index")
    if head is not None and not (type(head) is bytes and _head_ok(status, head)):
        raise CorruptEntry("bad head")
    if type(upstream) is not bytes or (upstream and not _members_ok(head, upstream)):
        raise CorruptEntry("bad upstream Cache-Status")
    if type(flags) is not int or not 0 <= flags <= 7 or type(raw_bytes) is not bool:
        raise CorruptEntry("bad head flags")
    if not raw_bytes and not _utf8(headers, upstream):
        # The full path hands such an entry's fields to aiohttp's serialiser, which refuses
        # bytes that are not UTF-8: raw_bytes says the entry holds some (it is written as is).
        raise CorruptEntry("raw bytes not flagged")
    if type(size) is not int or not _min_size(data, headers, vary, tags, variants) <= size <= (
        _max_size(data)
    ):
        # What L1 charges for the entry: never less than what holding it costs at the least
        # (a forged small size would let L1 hold far more than its bound), never absurdly more.
        raise CorruptEntry("bad size")
    return restore(
        key,
        status,
        _pairs(headers),
        body,
        stored_at,
        fresh_until,
        stale_until,
        swr_until,
        expires_at,
        etag,
        last_modified,
        ((vary[0], vary[1]),) if len(vary) == 2 else _pairs(vary),
        tags,
        tuple(
            Variant(vid, _pairs(values), language, encoding, expires)
            for vid, values, language, encoding, expires in variants
        )
        if variants
        else (),
        head,
        upstream,
        flags,
        raw_bytes,
        size,
    )


def _all_str(items: tuple[Any, ...]) -> bool:
    try:
        "".join(items)  # C: refuses any item that is not a str
    except TypeError:
        return False
    return True


def _is_variant(item: Any) -> bool:
    return (
        type(item) is tuple
        and len(item) == 5
        and type(item[0]) is str
        and type(item[1]) is tuple
        and _all_str(item[1])
        and not len(item[1]) % 2
        and type(item[2]) is str
        and type(item[3]) is str
        and type(item[4]) is float
    )
