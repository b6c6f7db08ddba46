"""Byte ranges (RFC 9110 §14) answered from complete stored responses, in every tier.

Through the real proxy, the real test origin, Redis and SQLite: single ranges, suffixes,
unsatisfiable ranges, multipart/byteranges, If-Range, HEAD; a Range on a miss fetches the
whole object (no Range to the origin) and answers the range; a body too large to store passes
the client's Range to the origin; ``curl -C -`` resumes through the proxy, cold and warm.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.fixture_types import MakeProxy
from support.net import RawConnection
from support.origin import Origin, make_body
from support.warm import warm_in_tier

CACHEABLE = {"Cache-Control": "max-age=300"}
SIZE = 1000


@pytest.mark.parametrize("tier", ["l1", "l2", "l3"])
async def test_single_ranges_from_each_tier(
    tier: str,
    origin: Origin,
    make_proxy: MakeProxy,
    redis_url: str,
    redis_client: Any,
    sqlite_path: Path,
) -> None:
    origin.set("/r", size=SIZE, headers=CACHEABLE, etag='"r1"')
    body = make_body(SIZE)
    proxy = await warm_in_tier(tier, "/r", make_proxy, origin, redis_client, sqlite_path)

    cases = [
        ("bytes=0-9", 0, 9),
        ("bytes=990-", 990, 999),
        ("bytes=-5", 995, 999),
        ("bytes=500-100000", 500, 999),  # a last position past the end is the end
        ("bytes=-5000", 0, 999),  # a suffix longer than the body: all of it
    ]
    for value, first, last in cases:
        got = await proxy.get("/r", headers={"Range": value})
        assert got.status == 206, (value, got)
        assert got.x_cache == f"HIT-{tier.upper()}", (value, got)
        assert got.body == body[first : last + 1], value
        assert got.headers["Content-Range"] == f"bytes {first}-{last}/{SIZE}", value
        assert got.headers["Content-Length"] == str(last - first + 1), value
        assert got.headers["ETag"] == '"r1"'  # the stored fields come along
        assert got.headers["Content-Type"] == "application/octet-stream"

    unsatisfiable = await proxy.get("/r", headers={"Range": "bytes=1000-"})
    assert unsatisfiable.status == 416, unsatisfiable
    assert unsatisfiable.headers["Content-Range"] == f"bytes */{SIZE}"
    assert unsatisfiable.x_cache == f"HIT-{tier.upper()}", unsatisfiable
    assert unsatisfiable.body == b""

    whole = await proxy.get("/r")
    assert whole.status == 200 and whole.body == body, whole
    assert "Content-Range" not in whole.headers
    assert origin.count("/r") == 1


async def test_a_large_range_is_sent_whole_and_exact(origin: Origin, make_proxy: MakeProxy) -> None:
    # Larger than one body slice of the response writer: sent as a view of the stored bytes.
    size = 600_000
    origin.set("/big", size=size, headers=CACHEABLE, seed=7)
    body = make_body(size, 7)
    proxy = await make_proxy()
    assert (await proxy.get("/big")).status == 200

    got = await proxy.get("/big", headers={"Range": "bytes=1000-500999"})

    assert got.status == 206, got
    assert got.body == body[1000:501000]
    assert got.headers["Content-Range"] == f"bytes 1000-500999/{size}"
    assert got.x_cache == "HIT-L1", got


def _parts(response_body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    match = re.fullmatch(r"multipart/byteranges; boundary=(\S+)", content_type)
    assert match is not None, content_type
    delimiter = b"--" + match[1].encode()
    assert response_body.startswith(delimiter + b"\r\n")
    assert response_body.endswith(b"\r\n" + delimiter + b"--\r\n")
    inner = response_body[len(delimiter) + 2 : -(len(delimiter) + 6)]
    parts = []
    for raw in inner.split(b"\r\n" + delimiter + b"\r\n"):
        head, _, data = raw.partition(b"\r\n\r\n")
        fields = dict(line.decode().split(": ", 1) for line in head.split(b"\r\n"))
        parts.append((fields, data))
    return parts


@pytest.mark.parametrize("tier", ["l1", "l3"])
async def test_several_ranges_make_a_multipart_byteranges_answer(
    tier: str,
    origin: Origin,
    make_proxy: MakeProxy,
    redis_client: Any,
    sqlite_path: Path,
) -> None:
    origin.set("/m", size=SIZE, headers=CACHEABLE)
    body = make_body(SIZE)
    proxy = await warm_in_tier(tier, "/m", make_proxy, origin, redis_client, sqlite_path)

    got = await proxy.get("/m", headers={"Range": "bytes=0-9, 500-519,-3"})

    assert got.status == 206, got
    assert "Content-Range" not in got.headers
    parts = _parts(got.body, got.headers["Content-Type"])
    assert [fields["Content-Range"] for fields, _ in parts] == [
        f"bytes 0-9/{SIZE}",
        f"bytes 500-519/{SIZE}",
        f"bytes 997-999/{SIZE}",
    ]
    assert [data for _, data in parts] == [body[0:10], body[500:520], body[997:]]
    assert all(fields["Content-Type"] == "application/octet-stream" for fields, _ in parts)
    assert got.headers["Content-Length"] == str(len(got.body))


async def test_range_sets_not_worth_answering_get_the_whole_body(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/small", body=b"0123456789abcdefghij", headers=CACHEABLE)
    origin.set("/w", size=SIZE, headers=CACHEABLE)
    proxy = await make_proxy()
    await proxy.get("/small")
    await proxy.get("/w")

    cases = [
        ("/small", "bytes=0-0,2-2"),  # the multipart answer would be larger than the body
        ("/w", "bytes=0-99,50-149"),  # overlapping (RFC 9110 §14.2)
        ("/w", "bytes=" + ",".join(f"{i * 10}-{i * 10}" for i in range(17))),  # too many
        ("/w", "bytes=300-309,200-209,100-109"),  # many, out of order
        ("/w", "bytes=9-3"),  # invalid: ignored
        ("/w", "items=0-3"),  # another unit: ignored
    ]
    for path, value in cases:
        got = await proxy.get(path, headers={"Range": value})
        assert got.status == 200, (value, got)
        assert got.x_cache == "HIT-L1", (value, got)
        assert "Content-Range" not in got.headers
        assert got.body == (b"0123456789abcdefghij" if path == "/small" else make_body(SIZE))


async def test_a_large_multipart_answer_is_the_whole_body_shared_not_copied(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """Parts over 64 KiB in all would be a copy of the stored body per client (a multipart
    body is built; a single range or the whole body is a view of the one stored copy): the
    whole 200 instead (RFC 9110 §14.2 lets a server ignore Range). Small parts: multipart."""
    size = 300 * 1024
    origin.set("/big", size=size, headers=CACHEABLE)
    proxy = await make_proxy()
    await proxy.get("/big")
    large = await proxy.get("/big", headers={"Range": "bytes=0-49999,100000-149999"})
    assert (large.status, large.x_cache) == (200, "HIT-L1"), large
    assert large.body == make_body(size)
    small = await proxy.get("/big", headers={"Range": "bytes=0-9999,100000-109999"})
    assert small.status == 206, small
    assert small.headers["Content-Type"].startswith("multipart/byteranges")


async def test_if_range(origin: Origin, make_proxy: MakeProxy) -> None:
    date = email.utils.formatdate(time.time(), usegmt=True)
    modified = email.utils.formatdate(time.time() - 3600, usegmt=True)
    origin.set(
        "/strong",
        size=SIZE,
        headers={**CACHEABLE, "Date": date, "Last-Modified": modified},
        etag='"s1"',
    )
    origin.set("/weak", size=SIZE, headers=CACHEABLE, etag='W/"w1"')
    proxy = await make_proxy()
    await proxy.get("/strong")
    await proxy.get("/weak")

    cases = [
        ("/strong", '"s1"', 206),  # the stored strong ETag
        ("/strong", '"s2"', 200),  # changed: the whole new representation
        ("/strong", modified, 206),  # the stored Last-Modified, an hour before Date: strong
        ("/strong", date, 200),
        ("/weak", 'W/"w1"', 200),  # a weak tag never matches If-Range
        ("/weak", '"w1"', 200),
    ]
    for path, if_range, status in cases:
        got = await proxy.get(path, headers={"Range": "bytes=0-3", "If-Range": if_range})
        assert got.status == status, (path, if_range, got)
        assert got.body == (make_body(SIZE)[:4] if status == 206 else make_body(SIZE))
        assert got.x_cache == "HIT-L1", got


async def test_head_with_range_gets_the_206_head_without_a_body(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/h", size=SIZE, headers=CACHEABLE)
    proxy = await make_proxy()
    await proxy.get("/h")

    got = await proxy.head("/h", headers={"Range": "bytes=10-19"})

    assert got.status == 206, got
    assert got.body == b""
    assert got.headers["Content-Range"] == f"bytes 10-19/{SIZE}"
    assert got.headers["Content-Length"] == "10"
    assert got.x_cache == "HIT-L1", got

    origin.set("/h-cold", size=SIZE, headers=CACHEABLE)
    cold = await proxy.head("/h-cold", headers={"Range": "bytes=-100"})
    assert cold.status == 206 and cold.body == b"", cold
    assert cold.headers["Content-Range"] == f"bytes 900-999/{SIZE}"
    assert cold.headers["Content-Length"] == "100"
    after = await proxy.get("/h-cold", headers={"Range": "bytes=0-0"})
    assert after.status == 206 and after.x_cache == "HIT-L1", after  # the HEAD filled it


async def test_a_range_on_a_stored_non_200_gets_the_entry_as_it_is(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/gone", status=404, body=b"not here at all", headers=CACHEABLE)
    proxy = await make_proxy()
    await proxy.get("/gone")

    got = await proxy.get("/gone", headers={"Range": "bytes=0-2"})

    assert got.status == 404, got
    assert got.body == b"not here at all"
    assert "Content-Range" not in got.headers
    assert got.x_cache == "HIT-L1", got


async def test_a_range_on_a_miss_fetches_and_stores_the_whole_object(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/cold", size=SIZE, headers=CACHEABLE, honor_range=True)
    body = make_body(SIZE)
    proxy = await make_proxy()

    cold = await proxy.get("/cold", headers={"Range": "bytes=100-199"})
    warm = await proxy.get("/cold", headers={"Range": "bytes=-10"})
    whole = await proxy.get("/cold")

    assert cold.status == 206 and cold.x_cache == "MISS", cold
    assert cold.body == body[100:200]
    assert cold.headers["Content-Range"] == f"bytes 100-199/{SIZE}"
    # The origin was asked once, for the whole object: no Range, no If-Range.
    (seen,) = origin.requests_for("/cold")
    assert "Range" not in seen.headers
    assert warm.status == 206 and warm.x_cache == "HIT-L1", warm
    assert warm.body == body[-10:]
    assert whole.status == 200 and whole.body == body and whole.x_cache == "HIT-L1", whole


async def test_a_range_of_a_response_not_stored_is_cut_from_the_fetched_body(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    # The fetch for a cacheable request asks for the whole object; when the answer may not
    # be stored (no-store, private), the client still gets its range of it.
    origin.set("/nostore", size=SIZE, headers={"Cache-Control": "no-store"}, etag='"n"')
    body = make_body(SIZE)
    proxy = await make_proxy()

    got = await proxy.get("/nostore", headers={"Range": "bytes=10-19"})
    refused = await proxy.get("/nostore", headers={"Range": "bytes=5000-"})
    changed = await proxy.get("/nostore", headers={"Range": "bytes=10-19", "If-Range": '"m"'})

    assert got.status == 206 and got.body == body[10:20], got
    assert got.headers["Content-Range"] == f"bytes 10-19/{SIZE}"
    assert got.headers["ETag"] == '"n"'
    assert got.x_cache in ("MISS", "BYPASS"), got
    assert refused.status == 416 and refused.headers["Content-Range"] == f"bytes */{SIZE}"
    assert changed.status == 200 and changed.body == body, changed
    assert [r.headers.get("Range") for r in origin.requests_for("/nostore")] == [None] * 3


async def test_a_body_too_large_to_store_passes_the_range_to_the_origin(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    size = 50_000
    origin.set("/huge", size=size, headers=CACHEABLE, honor_range=True)
    body = make_body(size)
    proxy = await make_proxy(MAX_ENTRY_BYTES=10_000)

    got = await proxy.get("/huge", headers={"Range": "bytes=20000-20099"})
    again = await proxy.get("/huge", headers={"Range": "bytes=-100"})

    assert got.status == 206, got
    assert got.body == body[20000:20100]
    assert got.headers["Content-Range"] == f"bytes 20000-20099/{size}"
    assert again.status == 206 and again.body == body[-100:], again
    assert not got.x_cache or not got.x_cache.startswith("HIT"), got
    assert not again.x_cache or not again.x_cache.startswith("HIT"), again
    # Each time: the whole object first (too large: dropped), then the client's range.
    ranges_seen = [r.headers.get("Range") for r in origin.requests_for("/huge")]
    assert ranges_seen == [None, "bytes=20000-20099", None, "bytes=-100"]


async def test_a_206_from_the_origin_is_never_stored(origin: Origin, make_proxy: MakeProxy) -> None:
    # An origin answering 206 to a request without Range, with freshness: not a complete
    # response, so not stored (RFC 9111 §3.3).
    origin.set(
        "/partial",
        status=206,
        body=b"01234",
        headers={**CACHEABLE, "Content-Range": "bytes 0-4/10"},
    )
    proxy = await make_proxy()

    first = await proxy.get("/partial")
    second = await proxy.get("/partial")

    assert first.status == 206 and second.status == 206, (first, second)
    assert second.x_cache != "HIT-L1", second
    assert origin.count("/partial") == 2


ODD_RANGES = [
    b"bytes=\xff\xfe-3",  # obs-text bytes
    b"bytes=0-1, \xc3\xa9-",
    b"bytes=" + b"9" * 5000 + b"-",  # a position far longer than any integer limit
    b"bytes=-" + b"9" * 5000,
    b"bytes=" + b"," * 3000 + b"0-1",
    b"bytes=" + b"0-0," * 1500 + b"1-1",
    b"bytes=0-1;q=1",
    b"bytes==0-1",
    b"bytes=--1",
    b"bytes=1--2",
    b"=0-1",
    b"",
    b"   ",
]


async def test_odd_range_headers_never_break_the_answer(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/odd", size=SIZE, headers=CACHEABLE)
    proxy = await make_proxy()
    await proxy.get("/odd")

    for value, if_range in [(v, b"") for v in ODD_RANGES] + [
        (v, b"If-Range: \xff\r\n") for v in ODD_RANGES
    ]:
        conn = await RawConnection.open(proxy.port)
        try:
            await conn.send(
                b"GET /odd HTTP/1.1\r\nHost: proxy.test\r\nRange: %s\r\n%s\r\n" % (value, if_range)
            )
            response = await conn.read_response()
        finally:
            await conn.close()
        status = int(response[9:12])
        # Ignored (the whole body), a range of it, unsatisfiable, or a 4xx for a head aiohttp
        # refuses: never a 5xx.
        assert status in (200, 206, 400, 416, 431), (value[:40], response[:200])
        if status == 200:
            assert response.endswith(make_body(SIZE)), value[:40]
        if status in (206, 416):
            assert b"\r\nContent-Range: bytes " in response, value[:40]
    assert origin.count("/odd") == 1


# ---- resuming a download -------------------------------------------------------------------


async def _resume_with_aiohttp(url: str, partial: bytes) -> bytes:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Range": f"bytes={len(partial)}-"}) as resp,
    ):
        assert resp.status == 206, resp.status
        assert resp.headers["Content-Range"].startswith(f"bytes {len(partial)}-")
        return partial + await resp.read()


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_an_aiohttp_client_resumes_a_download(
    warm: bool, origin: Origin, make_proxy: MakeProxy
) -> None:
    size = 200_000
    origin.set("/file.bin", size=size, headers=CACHEABLE, seed=3)
    body = make_body(size, 3)
    proxy = await make_proxy()
    if warm:
        assert (await proxy.get("/file.bin")).body == body

    resumed = await _resume_with_aiohttp(proxy.url + "/file.bin", body[:70_001])

    assert resumed == body
    assert origin.count("/file.bin") == 1


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_curl_continue_at_resumes_through_the_proxy(
    warm: bool, origin: Origin, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    size = 200_000
    origin.set("/dl.bin", size=size, headers=CACHEABLE, seed=5)
    body = make_body(size, 5)
    proxy = await make_proxy()
    if warm:
        assert (await proxy.get("/dl.bin")).body == body
    target = tmp_path / "dl.bin"
    target.write_bytes(body[:123_457])  # an interrupted download

    curl = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--fail", "-C", "-", "-o", str(target), "-D", str(tmp_path / "head"),
        proxy.url + "/dl.bin",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        _, stderr = await curl.communicate()

    assert curl.returncode == 0, stderr
    head = (tmp_path / "head").read_text()
    assert head.startswith("HTTP/1.1 206"), head
    assert f"Content-Range: bytes 123457-{size - 1}/{size}" in head, head
    assert target.read_bytes() == body
    assert origin.count("/dl.bin") == 1
