"""Issue 4, line 5: request smuggling and hop-by-hop fields.

Ambiguous framing is refused with 400 and the connection closed; the origin never sees a
request that was smuggled inside a body (bodies are re-framed, never passed through); hop-by-hop
fields, fields named in Connection, TE, Upgrade and Proxy-* are stripped in both directions.
"""

from __future__ import annotations

import asyncio

import aiohttp.http_parser
import aiohttp.web_protocol
import pytest
from support.fixture_types import MakeProxy
from support.origin import Origin
from support.proxy import Fetched

from .helpers import RawConnection, raw_exchange, status_of

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


def _post(headers: bytes, body: bytes) -> bytes:
    return b"POST /submit HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n" + body


def test_the_c_http_parser_is_in_use() -> None:
    # The smuggling fixes land in aiohttp's C parser (llhttp) first; the pure-Python fallback
    # (AIOHTTP_NO_EXTENSIONS, or a wheel without the extension) must not be what serves us.
    assert aiohttp.http_parser.HttpRequestParser.__module__ == "aiohttp._http_parser"
    # (web_protocol imports the parser without re-exporting it: hence the ignore.)
    assert aiohttp.web_protocol.HttpRequestParser is aiohttp.http_parser.HttpRequestParser  # type: ignore[attr-defined]


def test_the_hardened_listener_is_active_with_this_aiohttp() -> None:
    from tierproxy.aiohttp_internals import internals_available

    # Otherwise ProxyRunner falls back to aiohttp's plain handler (no header/send timeouts).
    assert internals_available()


