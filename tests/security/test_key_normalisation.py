"""Issue 4, line 7: key normalisation attacks.

Every request target is either refused with 400 or forwarded exactly as it was keyed, so two
requests with one key can never fetch two different upstream URLs (and a cached answer for
one URL can never have come from another). L2/L3 keys are a fixed-length sha256 digest.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from support.fixture_types import MakeProxy
from support.origin import Origin
from support.proxy import ProxyHandle
from yarl import URL

from tierproxy.keys import BadTarget, normalise_target

from .helpers import raw_exchange, status_of

# Pieces attackers combine: dot segments (plain and escaped), escaped slashes and
# backslashes, mixed-case escapes, escaped unreserved characters, malformed escapes,
# matrix parameters, doubled slashes, fragments, spaces and non-ASCII.
_PIECES = [
    "a",
    "B",
    "x.css",
    ".",
    "..",
    "...",
    "%2e",
    "%2E",
    "%2e%2E",
    "%2f",
    "%2F",
    "%5c",
    "\\",
    "%61",
    "%41",
    "%7e",
    "%7E",
    "~",
    "%25",
    "%",
    "%zz",
    "%4",
    ";",
    ";x=1",
    "..;",
    "=",
    "&",
    "@",
    ":",
    "+",
    "%20",
    " ",
    "%C3%A9",
    "\u00e9",
    "*",
    "!",
    "$",
    "'",
    "(",
    ")",
    ",",
    "%00",
]
_QUERY_PIECES = [
    "a=1",
    "b=%2F",
    "b=%2f",
    "c=%7e",
    "c=~",
    "d=a+b",
    "d=a%20b",
    "e",
    "",
    "%zz",
    "f=/x/../y",
    "g=?",
    "h=%3D",
    "#frag",
    "i=\u00e9",
]

segments = st.lists(st.sampled_from(_PIECES), min_size=0, max_size=4).map("".join)
paths = st.lists(segments, min_size=1, max_size=6).map(lambda parts: "/" + "/".join(parts))
queries = st.one_of(
    st.just(""),
    st.lists(st.sampled_from(_QUERY_PIECES), min_size=0, max_size=4).map(
        lambda parts: "?" + "&".join(parts)
    ),
)
targets = st.builds(lambda path, query: path + query, paths, queries)

ORIGIN = "http://127.0.0.1:9000"


def _get(target: str) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


def forwarded_url(material: str) -> URL:
    """The URL the origin client builds for key material (tierproxy.origin.OriginClient)."""
    return URL(ORIGIN + material, encoded=True)


def _variant(target: str, rnd: random.Random) -> str:
    """Another spelling of ``target`` that must get the same key: hex case of escapes flipped,
    some unreserved characters escaped, a "./" segment added."""
    out: list[str] = []
    i = 0
    while i < len(target):
        char = target[i]
        if char == "%" and len(target[i + 1 : i + 3]) == 2:
            digits = target[i + 1 : i + 3]
            out.append("%" + (digits.swapcase() if rnd.random() < 0.5 else digits))
            i += 3
            continue
        if char.isalnum() and char.isascii() and rnd.random() < 0.3:
            out.append(f"%{ord(char):02X}")
        else:
            out.append(char)
        i += 1
    spelled = "".join(out)
    path, question, query = spelled.partition("?")
    if "#" not in path:
        path = "/." + path if rnd.random() < 0.5 else path
    return path + question + query


@settings(max_examples=250, deadline=None)
@given(targets)
def test_key_material_is_a_fixed_point_and_is_exactly_the_forwarded_target(target: str) -> None:
    try:
        material = normalise_target(target)
    except BadTarget:
        return
    assert material.startswith("/")
    assert "#" not in material and " " not in material and "\\" not in material
    assert material.isascii()
    assert normalise_target(material) == material  # the origin, re-normalising, sees the same
    url = forwarded_url(material)
    assert (url.scheme, url.host, url.port) == ("http", "127.0.0.1", 9000)
    assert url.raw_path_qs == material
    assert str(url) == ORIGIN + material


@settings(max_examples=200, deadline=None)
@given(targets, st.randoms(use_true_random=False))
def test_equivalent_spellings_get_one_key_and_one_forwarded_url(
    target: str, rnd: random.Random
) -> None:
    variant = _variant(target, rnd)
    try:
        material = normalise_target(target)
    except BadTarget:
        return
    try:
        variant_material = normalise_target(variant)
    except BadTarget:
        return  # (a variant can turn "%" + one hex digit into a malformed escape)
    if "%" in target:
        return  # flipping case inside a malformed escape may make it a different escape
    assert variant_material == material, (target, variant)
    assert forwarded_url(variant_material) == forwarded_url(material)


_shared: dict[str, Any] = {}


async def _proxy_for(origin: Origin, make_proxy: MakeProxy) -> ProxyHandle:
    """One proxy for all examples of a hypothesis run (fixtures are set up once per test)."""
    handle: ProxyHandle | None = _shared.get("proxy")
    if handle is None or handle.closed or _shared.get("origin") is not origin:
        handle = await make_proxy(SQLITE_PATH="off")
        _shared.update(proxy=handle, origin=origin)
    return handle


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(target=targets)
async def test_through_the_proxy_a_target_is_refused_or_forwarded_exactly_as_keyed(
    target: str, origin: Origin, make_proxy: MakeProxy
) -> None:
    """End to end, raw bytes: 400, or the origin sees exactly the key material.

    One proxy serves every example (hypothesis reuses the fixtures), so a key met before is
    a cache hit - then the origin must have seen exactly that material the first time.
    """
    assume(" " not in target)  # a space ends the request-target on the wire
    proxy = await _proxy_for(origin, make_proxy)
    before = origin.count()
    try:
        expected = normalise_target(target)
    except BadTarget:
        expected = None

    response = await raw_exchange(
        proxy.port,
        b"GET " + target.encode("utf-8") + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )

    status = status_of(response)
    if status == 400:
        assert origin.count() == before  # refused before anything was forwarded
        return
    assert expected is not None, (target, response[:300])
    assert status == 200, response[:300]
    if origin.count() > before:
        assert origin.requests[-1].path_qs == expected, (target, expected)
    else:
        assert b"X-Cache: HIT-L1" in response
        assert expected in {r.path_qs for r in origin.requests}


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("/static/%2e%2e/admin", "/admin"),
        ("/static/%2E%2e/admin", "/static/../admin"),
        ("/a/./b/../c", "/a/c"),
        ("/%61dmin", "/admin"),
        ("/~user", "/%7euser"),
        ("/a%2fb", "/a%2Fb"),
        ("/q?x=%2f", "/q?x=%2F"),
        ("/a?", "/a"),
        ("http://evil.example/a?b=1", "/a?b=1"),
    ],
)
async def test_equivalent_targets_share_one_entry_and_one_forwarded_url(
    first: str, second: str, origin: Origin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy()

    one = await raw_exchange(proxy.port, _get(first))
    two = await raw_exchange(proxy.port, _get(second))

    assert status_of(one) == 200 and status_of(two) == 200
    assert b"X-Cache: HIT-L1" in two, two[:400]
    assert [r.path_qs for r in origin.requests] == [normalise_target(second)]


@pytest.mark.parametrize(
    "target",
    [
        "//a//b",
        "/a%2F..%2F..%2Fetc%2Fpasswd",
        "/..;/admin",
        "/a/..%2fadmin",
        "/%2e%2e%5c%2e%2e%5cwindows",
        "/q?a=1&a=2&A=3",
        "/q?" + "k=v&" * 1700,  # a very long query string (under the 8192-byte target limit)
    ],
)
async def test_odd_targets_are_forwarded_exactly_as_keyed(
    target: str, origin: Origin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy()

    response = await raw_exchange(
        proxy.port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )

    assert status_of(response) == 200, response[:300]
    [seen] = origin.requests
    assert seen.path_qs == normalise_target(target)
    assert ".." not in seen.path_qs.split("?")[0].split("/")  # no dot segment survives


@pytest.mark.parametrize("target", ["/a%zz", "/a%", "/a%4", "/q?x=%g1", "/a#frag", "*"])
async def test_unkeyable_targets_are_refused_with_400(
    target: str, origin: Origin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy()

    response = await raw_exchange(
        proxy.port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )

    assert status_of(response) == 400, response[:300]
    assert origin.count() == 0


async def test_shared_tier_keys_are_a_fixed_length_sha256_of_namespace_and_key_material(
    origin: Origin, make_proxy: MakeProxy, redis_client: Any, sqlite_path: Path
) -> None:
    from support.storage import sqlite_keys

    proxy = await make_proxy()
    short, long = "/s", "/long?" + "x" * 7000
    await proxy.get(short)
    await proxy.get(long)
    await proxy.settle()

    # The namespace: the origin's identity and the entry format version (tierproxy.keys).
    from tierproxy.codec import FORMAT_VERSION

    namespace = f"http://127.0.0.1:{origin.port} v{FORMAT_VERSION}"
    expected = {hashlib.sha256(f"{namespace}\n{m}".encode()).hexdigest() for m in (short, long)}
    redis_keys = {k.decode() for k in redis_client.scan_iter(match="tierproxy:*")}
    entry_keys = {k for k in redis_keys if len(k) == len("tierproxy:") + 64}
    assert {k.removeprefix("tierproxy:") for k in entry_keys} == expected
    assert set(sqlite_keys(sqlite_path)) == expected
    assert all(len(k) <= 200 for k in redis_keys)  # no client-sized key anywhere in Redis
