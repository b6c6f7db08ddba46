"""Issue 4, lines 1-2: unkeyed-header poisoning, fat GET, parameter cloaking.

Whatever one client sends that is not part of the cache key must not shape what the next
client is served: such headers are not forwarded (unless the operator allows them), a GET with
a body is passed through uncached, and the key is exactly the target that is forwarded.
"""

from __future__ import annotations

import json

import pytest
from support.fixture_types import MakeProxy
from support.origin import Origin

from .helpers import EchoOrigin, raw_exchange, status_of

INJECTED = "evil.example<script>alert(1)</script>"

# Headers an origin framework may act on (host, scheme, URL or method rewriting) that are not
# in the cache key.
UNKEYED = [
    "X-Forwarded-Host",
    "X-Forwarded-Scheme",
    "X-Forwarded-Server",
    "X-Forwarded-Port",
    "X-Forwarded-Prefix",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-HTTP-Method-Override",
    "X-HTTP-Method",
    "X-Method-Override",
    "X-Host",
    "X-Original-Host",
    "Forwarded",
    "X-Forwarded-For",
    "True-Client-IP",
]


def _seen_headers(body: bytes) -> dict[str, str]:
    return {name.lower(): value for name, value in json.loads(body)["headers"]}


@pytest.mark.parametrize("header", UNKEYED)
async def test_an_unkeyed_header_never_shapes_what_the_next_client_gets(
    header: str, echo_origin: EchoOrigin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(ORIGIN=echo_origin.url)
    target = f"/page?for={header}"

    poisoned = await proxy.get(target, headers={header: INJECTED})
    clean = await proxy.get(target)

    assert poisoned.status == 200 and poisoned.x_cache == "MISS", poisoned
    assert clean.x_cache == "HIT-L1", clean
    for response in (poisoned, clean):
        assert b"evil.example" not in response.body, response.body
        assert "evil" not in response.headers.get("X-Echo-Host", "")
    assert len(echo_origin.requests) == 1
    seen = {name.lower(): value for name, value in echo_origin.requests[0]["headers"]}
    assert all("evil" not in value for value in seen.values()), seen


async def test_the_allowlist_forwards_a_header_the_operator_trusts(
    echo_origin: EchoOrigin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(ORIGIN=echo_origin.url, FORWARD_HEADERS="X-Forwarded-Host")

    response = await proxy.get(
        "/page", headers={"X-Forwarded-Host": "cdn.example", "X-Original-URL": "/admin"}
    )

    seen = _seen_headers(response.body)
    assert seen.get("x-forwarded-host") == "cdn.example"
    assert "x-original-url" not in seen  # allowing one header allows only that one


async def test_x_forwarded_for_is_the_peer_unless_the_operator_trusts_the_clients_value(
    echo_origin: EchoOrigin, make_proxy: MakeProxy
) -> None:
    default = await make_proxy(ORIGIN=echo_origin.url)
    behind_lb = await make_proxy(ORIGIN=echo_origin.url, FORWARD_HEADERS="X-Forwarded-For")

    direct = _seen_headers((await default.get("/a", headers={"X-Forwarded-For": "6.6.6.6"})).body)
    trusted = _seen_headers(
        (await behind_lb.get("/b", headers={"X-Forwarded-For": "203.0.113.7"})).body
    )

    assert direct["x-forwarded-for"] == "127.0.0.1"
    assert trusted["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"


async def test_a_method_override_never_turns_a_cached_get_into_something_else(
    echo_origin: EchoOrigin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(ORIGIN=echo_origin.url)

    response = await proxy.get("/item", headers={"X-HTTP-Method-Override": "DELETE"})

    seen = json.loads(response.body)
    assert seen["method"] == "GET"
    assert "x-http-method-override" not in _seen_headers(response.body)


# -- fat GET ----------------------------------------------------------------------------------


async def test_a_get_with_a_body_is_passed_through_and_never_cached(
    echo_origin: EchoOrigin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(ORIGIN=echo_origin.url)

    fat = await proxy.request("GET", "/search?q=1", data=b"q=evil")
    clean = await proxy.get("/search?q=1")
    clean_again = await proxy.get("/search?q=1")

    assert fat.x_cache == "BYPASS", fat
    assert json.loads(fat.body)["body"] == "q=evil"  # the client's own answer, as given
    assert clean.x_cache == "MISS", clean  # the fat answer was not stored ...
    assert json.loads(clean.body)["body"] == ""  # ... and is not what the next client gets
    assert clean_again.x_cache == "HIT-L1"
    assert b"evil" not in clean_again.body


async def test_a_fat_get_is_not_answered_from_the_cache_either(
    echo_origin: EchoOrigin, make_proxy: MakeProxy
) -> None:
    """A body the key does not see may change the answer: never serve a stored one for it."""
    proxy = await make_proxy(ORIGIN=echo_origin.url)
    await proxy.get("/search?q=2")

    fat = await proxy.request("GET", "/search?q=2", data=b"q=other")

    assert fat.x_cache == "BYPASS"
    assert json.loads(fat.body)["body"] == "q=other"
    assert len(echo_origin.requests) == 2


async def test_a_chunked_fat_get_is_passed_through_too(
    echo_origin: EchoOrigin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(ORIGIN=echo_origin.url)

    response = await raw_exchange(
        proxy.port,
        b"GET /search?q=3 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n4\r\nevil\r\n0\r\n\r\n",
    )
    clean = await proxy.get("/search?q=3")

    assert status_of(response) == 200
    assert b"X-Cache: BYPASS" in response
    assert clean.x_cache == "MISS" and b"evil" not in clean.body


# -- parameter cloaking: the key is exactly the forwarded target ------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/p?a=1&utm_source=x",
        "/p?a=1;callback=evil",
        "/p?a=1&a=2",
        "/p?a=1%26callback%3Devil",
        "/p?a=1&callback=evil&",
        "/p?A=1",
        "/p;jsessionid=1?a=1",
    ],
)
async def test_no_parameter_is_dropped_from_the_key_that_is_forwarded(
    target: str, origin: Origin, make_proxy: MakeProxy
) -> None:
    from tierproxy.keys import normalise_target

    proxy = await make_proxy()

    first = await proxy.get(target)
    plain = await proxy.get("/p?a=1")

    assert first.x_cache == "MISS" and plain.x_cache == "MISS", (first, plain)
    assert [r.path_qs for r in origin.requests] == [normalise_target(target), "/p?a=1"]