@pytest.mark.parametrize(
    "request_bytes",
    [
        _post(b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        _post(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", b"0\r\n\r\n" + SMUGGLED),
        _post(b"Content-Length: 4\r\nContent-Length: 40\r\n", b"abcd" + SMUGGLED),
        _post(b"Content-Length: 4\r\nContent-Length: 4\r\n", b"abcd" + SMUGGLED),
        _post(b"Content-Length: 4, 4\r\n", b"abcd" + SMUGGLED),
        _post(b"Content-Length: +4\r\n", b"abcd" + SMUGGLED),
        _post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        _post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n" + SMUGGLED),
        _post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        _post(b"Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        _post(
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
            b"0\r\n\r\n" + SMUGGLED,
        ),
        _post(b"Transfer-Encoding: \x0bchunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        _post(b"Transfer-Encoding: chunked\r\n", b"4;ext\nx\r\nabcd\r\n0\r\n\r\n" + SMUGGLED),
        _post(b"Transfer-Encoding: chunked\r\n", b"FFFFFFFFFFFFFFFFFFFF\r\nabcd\r\n0\r\n\r\n"),
        _post(b"Transfer-Encoding: chunked\r\n", b"10000000000000001\r\nabcd\r\n0\r\n\r\n"),
        _post(b"Transfer-Encoding: chunked\r\n", b"4\r\nabcdXX0\r\n\r\n" + SMUGGLED),
        _post(b"Transfer-Encoding: chunked\r\n", b"4\nabcd\n0\n\n" + SMUGGLED),
        _post(b"Transfer-Encoding: chunked\r\n", b"4 \r\nabcd\r\n0\r\n\r\n" + SMUGGLED),
        _post(b"Transfer-Encoding: chunked\r\n", b"0\r\nContent-Length: 50\r\n\r\n" + SMUGGLED),
        b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n" + SMUGGLED,  # obs-fold
        b"GET / HTTP/1.1\nHost: x\n\n" + SMUGGLED,  # bare LF line endings
        b"GET / HTTP/1.1\r\nHost: x\rX-Smuggle: 1\r\n\r\n",  # bare CR
        b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    ],
    ids=[
        "CL+TE",
        "TE+CL",
        "duplicate-CL",
        "duplicate-CL-same-value",
        "CL-list",
        "CL-plus-sign",
        "TE-xchunked",
        "TE-chunked-not-last",
        "TE-space-before-colon",
        "TE-folded",
        "TE-two-lines",
        "TE-vertical-tab",
        "LF-in-chunk-extension",
        "huge-chunk-size",
        "chunk-size-over-2^64",
        "bad-chunk-ending",
        "bare-LF-chunk-lines",
        "space-after-chunk-size",
        "CL-in-trailer",
        "obs-fold",
        "bare-LF-head",
        "bare-CR-head",
        "two-Host",
        "NUL-in-field",
    ],
)
async def test_ambiguous_framing_is_refused_and_never_reaches_the_origin(
    request_bytes: bytes, origin: Origin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy()

    response = await raw_exchange(proxy.port, request_bytes)

    assert status_of(response) == 400, response[:300]
    # Exactly one answer, then the connection is closed: nothing after the bad framing is
    # read as another request on this connection.
    head, _, rest = response.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    assert len(rest) == length, response
    assert origin.count() == 0, [r.path_qs for r in origin.requests]


@pytest.mark.parametrize(
    "second_packet",
    [
        b"4\r\nabcdXX0\r\n\r\n" + SMUGGLED,
        b"FFFFFFFFFFFFFFFFFFFF\r\nabcd\r\n",
        b"4;a\nb\r\nabcd\r\n",
    ],
    ids=["bad-chunk-ending", "huge-chunk-size", "LF-in-chunk-extension"],
)
async def test_bad_chunk_framing_after_the_body_began_is_a_prompt_400(
    second_packet: bytes, origin: Origin, make_proxy: MakeProxy
) -> None:
    """The handler is already reading the body when the bad framing arrives.

    aiohttp drops the body stream on such an error without telling its reader; the listener
    fails the read so the client gets 400 at once instead of a connection that hangs.
    """
    proxy = await make_proxy(BODY_TIMEOUT=30)
    conn = await RawConnection.open(proxy.port)
    try:
        await conn.send(_post(b"Transfer-Encoding: chunked\r\n", b"4\r\nabcd\r\n"))
        await asyncio.sleep(0.1)  # let the handler start reading the body (a real gap on the wire)
        await conn.send(second_packet)
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await conn.read_until_closed(timeout=5)
        elapsed = loop.time() - started
    finally:
        await conn.close()

    assert status_of(response) == 400, response[:300]
    assert elapsed < 2.0
    assert origin.count() == 0


async def test_a_request_inside_a_body_reaches_the_origin_only_as_body_bytes(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy()
    body = SMUGGLED * 2

    response = await raw_exchange(
        proxy.port,
        _post(b"Content-Length: %d\r\nConnection: close\r\n" % len(body), body),
    )

    assert status_of(response) == 200, response[:300]
    [seen] = origin.requests
    assert (seen.method, seen.path_qs, seen.body) == ("POST", "/submit", body)
    assert seen.headers["Content-Length"] == str(len(body))
    assert "Transfer-Encoding" not in seen.headers


async def test_a_chunked_body_is_forwarded_re_framed_with_a_length(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy()

    response = await raw_exchange(
        proxy.port,
        _post(
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n",
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        ),
    )

    assert status_of(response) == 200, response[:300]
    [seen] = origin.requests
    assert seen.body == b"hello world"
    assert seen.headers["Content-Length"] == "11"
    assert "Transfer-Encoding" not in seen.headers


async def test_transfer_encoding_in_http_1_0_is_refused(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message means the framing is faulty."""
    proxy = await make_proxy()

    response = await raw_exchange(
        proxy.port,
        b"POST /submit HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nabcd\r\n0\r\n\r\n",
    )

    assert status_of(response) == 400, response[:300]
    assert origin.count() == 0


async def test_a_transfer_coding_other_than_chunked_is_not_forwarded_undeclared(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """ "gzip, chunked" is valid framing, but only chunked is removed here: forwarding the rest
    without declaring it would hand the origin a body it cannot read (RFC 9112 §6.1: 501)."""
    proxy = await make_proxy()

    response = await raw_exchange(
        proxy.port,
        _post(b"Transfer-Encoding: gzip, chunked\r\n", b"4\r\nabcd\r\n0\r\n\r\n"),
    )

    assert status_of(response) == 501, response[:300]
    assert origin.count() == 0


async def test_a_compressed_request_body_is_forwarded_as_sent(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """The listener must not decompress: the origin gets the bytes and the Content-Encoding."""
    import gzip

    proxy = await make_proxy()
    compressed = gzip.compress(b"x" * 10_000)

    response = await proxy.request(
        "POST", "/upload", data=compressed, headers={"Content-Encoding": "gzip"}
    )

    assert response.status == 200, response
    [seen] = origin.requests
    # (The test origin itself decompresses what it reads; the length it was sent tells.)
    assert seen.headers["Content-Length"] == str(len(compressed))
    assert seen.headers["Content-Encoding"] == "gzip"
    assert seen.body == b"x" * 10_000


# -- hop-by-hop fields, both ways ----------------------------------------------------------

_HOP_REQUEST_FIELDS = (
    b"Connection: keep-alive, Upgrade, HTTP2-Settings, X-Listed-Secret\r\n"
    b"X-Listed-Secret: s3cret\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"TE: trailers\r\n"
    b"Upgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    b"Trailer: X-T\r\n"
    b"Proxy: http://127.0.0.2:1/\r\n"
    b"Proxy-Authorization: Basic c2VjcmV0\r\n"
    b"Proxy-Connection: keep-alive\r\n"
    b"Proxy-Anything: 1\r\n"
    b"X-End-To-End: kept\r\n"
)
# An h2c upgrade attempt included: forwarded, it could turn the origin connection into a tunnel.
_HOP_NAMES = (
    "Connection",
    "X-Listed-Secret",
    "Keep-Alive",
    "TE",
    "Upgrade",
    "HTTP2-Settings",
    "Trailer",
    "Proxy",
    "Proxy-Authorization",
    "Proxy-Connection",
    "Proxy-Anything",
)


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_hop_by_hop_request_fields_never_reach_the_origin(
    method: str, origin: Origin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy()
    body = b"data" if method == "POST" else b""
    conn = await RawConnection.open(proxy.port)
    try:
        await conn.send(
            f"{method} /hop HTTP/1.1\r\nHost: x\r\n".encode()
            + _HOP_REQUEST_FIELDS
            + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        head = await conn.read_response_head()
    finally:
        await conn.close()

    assert status_of(head) == 200, head
    assert not head.startswith(b"HTTP/1.1 101")
    [seen] = origin.requests
    assert seen.headers.get("X-End-To-End") == "kept"
    for name in _HOP_NAMES:
        if name == "Connection":
            # The origin client may set its own Connection; never the client's tokens.
            assert "x-listed-secret" not in seen.headers.get("Connection", "").lower()
            continue
        assert name not in seen.headers, (name, dict(seen.headers))


_HOP_RESPONSE_FIELDS = {
    "Connection": "X-Hop-Listed",
    "X-Hop-Listed": "origin-internal",
    "Keep-Alive": "timeout=5",
    "Proxy-Authenticate": "Basic realm=origin",
    "Proxy-Status": "origin-proxy; error=x",
    "Proxy": "y",
    "Upgrade": "h2c",
    "Trailer": "X-T",
    "X-End-To-End": "kept",
    "Cache-Control": "max-age=60",
}


def _assert_no_hop_fields(response: Fetched) -> None:
    headers = response.headers
    assert headers.get("X-End-To-End") == "kept", response
    for name in (
        "X-Hop-Listed",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Status",
        "Proxy",
        "Upgrade",
        "Trailer",
    ):
        assert name not in headers, (name, dict(headers))
    assert "x-hop-listed" not in headers.get("Connection", "").lower()
    # Framing is the proxy's own: one of Content-Length or chunked, never both.
    assert not ("Content-Length" in headers and "Transfer-Encoding" in headers), dict(headers)


async def test_hop_by_hop_response_fields_never_reach_the_client(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/hop", headers=_HOP_RESPONSE_FIELDS)
    origin.set("/hop-post", headers=_HOP_RESPONSE_FIELDS)
    origin.set("/hop-stream", headers=_HOP_RESPONSE_FIELDS, size=200_000, chunked=True)
    proxy = await make_proxy(MAX_ENTRY_BYTES=65536)

    miss = await proxy.get("/hop")
    hit = await proxy.get("/hop")
    posted = await proxy.request("POST", "/hop-post", data=b"x")
    streamed = await proxy.get("/hop-stream")
    await proxy.settle()
    other_process = await make_proxy()
    from_l3 = await other_process.get("/hop")

    assert (miss.x_cache, hit.x_cache, posted.x_cache, from_l3.x_cache) == (
        "MISS",
        "HIT-L1",
        "BYPASS",
        "HIT-L3",
    ), (miss, hit, posted, from_l3)
    assert streamed.x_cache == "BYPASS" and len(streamed.body) == 200_000, streamed
    for response in (miss, hit, posted, streamed, from_l3):
        _assert_no_hop_fields(response)
