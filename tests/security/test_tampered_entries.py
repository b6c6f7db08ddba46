"""Corrupted and forged cache content.

An L2/L3 record carries its key material, its body length and a CRC-32 of all its bytes. One
that was stored under another key, truncated, or whose bytes (body, headers, status,
lifetimes, stored head) no longer match its CRC is detected, deleted, and treated as a miss:
a cache never serves one URL's bytes for another, nor a damaged body or header. A record with
a valid CRC is still checked: one whose stored head (written as is by the hit path) would
smuggle a second response, a framing field or a field tierproxy writes itself is a miss too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.fixture_types import MakeProxy
from support.origin import Origin
from support.records import BODY, BODY_LENGTH, FRESH_UNTIL, HEADERS, KEY, STATUS, WIRE_HEAD, forged
from support.records import damaged as _pack
from support.records import fields as _fields
from support.storage import redis_key, sqlite_row, sqlite_set_value


def _wrong_key(blob: bytes, other: bytes) -> bytes:
    return other  # another URL's intact entry, stored under this URL's key


def _truncated_body(blob: bytes, other: bytes) -> bytes:
    fields = _fields(blob)
    fields[BODY] = fields[BODY][:-7]
    return _pack(fields)


def _length_mismatch(blob: bytes, other: bytes) -> bytes:
    fields = _fields(blob)
    fields[BODY_LENGTH] += 1
    return _pack(fields)


def _flipped_byte(blob: bytes, other: bytes) -> bytes:
    fields = _fields(blob)
    body = bytearray(fields[BODY])
    body[len(body) // 2] ^= 0x01
    fields[BODY] = bytes(body)
    return _pack(fields)


def _cut_short(blob: bytes, other: bytes) -> bytes:
    return blob[: len(blob) // 2]


def _key_rewritten(blob: bytes, other: bytes) -> bytes:
    """A forgery, not damage: another URL's entry with this URL's key written into it."""
    fields = _fields(other)
    fields[KEY] = _fields(blob)[KEY]
    return forged(fields)


def _flipped_header_byte(blob: bytes, other: bytes) -> bytes:
    """Damage outside the body: a header value that is no longer what the origin sent."""
    fields = _fields(blob)
    name, value = fields[HEADERS][0], fields[HEADERS][1]
    fields[HEADERS][1] = value[:-1] + chr(ord(value[-1]) ^ 0x01)
    assert fields[HEADERS][0] == name
    return _pack(fields)


def _status_changed(blob: bytes, other: bytes) -> bytes:
    fields = _fields(blob)
    fields[STATUS] = 404 if fields[STATUS] != 404 else 200
    return _pack(fields)


def _freshness_extended(blob: bytes, other: bytes) -> bytes:
    fields = _fields(blob)
    fields[FRESH_UNTIL] += 10**6
    return _pack(fields)


TAMPERINGS = [
    _wrong_key,
    _truncated_body,
    _length_mismatch,
    _flipped_byte,
    _cut_short,
    _flipped_header_byte,
    _status_changed,
    _freshness_extended,
]


def _head_added(blob: bytes, extra: bytes) -> bytes:
    """A forgery with a valid CRC: the stored head (the hit path writes it as it is) with
    ``extra`` after its field lines."""
    fields = _fields(blob)
    assert fields[WIRE_HEAD] is not None and fields[WIRE_HEAD].endswith(b"\r\n")
    fields[WIRE_HEAD] += extra
    return forged(fields)


def _head_smuggles_a_second_response(blob: bytes, other: bytes) -> bytes:
    return _head_added(
        blob, b"Content-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!"
    )


def _head_with_content_length(blob: bytes, other: bytes) -> bytes:
    return _head_added(blob, b"Content-Length: 3\r\n")


def _head_with_x_cache(blob: bytes, other: bytes) -> bytes:
    return _head_added(blob, b"X-Cache: HIT-FORGED\r\n")


def _head_with_bare_lf(blob: bytes, other: bytes) -> bytes:
    return _head_added(blob, b"X-Evil: 1\nX-More: 2\r\n")


def _length_mismatch_forged(blob: bytes, other: bytes) -> bytes:
    fields = _fields(blob)
    fields[BODY_LENGTH] += 1
    return forged(fields)


FORGERIES = [
    _head_smuggles_a_second_response,
    _head_with_content_length,
    _head_with_x_cache,
    _head_with_bare_lf,
    _length_mismatch_forged,
]


@pytest.fixture(params=["l2", "l3"])
def tier(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("tamper", TAMPERINGS + FORGERIES, ids=lambda f: f.__name__.strip("_"))
async def test_a_tampered_entry_is_a_miss_never_served(
    tamper: Callable[[bytes, bytes], bytes],
    tier: str,
    origin: Origin,
    make_proxy: MakeProxy,
    redis_client: Any,
    sqlite_path: Path,
) -> None:
    # Only the tier under test holds entries (and L1 is off), so a hit can only come from it.
    env: dict[str, Any] = {"L1_MAX_BYTES": 0}
    if tier == "l2":
        env["SQLITE_PATH"] = "off"
    else:
        env["REDIS_URL"] = "off"
    origin.set(
        "/victim", body=b"victim's own bytes " * 20, headers={"Cache-Control": "max-age=600"}
    )
    origin.set(
        "/other", body=b"someone else's bytes " * 20, headers={"Cache-Control": "max-age=600"}
    )
    proxy = await make_proxy(**env)
    await proxy.get("/victim")
    await proxy.get("/other")
    await proxy.settle()
    assert (await proxy.get("/victim")).x_cache == f"HIT-{tier.upper()}"

    if tier == "l2":
        victim = redis_client.get(redis_key("/victim", origin.url))
        other = redis_client.get(redis_key("/other", origin.url))
        redis_client.set(redis_key("/victim", origin.url), tamper(victim, other), keepttl=True)
    else:
        victim_row = sqlite_row(sqlite_path, "/victim", origin.url)
        other_row = sqlite_row(sqlite_path, "/other", origin.url)
        assert victim_row is not None and other_row is not None
        victim, other = bytes(victim_row["value"]), bytes(other_row["value"])
        assert sqlite_set_value(sqlite_path, "/victim", tamper(victim, other), origin.url) == 1
    fetches_before = origin.count("/victim")

    response = await proxy.get("/victim")
    await proxy.settle()
    again = await proxy.get("/victim")

    assert response.status == 200
    assert response.body == b"victim's own bytes " * 20, response
    assert response.x_cache == "MISS", response  # the bad entry was a miss, the origin answered
    assert origin.count("/victim") == fetches_before + 1
    # The bad bytes are gone: what is stored now is the victim's own, intact entry.
    assert again.x_cache == f"HIT-{tier.upper()}" and again.body == response.body


def test_the_codec_refuses_each_tampering() -> None:
    from tierproxy.codec import CorruptEntry, decode, encode
    from tierproxy.entry import Entry

    def entry(key: str, body: bytes) -> Entry:
        return Entry(
            key=key,
            status=200,
            headers=(("Content-Type", "text/plain"),),
            body=body,
            stored_at=1.0,
            fresh_until=2.0,
            stale_until=3.0,
            swr_until=2.0,
            expires_at=4.0,
        )

    victim, other = encode(entry("/victim", b"v" * 100)), encode(entry("/other", b"o" * 100))
    assert decode(victim, "/victim").body == b"v" * 100
    for tamper in TAMPERINGS + FORGERIES:
        with pytest.raises(CorruptEntry):
            decode(tamper(victim, other), "/victim")
    # A forged entry that names the victim's key is accepted: L2/L3 are the operator's stores,
    # and the checks are against damage and misrouting, not forgery (see the README's
    # security model).
    assert decode(_key_rewritten(victim, other), "/victim").body == b"o" * 100
