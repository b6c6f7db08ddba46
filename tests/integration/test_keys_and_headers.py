"""What is stored and how it is keyed: keys namespaced by origin (and TIERPROXY_KEY_PREFIX),
old-format entries are misses, header bytes served back exactly from every tier, no client or
origin byte can fail a tier, tierproxy's own X-Cache / Cache-Status / X-Request-ID never
duplicated by the origin's, freshness capped by TIERPROXY_MAX_TTL.

Every test runs real processes: a real redis-server, a real SQLite file, real origins (the
aiohttp test origin, or a raw ``asyncio.start_server`` one for byte-level headers) and raw
client sockets where the exact response bytes matter.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
from support.canned import CannedOrigin
from support.net import RawConnection
from support.origin import Origin
from support.storage import CacheStatus, parse_cache_status, redis_key, sqlite_row, tier_members
from support.wait import wait_for_condition

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def raw_origin() -> AsyncIterator[CannedOrigin]:
    server = await CannedOrigin().start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def second_origin() -> AsyncIterator[Origin]:
    server = await Origin().start()
    try:
        yield server
    finally:
        server.release()
        await server.close()


async def raw_get(port: int, target: str, extra: bytes = b"") -> bytes:
    """One GET on a fresh connection; the whole response's bytes (Content-Length framed)."""
    conn = await RawConnection.open(port)
    try:
        await conn.send(b"GET " + target.encode() + b" HTTP/1.1\r\nHost: t\r\n" + extra + b"\r\n")
        return await conn.read_response()
    finally:
        await conn.close()


def header_lines(response: bytes, name: bytes) -> list[bytes]:
    """The raw values of every ``name`` header line of a response (byte-exact)."""
    head = response.split(b"\r\n\r\n", 1)[0]
    values = []
    for line in head.split(b"\r\n")[1:]:
        field, _, value = line.partition(b":")
        if field.strip().lower() == name.lower():
            values.append(value.strip())
    return values


def _breakers(tier: Any) -> list[Any]:
    """A tier's breakers: lookups', and writes' where it keeps one apart."""
    return [tier.breaker, getattr(tier, "write_breaker", tier.breaker)]


def breakers_closed(proxy: Any) -> bool:
    return all(
        not breaker.is_open and breaker.failures == 0
        for tier in proxy.state.tiers
        for breaker in _breakers(tier)
    )


async def wait_stored(proxy: Any, redis_client: Any, sqlite_path: Any, material: str) -> None:
    origin = proxy.settings.origin
    await proxy.settle()
    await wait_for_condition(
        lambda: redis_client.exists(redis_key(material, origin)), message=f"{material} in L2"
    )
    await wait_for_condition(
        lambda: sqlite_row(sqlite_path, material, origin) is not None, message=f"{material} in L3"
    )


# -- §3 keys are namespaced by origin --------------------------------------------------------


async def test_two_origins_sharing_one_redis_and_one_sqlite_never_serve_each_others_content(
    make_proxy: Any,
    origin: Origin,
    second_origin: Origin,
    redis_client: Any,
    sqlite_path: Any,
) -> None:
    origin.set("/same", body=b"from origin A", headers={"Cache-Control": "max-age=300"})
    second_origin.set("/same", body=b"from origin B", headers={"Cache-Control": "max-age=300"})
    proxy_a = await make_proxy()
    proxy_b = await make_proxy(ORIGIN=second_origin.url)

    first = await proxy_a.get("/same")
    assert first.status == 200 and first.body == b"from origin A"
    await proxy_a.settle()
    await wait_for_condition(lambda: len(list(redis_client.scan_iter())) >= 1, message="L2 fill")

    served_b = await proxy_b.get("/same")
    assert served_b.body == b"from origin B", served_b
    assert second_origin.count("/same") == 1
    await proxy_b.settle()

    # Fresh L1s: B's L2 and L3 copies, never A's, and the other way round.
    for _ in range(2):
        b_again = await (await make_proxy(ORIGIN=second_origin.url)).get("/same")
        assert b_again.body == b"from origin B" and b_again.x_cache in ("HIT-L2", "HIT-L3")
        a_again = await (await make_proxy()).get("/same")
        assert a_again.body == b"from origin A" and a_again.x_cache in ("HIT-L2", "HIT-L3")
    for l3_only in (await make_proxy(ORIGIN=second_origin.url, REDIS_URL=None),):
        from_l3 = await l3_only.get("/same")
        assert from_l3.body == b"from origin B" and from_l3.x_cache == "HIT-L3", from_l3
    assert origin.count("/same") == 1 and second_origin.count("/same") == 1


