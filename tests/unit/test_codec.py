"""Entry packing: round trips, and every kind of bad bytes is CorruptEntry, never a crash."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierproxy import codec
from tierproxy.entry import Entry


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
    headers=st.lists(st.tuples(st.text(max_size=20), st.text(max_size=40)), max_size=5),
)
def test_round_trip_any_body_and_headers(
    body: bytes, key: str, headers: list[tuple[str, str]]
) -> None:
    entry = make_entry(body=body, key=key, headers=tuple(headers))
    assert codec.decode(codec.encode(entry), key) == entry


@given(
    headers=st.lists(
        st.tuples(st.binary(min_size=1, max_size=20), st.binary(max_size=40)), max_size=5
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
    fields = msgpack.unpackb(codec.encode(make_entry()))
    fields[0] = codec.FORMAT_VERSION + 1
    with pytest.raises(codec.CorruptEntry, match="version"):
        codec.decode(msgpack.packb(fields), "/a?b=1")


@given(st.binary(max_size=300))
def test_garbage_never_raises_anything_but_corrupt_entry(data: bytes) -> None:
    with pytest.raises(codec.CorruptEntry):
        codec.decode(data, "/a?b=1")
