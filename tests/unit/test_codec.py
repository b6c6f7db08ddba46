"""Entry packing: round trips, and every kind of bad bytes is CorruptEntry, never a crash."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import records
from support.records import damaged, forged

from tierproxy import codec
from tierproxy.entry import Entry, Variant, restore


def make_entry(**kw: Any) -> Entry:
    base: dict[str, Any] = {
        "key": "/a?b=1",
        "status": 200,
        "headers": (("Content-Type", "text/plain"), ("X-A", "1")),
        "body": b"hello",
        "stored_at": 1.0,
        "fresh_until": 2.0,
        "stale_until": 3.0,
        "swr_until": 2.0,
        "expires_at": 4.0,
        "etag": '"e"',
        "last_modified": None,
        "vary": (("accept", "x"),),
        "tags": ("t1", "t2"),
    }
    base.update(kw)
    return Entry(**base)


def test_round_trip() -> None:
    entry = make_entry()
    assert codec.decode(codec.encode(entry), entry.key) == entry


@given(
    body=st.binary(max_size=2048),
    key=st.text(min_size=1, max_size=50),
    headers=st.lists(
        # (a framing field is never stored: test_an_entry_with_a_framing_field_is_unencodable)
        st.tuples(st.text(max_size=20), st.text(max_size=40)).filter(
            lambda field: field[0].lower() not in codec._FRAMING
        ),
        max_size=5,
    ),
)
def test_round_trip_any_body_and_headers(
    body: bytes, key: str, headers: list[tuple[str, str]]
) -> None:
    entry = make_entry(body=body, key=key, headers=tuple(headers))
    assert codec.decode(codec.encode(entry), key) == entry


@given(
    headers=st.lists(
        st.tuples(
            # Any bytes but a framing field's name (Content-Length, the hop-by-hop ones):
            # never stored - the origin path drops them, and encode refuses an entry with one.
            st.binary(min_size=1, max_size=20).filter(
                lambda name: name.decode("utf-8", "surrogateescape").lower() not in codec._FRAMING
            ),
            st.binary(max_size=40),
        ),
        max_size=5,
    ),
    vary=st.binary(max_size=20),
    etag=st.binary(max_size=20),
    tag=st.binary(max_size=10),
)
def test_header_bytes_round_trip_exactly(
    headers: list[tuple[bytes, bytes]], vary: bytes, etag: bytes, tag: bytes
) -> None:
    # aiohttp hands header bytes over as UTF-8 decoded with surrogateescape: any byte at all
    # (latin-1 obs-text, RFC 9110 §5.5) must come back as the same bytes.
    def text(data: bytes) -> str:
        return data.decode("utf-8", "surrogateescape")

    entry = make_entry(
        headers=tuple((text(n), text(v)) for n, v in headers),
        vary=(("x-lang", text(vary)),),
        etag=text(etag),
        tags=(text(tag),),
    )
    decoded = codec.decode(codec.encode(entry), entry.key)
    assert decoded == entry
    assert [
        (n.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
        for n, v in decoded.headers
    ] == headers


def test_latin1_header_value_is_stored_as_its_bytes() -> None:
    entry = make_entry(headers=(("X-Name", b"caf\xe9".decode("utf-8", "surrogateescape")),))
    fields = msgpack.unpackb(codec.encode(entry), raw=True)  # the stored bytes, as they are
    assert fields[3] == [b"X-Name", b"caf\xe9"]
    assert codec.decode(codec.encode(entry), entry.key).headers == entry.headers


def test_an_entry_msgpack_cannot_hold_is_unencodable_not_any_other_error() -> None:
    with pytest.raises(codec.Unencodable):
        codec.encode(make_entry(headers=(("X-Bad", "\ud800"),)))  # no byte decodes to this


def test_entry_stored_under_another_key_is_corrupt() -> None:
    with pytest.raises(codec.CorruptEntry, match="another key"):
        codec.decode(codec.encode(make_entry(key="/a")), "/b")


@pytest.mark.parametrize("cut", [1, 5, 20, -1])
def test_truncated_bytes_are_corrupt(cut: int) -> None:
    data = codec.encode(make_entry())
    with pytest.raises(codec.CorruptEntry):
        codec.decode(data[:cut], "/a?b=1")


def test_body_changed_in_place_is_corrupt() -> None:
    data = codec.encode(make_entry(body=b"hello world"))
    tampered = data.replace(b"hello world", b"HELLO world")
    with pytest.raises(codec.CorruptEntry, match="checksum"):
        codec.decode(tampered, "/a?b=1")


def test_other_format_version_is_corrupt() -> None:
    fields = records.fields(codec.encode(make_entry()))
    fields[0] = codec.FORMAT_VERSION + 1
    with pytest.raises(codec.CorruptEntry, match="version"):
        codec.decode(forged(fields), "/a?b=1")
    fields[0] = 3
    with pytest.raises(codec.CorruptEntry, match="version"):
        codec.decode(forged(fields), "/a?b=1")


@given(st.binary(max_size=300))
def test_garbage_never_raises_anything_but_corrupt_entry(data: bytes) -> None:
    with pytest.raises(codec.CorruptEntry):
        codec.decode(data, "/a?b=1")


# ---- wire-ready records: the derived fields are stored, and checked ------------------------


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


_DERIVED = ("wire_head", "upstream_cache_status", "head_flags", "raw_bytes", "size")

_ENTRIES = {
    "ascii": make_entry(),
    "common-fields": make_entry(
        headers=(
            ("Content-Type", "text/html"),
            ("Date", "Thu, 03 Dec 2026 15:00:00 GMT"),
            ("Server", "origin"),
            ("Cache-Control", "max-age=60,\tpublic"),
        ),
        last_modified="Wed, 02 Dec 2026 10:00:00 GMT",
    ),
    "no-headers-empty-body": make_entry(headers=(), body=b"", etag=None, vary=(), tags=()),
    "status-without-reason": make_entry(status=599),
    "not-found": make_entry(status=404, headers=(("Server", "o"),)),
    "obs-text": make_entry(
        headers=(("X-Name", _text(b"caf\xe9")), ("Content-Type", "text/plain")),
        etag=_text(b'"\xff"'),
        vary=(("accept-language", _text(b"fr\xe9")),),
        tags=(_text(b"t\xe9"),),
    ),
    "utf-8-value": make_entry(headers=(("X-Name", "café"),)),
    "own-fields": make_entry(
        headers=(
            ("Content-Type", "text/plain"),
            ("X-Cache", "HIT"),
            ("X-Request-ID", "abc"),
            ("Cache-Status", "upstream; hit"),
        )
    ),
    "upstream-cache-status": make_entry(
        headers=(("Cache-Status", "a; hit, b; fwd=miss"), ("cache-status", "c")),
    ),
    "empty-cache-status": make_entry(headers=(("Cache-Status", " "),)),
    "unsafe-control": make_entry(headers=(("X-Bad", "a\x01b"),)),
    "unsafe-crlf": make_entry(headers=(("X-Bad", "a\r\nX-Evil: 1"),)),
    "unsafe-own": make_entry(headers=(("X-Cache", "a\nb"), ("X-A", "1"))),
    "variant-index": make_entry(
        headers=(),
        body=b"",
        variants=(
            Variant("a" * 32, (("accept-language", "de"),), "de", "", 9.0),
            Variant("b" * 32, (("accept-language", _text(b"\xe9")),), "", "gzip", 10.0),
        ),
    ),
    "large-body": make_entry(body=bytes(range(256)) * 512),
}


@pytest.mark.parametrize("entry", _ENTRIES.values(), ids=_ENTRIES.keys())
def test_decode_restores_every_field_as_post_init_builds_it(entry: Entry) -> None:
    decoded = codec.decode(codec.encode(entry), entry.key)
    # Built the ordinary way from the decoded fields: what __post_init__ makes of them.
    rebuilt = dataclasses.replace(decoded)
    for entry_field in dataclasses.fields(Entry):
        name = entry_field.name
        assert getattr(decoded, name) == getattr(entry, name), name
        assert getattr(decoded, name) == getattr(rebuilt, name), name
        assert type(getattr(decoded, name)) is type(getattr(entry, name)), name
    assert decoded == entry


def test_the_entries_cover_each_kind_of_head() -> None:
    heads = [e.wire_head for e in _ENTRIES.values()]
    assert None in heads and any(h is not None for h in heads)
    assert any(e.raw_bytes for e in _ENTRIES.values())
    assert any(e.upstream_cache_status for e in _ENTRIES.values())
    assert {e.head_flags for e in _ENTRIES.values()} >= {0, 1, 7}


@given(
    status=st.integers(200, 599),
    headers=st.lists(
        st.tuples(
            st.sampled_from(
                ["Content-Type", "Date", "Server", "X-A", "cache-status", "X-Cache", "ETag"]
            ),
            # (aiohttp's parser never gives a value with CR or LF)
            st.binary(max_size=30).filter(lambda v: b"\r" not in v and b"\n" not in v).map(_text),
        ),
        max_size=8,
    ),
    body=st.binary(max_size=100),
)
def test_any_entry_decodes_with_the_derived_fields_it_was_stored_with(
    status: int, headers: list[tuple[str, str]], body: bytes
) -> None:
    entry = make_entry(status=status, headers=tuple(headers), body=body)
    decoded = codec.decode(codec.encode(entry), entry.key)
    assert decoded == entry
    for name in _DERIVED[1:]:
        assert getattr(decoded, name) == getattr(entry, name), name
    # The head is the one __post_init__ built, or None where it holds a field tierproxy
    # never writes from a stored head (see the next test).
    assert decoded.wire_head in (entry.wire_head, None)


@pytest.mark.parametrize(
    "headers",
    [
        (("Age", "3"),),
        (("Set-Cookie", "a=b"),),
        (("Bad Name", "x"),),
        (("", "x"),),
        (("X-A:", "x"),),
        ((_text(b"caf\xe9"), "x"),),
    ],
)
def test_a_head_decode_would_refuse_is_stored_as_none(headers: tuple[tuple[str, str]]) -> None:
    # Only a hand-built entry holds one (the policy never stores these fields, and aiohttp's
    # parser gives tokens for names): it is stored without its head, which the full path
    # serves, rather than as a record every lookup would find corrupt.
    entry = make_entry(headers=headers)
    assert entry.wire_head is not None
    decoded = codec.decode(codec.encode(entry), entry.key)
    assert decoded == entry and decoded.wire_head is None


def test_an_interim_status_is_unencodable() -> None:
    with pytest.raises(codec.Unencodable):
        codec.encode(make_entry(status=101))


@pytest.mark.parametrize(
    "headers",
    [
        (("Content-Length", "5"),),
        (("content-length", "5"),),
        (("Transfer-Encoding", "chunked"),),
        (("Connection", "close"),),
        (("Proxy-Connection", "close"),),
    ],
)
def test_an_entry_with_a_framing_field_is_unencodable(headers: tuple[tuple[str, str]]) -> None:
    # The policy never stores these; decode refuses a record holding one (the full path
    # would serve it as it is), so such an entry is never written at all.
    with pytest.raises(codec.Unencodable):
        codec.encode(make_entry(headers=headers))


def test_an_entry_whose_derived_fields_decode_would_refuse_is_unencodable() -> None:
    entry = make_entry()
    object.__setattr__(entry, "size", 10**12)
    with pytest.raises(codec.Unencodable):
        codec.encode(entry)
    entry = make_entry()
    object.__setattr__(entry, "upstream_cache_status", b"a\nb, ")
    with pytest.raises(codec.Unencodable):
        codec.encode(entry)


_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-A: 1\r\n"


def _with(position: int, value: Any) -> Callable[[list[Any]], None]:
    def change(fields: list[Any]) -> None:
        fields[position] = value

    return change


# A forger can compute the CRC: each of these has a valid one, and must still be refused.
FORGERIES: dict[str, Callable[[list[Any]], None]] = {
    "head-smuggles-a-response": _with(
        records.WIRE_HEAD,
        _HEAD + b"Content-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nX-Evil: 1\r\n",
    ),
    "head-content-length": _with(records.WIRE_HEAD, _HEAD + b"Content-Length: 0\r\n"),
    "head-content-length-upper": _with(records.WIRE_HEAD, _HEAD + b"CONTENT-LENGTH: 0\r\n"),
    "head-transfer-encoding": _with(records.WIRE_HEAD, _HEAD + b"Transfer-Encoding: chunked\r\n"),
    "head-connection": _with(records.WIRE_HEAD, _HEAD + b"Connection: close\r\n"),
    "head-x-cache": _with(records.WIRE_HEAD, _HEAD + b"X-Cache: HIT\r\n"),
    "head-x-request-id": _with(records.WIRE_HEAD, _HEAD + b"x-request-id: 1\r\n"),
    "head-cache-status": _with(records.WIRE_HEAD, _HEAD + b"Cache-Status: x\r\n"),
    "head-age": _with(records.WIRE_HEAD, _HEAD + b"Age: 1\r\n"),
    "head-proxy-field": _with(records.WIRE_HEAD, _HEAD + b"Proxy-Foo: 1\r\n"),
    "head-bare-lf": _with(records.WIRE_HEAD, _HEAD + b"X-B: 1\nX-C: 2\r\n"),
    "head-bare-cr": _with(records.WIRE_HEAD, _HEAD + b"X-B: 1\rX-C: 2\r\n"),
    "head-empty-line": _with(records.WIRE_HEAD, _HEAD + b"\r\n"),
    "head-unterminated": _with(records.WIRE_HEAD, _HEAD + b"X-B: 1"),
    "head-obs-fold": _with(records.WIRE_HEAD, _HEAD + b" folded\r\n"),
    "head-space-before-colon": _with(records.WIRE_HEAD, _HEAD + b"Content-Length : 0\r\n"),
    "head-no-colon": _with(records.WIRE_HEAD, _HEAD + b"X-B\r\n"),
    "head-control-in-value": _with(records.WIRE_HEAD, _HEAD + b"X-B: a\x00b\r\n"),
    "head-other-status": _with(records.WIRE_HEAD, b"HTTP/1.1 404 Not Found\r\n"),
    # The head itself was checked already (encoding the entry did), the status is another's.
    "status-not-the-heads": _with(records.STATUS, 404),
    "head-other-reason": _with(records.WIRE_HEAD, b"HTTP/1.1 200 Fine\r\n"),
    "head-other-version": _with(records.WIRE_HEAD, b"HTTP/1.0 200 OK\r\n"),
    "head-a-str": _with(records.WIRE_HEAD, _HEAD.decode()),
    "upstream-crlf": _with(records.UPSTREAM_CACHE_STATUS, b"a\r\nX-Evil: 1, "),
    "upstream-crlf-without-head": lambda fields: fields.__setitem__(
        slice(records.WIRE_HEAD, records.UPSTREAM_CACHE_STATUS + 1), [None, b"a\r\nX-Evil: 1, "]
    ),
    "upstream-unterminated": _with(records.UPSTREAM_CACHE_STATUS, b"a"),
    "upstream-none": _with(records.UPSTREAM_CACHE_STATUS, None),
    "head-flags-too-big": _with(records.HEAD_FLAGS, 8),
    "head-flags-negative": _with(records.HEAD_FLAGS, -1),
    "head-flags-a-bool": _with(records.HEAD_FLAGS, True),
    "raw-bytes-an-int": _with(records.RAW_BYTES, 1),
    "size-zero": _with(records.SIZE, 0),
    "size-absurd": _with(records.SIZE, 2**40),
    "size-a-float": _with(records.SIZE, 1000.0),
    "body-length": _with(records.BODY_LENGTH, 4),
    "body-a-str": _with(records.BODY, "hello"),
    "status-out-of-range": _with(records.STATUS, 600),
    # An interim status served as the answer: the client takes the next response for it.
    "status-interim": lambda fields: (
        fields.__setitem__(slice(records.STATUS, records.STATUS + 1), [103])
        or fields.__setitem__(records.WIRE_HEAD, None)
    ),
    "time-nan": _with(records.FRESH_UNTIL, float("nan")),
    "time-infinite": _with(records.STORED_AT, float("inf")),
    # Bytes that are not UTF-8, not flagged raw: the full path's serialiser would refuse them.
    "upstream-not-utf8-unflagged": _with(records.UPSTREAM_CACHE_STATUS, b"x\xff, "),
    "headers-not-utf8-unflagged": _with(
        records.HEADERS, ["Content-Type", "text/plain", "X-A", "caf\udce9"]
    ),
    # A size below what the entry takes to hold: L1 would keep far more than its bound.
    "size-below-the-record": _with(records.SIZE, 10),
    "status-a-str": _with(records.STATUS, "200"),
    "time-a-str": _with(records.FRESH_UNTIL, "soon"),
    "time-an-int": _with(records.STORED_AT, 1),
    "etag-an-int": _with(records.ETAG, 1),
    # The stored fields themselves, which the full path serves (HEAD, ranges, 304s): none
    # that frames a response, whatever the head says.
    "headers-transfer-encoding": _with(
        records.HEADERS, ["Content-Type", "text/plain", "Transfer-Encoding", "chunked"]
    ),
    "headers-content-length": _with(records.HEADERS, ["content-length", "0"]),
    "headers-connection": _with(records.HEADERS, ["Connection", "close"]),
    "headers-odd": _with(records.HEADERS, ["X-A"]),
    "headers-not-str": _with(records.HEADERS, ["X-A", 1]),
    "headers-a-map": _with(records.HEADERS, {"X-A": "1"}),
    "vary-odd": _with(records.VARY, ["accept"]),
    "tags-not-str": _with(records.TAGS, [b"t"]),
    "variants-malformed": _with(records.VARIANTS, [["a", ["odd"], "", "", 1.0]]),
    "variants-an-int-expiry": _with(records.VARIANTS, [["a", [], "", "", 1]]),
    "too-few-fields": lambda fields: fields.pop(records.SIZE),
    "key-another": _with(records.KEY, "/other"),
}


@pytest.mark.parametrize("forge", FORGERIES.values(), ids=FORGERIES.keys())
def test_a_forged_record_is_corrupt(forge: Callable[[list[Any]], None]) -> None:
    entry = make_entry(headers=(("Content-Type", "text/plain"), ("X-A", "1")))
    assert entry.wire_head == _HEAD
    fields = records.fields(codec.encode(entry))
    forge(fields)
    with pytest.raises(codec.CorruptEntry):
        codec.decode(forged(fields), entry.key)
    with pytest.raises(codec.CorruptEntry, match="checksum"):  # and damage, without a new CRC
        codec.decode(damaged(fields), entry.key)


def test_a_forged_record_of_valid_fields_is_accepted() -> None:
    # The checks are against damage, misrouting and heads tierproxy would not write, not
    # against forgery (L2/L3 are the operator's stores: README's security model).
    entry = make_entry(headers=(("Content-Type", "text/plain"), ("X-A", "1")))
    fields = records.fields(codec.encode(entry))
    fields[records.WIRE_HEAD] = _HEAD + b"X-B: \t\xe9\r\n"
    assert codec.decode(forged(fields), entry.key).wire_head == _HEAD + b"X-B: \t\xe9\r\n"


def test_heads_checked_lately_are_remembered_within_their_bound() -> None:
    """A hot entry's head is checked once, not at every decode; the memory of checked heads
    holds only heads that passed, and stays within its count and bytes."""
    heads: set[bytes] = codec._HEADS_OK
    entry = make_entry(headers=(("Content-Type", "text/plain"), ("X-A", "1")))
    data = codec.encode(entry)
    assert codec.decode(data, entry.key).wire_head in heads
    fields = records.fields(data)
    fields[records.WIRE_HEAD] = _HEAD + b"Content-Length: 0\r\n"
    with pytest.raises(codec.CorruptEntry):
        codec.decode(forged(fields), entry.key)
    assert _HEAD + b"Content-Length: 0\r\n" not in heads
    remembered = set(heads)
    big = make_entry(headers=(("X-Big", "b" * (codec._HEADS_OK_MAX_BYTES // 32)),))
    assert codec.decode(codec.encode(big), big.key) == big
    assert heads == remembered  # a head that big is checked every time, crowding none out
    for i in range(3 * codec._HEADS_OK_MAX):
        many = make_entry(headers=(("X-N", str(i)), ("X-Pad", "p" * 500)))
        assert codec.decode(codec.encode(many), many.key) == many
        assert len(heads) <= codec._HEADS_OK_MAX
        assert sum(map(len, heads)) <= codec._HEADS_OK_MAX_BYTES


def _empty_decode_memo() -> None:
    codec._DECODED.clear()
    codec._SEEN_ONCE.clear()
    codec._decoded_bytes = codec._decoded_refused = 0


def test_a_record_decoded_lately_is_not_decoded_again_and_stays_exact() -> None:
    """A hot L2/L3 entry's record comes back byte for byte at every hit: decoding it again
    (CRC, msgpack, every check) would build the same frozen Entry, so the Entry decoded
    lately for those exact bytes is served. Only exactly those bytes, for that key: other
    bytes are decoded (and refused) as ever, and the memory stays within its bounds."""
    _empty_decode_memo()  # (the memo is the process's: other tests fill it)
    entry = make_entry(headers=(("Content-Type", "text/plain"), ("X-A", "1")))
    data = codec.encode(entry)
    # Remembered the second time it is decoded (a record decoded once, its entry then in
    # L1, is not kept), taken from then on.
    assert codec.decode(data, entry.key) == entry
    first = codec.decode(data, entry.key)
    assert first == entry
    assert codec.decode(data, entry.key) is first
    assert codec.decode(bytes(bytearray(data)), entry.key) is first  # equal bytes, new object
    with pytest.raises(codec.CorruptEntry, match="another key"):
        codec.decode(data, "/another")
    damaged_data = data.replace(b"hello", b"jello")
    with pytest.raises(codec.CorruptEntry, match="checksum"):
        codec.decode(damaged_data, entry.key)
    fields = records.fields(data)
    fields[records.STATUS] = 404  # a valid CRC, a head for another status: still refused
    with pytest.raises(codec.CorruptEntry):
        codec.decode(forged(fields), entry.key)
    assert codec.decode(data, entry.key) is first

    # A new copy under the same key (another body, so another CRC) is decoded, not taken
    # for the old one; so is one with the same CRC but other bytes (forged: a CRC is no
    # proof, the bytes are compared).
    newer = dataclasses.replace(entry, body=b"hello, again")
    assert codec.decode(codec.encode(newer), entry.key) == newer
    fields[records.STATUS] = 200
    fields[records.BODY] = b"jello"
    fields[records.SIZE] = entry.size
    same_crc = bytearray(forged(fields))
    same_crc[-4:] = data[-4:]  # (then its CRC no longer matches: checksum mismatch)
    with pytest.raises(codec.CorruptEntry, match="checksum"):
        codec.decode(bytes(same_crc), entry.key)

    big = make_entry(body=b"b" * (codec._DECODED_MAX_RECORD + 1))
    big_data = codec.encode(big)
    assert codec.decode(big_data, big.key) == big
    assert codec.decode(big_data, big.key) is not codec.decode(big_data, big.key)
    remembered = codec._DECODED
    assert all(record != big_data for record, _ in remembered.values())
    # What an entry holds beyond its record (a str and a tuple per header, ...) is counted:
    # its size, as L1 charges it.
    wide = make_entry(key="/wide", headers=tuple((f"X-H{i}", "v") for i in range(100)))
    wide_data = codec.encode(wide)
    codec.decode(wide_data, wide.key)
    assert codec.decode(wide_data, wide.key) is codec.decode(wide_data, wide.key)
    assert wide.size > 10 * len(wide_data)
    _empty_decode_memo()

    def counted() -> int:
        return sum(len(record) + decoded.size for record, decoded in remembered.values())

    assert counted() == 0
    codec.decode(wide_data, wide.key)
    codec.decode(wide_data, wide.key)
    assert codec._decoded_bytes == counted() == len(wide_data) + wide.size
    for i in range(2 * codec._DECODED_MAX):
        many = make_entry(key=f"/n{i}", body=b"x" * (i % 7 * 1000))
        many_data = codec.encode(many)
        assert codec.decode(many_data, many.key) == codec.decode(many_data, many.key) == many
        assert len(remembered) <= codec._DECODED_MAX
        assert codec._decoded_bytes == counted() <= codec._DECODED_MAX_BYTES
    # Full: a newcomer is refused, nothing evicted for it (load cycling over more keys than
    # fit would otherwise replace every record before it came back) - until so many were
    # refused that it is emptied, and newcomers get in again.
    assert (wide.key, wide_data[-4:]) in remembered
    refused = codec._decoded_refused
    assert refused > 0
    late = make_entry(key="/late")
    late_data = codec.encode(late)
    codec.decode(late_data, late.key)
    codec.decode(late_data, late.key)
    assert (late.key, late_data[-4:]) not in remembered
    assert codec._decoded_refused == refused + 1
    codec._decoded_refused = codec._DECODED_REFUSALS - 1
    codec.decode(late_data, late.key)
    assert list(remembered) == [(late.key, late_data[-4:])]
    assert codec._decoded_bytes == counted() and codec._decoded_refused == 0
    assert len(codec._SEEN_ONCE) <= codec._SEEN_ONCE_MAX
    once = make_entry(key="/once")
    codec.decode(codec.encode(once), once.key)
    assert all(key != "/once" for key, _ in remembered)


_MSGPACK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=12,
)


@given(position=st.integers(0, records.CRC - 1), value=_MSGPACK)
def test_any_forged_field_is_corrupt_or_a_safe_entry(position: int, value: Any) -> None:
    entry = make_entry()
    fields = records.fields(codec.encode(entry))
    fields[position] = value
    try:
        decoded = codec.decode(forged(fields), entry.key)
    except codec.CorruptEntry:
        return
    head = decoded.wire_head
    assert head is None or head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert decoded.size >= len(decoded.body) and 0 <= decoded.head_flags <= 7


@given(st.lists(_MSGPACK, max_size=25))
def test_any_forged_list_is_corrupt(items: list[Any]) -> None:
    with pytest.raises(codec.CorruptEntry):
        codec.decode(forged([*items, b""] if len(items) != records.CRC else items), "/a?b=1")


def test_restore_makes_an_ordinary_frozen_entry_without_post_init() -> None:
    entry = _ENTRIES["own-fields"]
    # (hit_memo is the hit path's per-process cache, not part of a record: it starts empty)
    values = {f.name: getattr(entry, f.name) for f in dataclasses.fields(Entry)}
    del values["hit_memo"]
    restored = restore(**values)
    assert type(restored) is Entry and restored == entry and hash(restored) == hash(entry)
    assert {name: getattr(restored, name) for name in values} == values
    assert restored.hit_memo is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        restored.status = 404  # type: ignore[misc]
    # Nothing is built again: the derived fields are the ones given, even made-up ones.
    assert restore(**{**values, "size": 1}).size == 1