async def test_key_prefix_starts_every_redis_name_and_separates_environments(
    make_proxy: Any,
    origin: Origin,
    redis_client: Any,
) -> None:
    origin.set("/env", headers={"Cache-Control": "max-age=300", "Surrogate-Key": "t1 t2"})
    staging = await make_proxy(KEY_PREFIX="staging:", SQLITE_PATH="off", PURGE_TOKEN="p" * 20)
    assert (await staging.get("/env")).x_cache == "MISS"
    await staging.settle()
    await wait_for_condition(
        lambda: redis_client.exists(redis_key("/env", origin.url, "staging:")),
        message="staging's L2 copy",
    )
    names = [name.decode() for name in redis_client.scan_iter(count=1000)]
    assert names and all(name.startswith("staging:") for name in names), names
    assert any(":tag:" in name for name in names), names  # the tag sets too
    channels = [c.decode() for c in redis_client.pubsub_channels()]
    assert channels and all(c.startswith("staging:") for c in channels), channels

    # Another environment (another prefix), same origin and Redis: its own copy.
    production = await make_proxy(KEY_PREFIX="", SQLITE_PATH="off")
    assert (await production.get("/env")).x_cache == "MISS"
    assert origin.count("/env") == 2
    # And a new staging replica finds staging's copy.
    assert (
        await (await make_proxy(KEY_PREFIX="staging:", SQLITE_PATH="off")).get("/env")
    ).x_cache == "HIT-L2"


def _old_format_entry(material: str, body: bytes) -> bytes:
    """An entry as format version 1 wrote it (header strings, no namespace)."""
    now = time.time()
    packed: bytes = msgpack.packb(
        [
            1,
            material,
            200,
            ["Content-Type", "text/plain"],
            body,
            now,
            now + 300,
            now + 600,
            now + 300,
            now + 900,
            None,
            None,
            [],
            [],
            len(body),
            __import__("zlib").crc32(body),
        ],
        use_bin_type=True,
    )
    return packed


async def test_entries_of_the_old_key_scheme_and_format_are_misses_never_errors(
    make_proxy: Any,
    origin: Origin,
    redis_client: Any,
    sqlite_path: Any,
) -> None:
    import sqlite3

    from tierproxy.keys import KeySpace

    origin.set("/old", body=b"current", headers={"Cache-Control": "max-age=300"})
    warm = await make_proxy()
    assert (await warm.get("/warm")).status == 200  # creates the L3 schema
    await warm.settle()
    old = _old_format_entry("/old", b"OLD BYTES")
    legacy_id = hashlib.sha256(b"/old").hexdigest()  # the old scheme: path + query only
    current_id = KeySpace(origin.url).key("/old").digest
    for ident in (legacy_id, current_id):
        redis_client.set("tierproxy:" + ident, old, ex=300)
    conn = sqlite3.connect(str(sqlite_path), timeout=2, isolation_level=None)
    try:
        for ident in (legacy_id, current_id):
            conn.execute(
                "INSERT OR REPLACE INTO entries (key, value, size, expires_at, accessed_at, tags)"
                " VALUES (?, ?, ?, ?, ?, '[]')",
                (ident, old, len(old), time.time() + 300, 0),
            )
    finally:
        conn.close()
    for proxy in (await make_proxy(), await make_proxy(REDIS_URL=None)):
        got = await proxy.get("/old")
        assert got.status == 200 and got.body == b"current", got
        assert breakers_closed(proxy)


# -- §8 header bytes are kept exactly; no input fails a tier --------------------------------


async def test_obs_text_header_bytes_served_exactly_from_every_tier_and_path(
    make_proxy: Any,
    raw_origin: CannedOrigin,
    redis_client: Any,
    sqlite_path: Any,
) -> None:
    raw_origin.set(
        "/latin",
        [
            b"Cache-Control: max-age=300",
            b"X-Name: caf\xe9",
            b'ETag: "caf\xe9"',
            b"Surrogate-Key: t\xe9g",
        ],
        b"body",
    )
    proxy = await make_proxy(ORIGIN=raw_origin.url)
    full_path = b"Connection: close\r\n"  # not the connection handler's hit path

    miss = await raw_get(proxy.port, "/latin")
    assert header_lines(miss, b"X-Cache") == [b"MISS"]
    assert header_lines(miss, b"X-Name") == [b"caf\xe9"], miss
    await wait_stored(proxy, redis_client, sqlite_path, "/latin")
    assert breakers_closed(proxy)
    for extra, label in ((b"", b"HIT-L1"), (full_path, b"HIT-L1")):
        hit = await raw_get(proxy.port, "/latin", extra)
        assert header_lines(hit, b"X-Cache") == [label]
        assert header_lines(hit, b"X-Name") == [b"caf\xe9"], hit
        assert header_lines(hit, b"ETag") == [b'"caf\xe9"'], hit

    for env, label in (({}, b"HIT-L2"), ({"REDIS_URL": None}, b"HIT-L3")):
        for extra in (b"", full_path):
            fresh = await make_proxy(ORIGIN=raw_origin.url, L1_MAX_BYTES=0, **env)
            hit = await raw_get(fresh.port, "/latin", extra)
            assert header_lines(hit, b"X-Cache") == [label], hit
            assert header_lines(hit, b"X-Name") == [b"caf\xe9"], hit
            assert breakers_closed(fresh)
    assert raw_origin.count == 1


async def test_non_utf8_vary_values_from_clients_never_open_a_tier_breaker(
    make_proxy: Any,
    origin: Origin,
    redis_client: Any,
    sqlite_path: Any,
) -> None:
    origin.set_default(headers={"Cache-Control": "max-age=300", "Vary": "X-Lang"})
    proxy = await make_proxy(BREAKER_FAILURES=3)
    for i in range(12):
        response = await raw_get(
            proxy.port, f"/v{i}", b"X-Lang: \xff\xfe" + bytes([0x80 + i]) + b"\r\n"
        )
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
    await proxy.settle()
    assert breakers_closed(proxy), [
        (t.name, [b.failures for b in _breakers(t)]) for t in proxy.state.tiers
    ]
    # The odd bytes were stored too, and are found again by the same bytes.
    await wait_stored(proxy, redis_client, sqlite_path, "/v3")
    fresh = await make_proxy(L1_MAX_BYTES=0)
    again = await raw_get(fresh.port, "/v3", b"X-Lang: \xff\xfe\x83\r\n")
    assert header_lines(again, b"X-Cache") == [b"HIT-L2"], again
    # Normal requests still hit L2 and L3.
    assert (await proxy.get("/plain", headers={"X-Lang": "en"})).x_cache == "MISS"
    await wait_stored(proxy, redis_client, sqlite_path, "/plain")
    assert (
        await (await make_proxy(L1_MAX_BYTES=0)).get("/plain", headers={"X-Lang": "en"})
    ).x_cache == "HIT-L2"
    assert (
        await (await make_proxy(L1_MAX_BYTES=0, REDIS_URL=None)).get(
            "/plain", headers={"X-Lang": "en"}
        )
    ).x_cache == "HIT-L3"


# -- §10 the origin's X-Cache / Cache-Status / X-Request-ID ----------------------------------


async def test_hits_and_misses_carry_one_x_cache_one_request_id_and_an_appended_cache_status(
    make_proxy: Any,
    origin: Origin,
    redis_client: Any,
    sqlite_path: Any,
) -> None:
    origin.set(
        "/cdn",
        headers={
            "Cache-Control": "max-age=300",
            "X-Cache": "HIT from upstream",
            "Cache-Status": "upstream-cdn; hit; ttl=10",
            "X-Request-ID": "origin-id-123",
        },
    )
    origin.set(
        "/pass",
        headers={
            "Cache-Control": "no-store",
            "X-Cache": "HIT from upstream",
            "Cache-Status": "upstream-cdn; fwd=miss",
            "X-Request-ID": "origin-id-456",
        },
    )
    proxy = await make_proxy()
    mine = b"X-Request-ID: client-7\r\n"
    checks = [(proxy.port, "/cdn", b"", b"MISS"), (proxy.port, "/pass", b"", b"BYPASS")]
    for port, target, extra, label in checks:
        response = await raw_get(port, target, mine + extra)
        assert header_lines(response, b"X-Cache") == [label], response
        assert header_lines(response, b"X-Request-ID") == [b"client-7"], response
        status = b", ".join(header_lines(response, b"Cache-Status")).decode()
        members = parse_cache_status(status)
        assert members[0].cache == "upstream-cdn" and len(members) > 1, response
        assert list(tier_members(status)) == ["l3", "l2", "l1"], response  # all reached
    await wait_stored(proxy, redis_client, sqlite_path, "/cdn")
    l2 = await make_proxy(L1_MAX_BYTES=0)
    for port, extra, label in (
        (proxy.port, b"", b"HIT-L1"),
        (proxy.port, b"Connection: close\r\n", b"HIT-L1"),
        (l2.port, b"", b"HIT-L2"),
        (l2.port, b"Connection: close\r\n", b"HIT-L2"),
    ):
        response = await raw_get(port, "/cdn", mine + extra)
        assert header_lines(response, b"X-Cache") == [label], response
        assert header_lines(response, b"X-Request-ID") == [b"client-7"], response
        status = b", ".join(header_lines(response, b"Cache-Status")).decode()
        # RFC 9211 §2: members are listed from the origin towards the user agent.
        upstream, *ours = parse_cache_status(status)
        assert upstream == CacheStatus("upstream-cdn", {"hit": True, "ttl": 10}), response
        tier = label.decode().removeprefix("HIT-").lower()
        assert ours[0].cache == f"tierproxy-{tier}" and ours[0].hit, response


# -- §10 TIERPROXY_MAX_TTL ------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Expires": "Fri, 31 Dec 9999 23:59:59 GMT"},
        {"Cache-Control": "max-age=999999999999"},
        {"Cache-Control": "public, s-maxage=999999999"},
    ],
)
async def test_freshness_never_exceeds_max_ttl(
    make_proxy: Any,
    origin: Origin,
    redis_client: Any,
    headers: dict[str, str],
) -> None:
    origin.set("/forever", headers=headers)
    default = await make_proxy(SQLITE_PATH="off")
    await default.get("/forever")
    hit = await default.get("/forever")
    assert hit.x_cache == "HIT-L1"
    assert hit.cache_status is not None and hit.cache_status.ttl is not None
    assert hit.cache_status.ttl <= 31536000, hit
    await default.settle()
    await wait_for_condition(
        lambda: redis_client.exists(redis_key("/forever", origin.url)), message="L2 fill"
    )
    # The Redis TTL is freshness + the stale window at most.
    assert redis_client.ttl(redis_key("/forever", origin.url)) <= 31536000 + 86400 + 5

    capped = await make_proxy(SQLITE_PATH="off", REDIS_URL=None, MAX_TTL=100)
    await capped.get("/forever")
    hit = await capped.get("/forever")
    assert hit.cache_status is not None and hit.cache_status.ttl is not None
    assert hit.cache_status.ttl <= 100, hit


async def test_an_entry_that_cannot_be_encoded_is_skipped_and_counted_never_a_tier_failure(
    tmp_path: Any,
    redis_url: str,
) -> None:
    """The guard behind the two tests above: whatever else an entry may one day hold that
    cannot be encoded, it is that entry's miss (a bug, logged and counted), and the tier's
    breaker never hears of it. Real SQLite file and real Redis."""
    from tierproxy.entry import Entry
    from tierproxy.keys import KeySpace
    from tierproxy.metrics import Metrics
    from tierproxy.tiers.base import Blob, Breaker, GuardedTier
    from tierproxy.tiers.redis import RedisTier
    from tierproxy.tiers.sqlite import SQLiteTier

    keys = KeySpace("http://origin.test")
    metrics = Metrics()
    now = time.time()

    def entry(material: str, value: str) -> Entry:
        return Entry(
            key=material,
            status=200,
            headers=(("X-Value", value),),
            body=b"b",
            stored_at=now,
            fresh_until=now + 60,
            stale_until=now + 60,
            swr_until=now + 60,
            expires_at=now + 60,
        )

    backends = [
        SQLiteTier(
            str(tmp_path / "c.sqlite3"),
            max_bytes=10**7,
            read_timeout=1.0,
            write_timeout=1.0,
            keys=keys,
        ),
        RedisTier(redis_url, socket_timeout=1.0, max_connections=4, keys=keys),
    ]
    for backend in backends:
        await backend.open()
        tier = GuardedTier(backend, 1.0, 1.0, Breaker(1, 60.0), metrics)
        try:
            bad = entry("/bad", "\ud800")  # a surrogate no byte decodes to
            for _ in range(5):
                assert not await tier.set(keys.key("/bad"), bad, Blob(bad))
            assert all(not b.is_open and b.failures == 0 for b in _breakers(tier))
            good = entry("/good", "fine")
            assert await tier.set(keys.key("/good"), good, Blob(good))
            assert await tier.get(keys.key("/good"), 1.0) is not None
            assert (
                metrics.registry.get_sample_value(
                    "tierproxy_tier_writes_total",
                    {"tier": backend.name, "op": "set", "outcome": "unencodable"},
                )
                == 5
            )
        finally:
            await tier.close()
