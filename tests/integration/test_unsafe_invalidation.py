"""RFC 9111 §4.4: a non-error answer to an unsafe method invalidates the target URI and the
same-origin ``Location`` and ``Content-Location`` URIs, in every tier and every replica, before
the answer reaches the client; a 4xx/5xx answer invalidates nothing.

Real processes throughout: the test origin, redis-server, SQLite files, proxy subprocesses for
the replicas.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.fixture_types import MakeFaultProxy, MakeProxy, SpawnProxy
from support.origin import Origin
from support.proxy import ProxyHandle, SpawnedProxy, fetch
from support.redis_server import RedisServer
from support.storage import redis_key, sqlite_row
from support.wait import wait_for_condition

CACHEABLE = {"Cache-Control": "max-age=300"}


async def _cached(proxy: ProxyHandle, path: str) -> None:
    """``path`` fetched once and served from L1 the second time."""
    first = await proxy.get(path)
    assert first.x_cache == "MISS", first
    again = await proxy.get(path)
    assert again.x_cache == "HIT-L1", again


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "M-SEARCH"])
async def test_a_successful_unsafe_request_invalidates_its_target_in_every_tier_before_it_is_answered(
    method: str,
    origin: Origin,
    make_proxy: MakeProxy,
    redis_server: RedisServer,
    redis_client: Any,
    fault_proxy: MakeFaultProxy,
    sqlite_path: Path,
) -> None:
    origin.set_default(headers=CACHEABLE)
    # Every Redis command takes about 0.3 s more: an invalidation still running in the
    # background when the answer goes out would leave the L2 copy visible below.
    slow_redis = await fault_proxy(redis_server.port)
    proxy = await make_proxy(
        REDIS_URL=f"redis://127.0.0.1:{slow_redis.port}/0",
        L2_TIMEOUT=2,
        L2_WRITE_TIMEOUT=3,
        REQUEST_DEADLINE=5,
    )
    await _cached(proxy, "/doc")
    await proxy.settle()
    assert redis_client.exists(redis_key("/doc", origin.url))
    assert sqlite_row(sqlite_path, "/doc", origin.url) is not None
    slow_redis.set_mode("delay", delay=0.3)

    changed = await proxy.request(method, "/doc", data=b"new content")

    assert changed.status == 200 and changed.x_cache == "BYPASS", changed
    # Checked before anything else runs in the proxy: it is gone from every tier already.
    assert not redis_client.exists(redis_key("/doc", origin.url))
    assert sqlite_row(sqlite_path, "/doc", origin.url) is None
    slow_redis.set_mode("pass")
    after = await proxy.get("/doc")
    assert after.x_cache == "MISS", after
    assert after.body == b"origin body for /doc (request 3)"
    assert origin.count("/doc", "GET") == 2


async def test_a_frozen_redis_holds_up_the_answer_only_for_the_write_timeouts(
    origin: Origin, make_proxy: MakeProxy, redis_server: RedisServer, redis_client: Any
) -> None:
    origin.set_default(headers=CACHEABLE)
    proxy = await make_proxy(L2_WRITE_TIMEOUT=0.5, L3_WRITE_TIMEOUT=0.5, L2_TIMEOUT=0.05)
    await _cached(proxy, "/doc")
    await proxy.settle()
    assert redis_client.exists(redis_key("/doc", origin.url))

    with redis_server.frozen():
        changed = await proxy.request("POST", "/doc", data=b"x")
        assert changed.status == 200, changed
        # Both write timeouts (1 s) and slack for a loaded machine; not the 5 s an
        # operator's purge may take per tier.
        assert changed.elapsed < 2.5, changed
        # L1 and L3 are done with: the old copy is not served meanwhile.
        during = await proxy.get("/doc")
        assert during.x_cache == "MISS", during

    # The L2 purge went on in the background and landed once Redis answered again: a new
    # process (empty L1, the same Redis and SQLite file) never gets the old copy.
    await proxy.settle(timeout=10)
    fresh = await make_proxy()
    later = await fresh.get("/doc")
    assert later.status == 200 and later.body != b"origin body for /doc (request 1)", later


@pytest.mark.parametrize("status", [400, 404, 409, 500, 503])
async def test_an_error_answer_to_an_unsafe_request_invalidates_nothing(
    status: int, origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/doc", headers=CACHEABLE)
    origin.set("/form", status=status, headers={"Location": "/doc"})
    proxy = await make_proxy()
    await _cached(proxy, "/doc")
    origin.update("/doc", status=status)  # the origin now refuses changes to /doc

    refused = await proxy.request("POST", "/doc", data=b"x")
    assert refused.status == status, refused
    refused_form = await proxy.request("POST", "/form", data=b"x")
    assert refused_form.status == status, refused_form

    still = await proxy.get("/doc")
    assert still.x_cache == "HIT-L1", still
    assert origin.count("/doc", "GET") == 1


async def test_safe_methods_invalidate_nothing(origin: Origin, make_proxy: MakeProxy) -> None:
    origin.set("/doc", headers={**CACHEABLE, "Location": "/other"})
    origin.set("/other", headers=CACHEABLE)
    proxy = await make_proxy()
    await _cached(proxy, "/doc")
    await _cached(proxy, "/other")

    for method in ("OPTIONS", "TRACE"):
        answered = await proxy.request(method, "/doc")
        assert answered.status == 200 and answered.x_cache == "BYPASS", answered

    assert (await proxy.get("/doc")).x_cache == "HIT-L1"
    assert (await proxy.get("/other")).x_cache == "HIT-L1"


async def test_location_and_content_location_of_the_same_origin_are_invalidated(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, redis_client: Any, sqlite_path: Path
) -> None:
    origin.set_default(headers=CACHEABLE)
    # Relative to the request URI, absolute, and scheme-relative references to the origin.
    origin.set(
        "/shop/cart/add",
        status=303,
        headers={"Location": "items?id=7", "Content-Location": f"{origin.url}/shop/cart"},
    )
    origin.set("/shop/order", status=201, headers={"Location": f"//127.0.0.1:{origin.port}/o/1"})
    proxy = await make_proxy()
    for path in ("/shop/cart/items?id=7", "/shop/cart", "/o/1", "/unrelated"):
        await _cached(proxy, path)
    await proxy.settle()

    added = await proxy.request("POST", "/shop/cart/add", data=b"item=7")
    assert added.status == 303 and added.headers["Location"] == "items?id=7", added
    ordered = await proxy.request("PUT", "/shop/order", data=b"{}")
    assert ordered.status == 201, ordered

    for path in ("/shop/cart/items?id=7", "/shop/cart", "/o/1"):
        assert not redis_client.exists(redis_key(path, origin.url)), path
        assert sqlite_row(sqlite_path, path, origin.url) is None, path
        refetched = await proxy.get(path)
        assert refetched.x_cache == "MISS", (path, refetched)
    assert (await proxy.get("/unrelated")).x_cache == "HIT-L1"


@pytest.mark.parametrize(
    "reference",
    [
        "http://127.0.0.2:{port}/victim",  # another host
        "http://127.0.0.1:1/victim",  # another port
        "https://127.0.0.1:{port}/victim",  # another scheme
        "http://[/victim",  # not a URI at all
    ],
)
async def test_a_location_naming_another_origin_invalidates_nothing(
    reference: str, origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/victim", headers=CACHEABLE)
    origin.set("/form", status=201, headers={"Location": reference.format(port=origin.port)})
    proxy = await make_proxy()
    await _cached(proxy, "/victim")

    assert (await proxy.request("POST", "/form", data=b"x")).status == 201

    assert (await proxy.get("/victim")).x_cache == "HIT-L1"


async def test_location_outside_the_origins_base_path_invalidates_nothing(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    # TIERPROXY_ORIGIN with a base path: the proxy's /x is the origin's /api/x.
    origin.set("/api/doc", headers=CACHEABLE)
    origin.set("/api/other", headers=CACHEABLE)
    origin.set("/api/form", status=201, headers={"Location": "/doc"})  # origin's /doc: no key
    origin.set("/api/form2", status=201, headers={"Location": "/api/other"})
    proxy = await make_proxy(ORIGIN=origin.url + "/api")
    await _cached(proxy, "/doc")
    await _cached(proxy, "/other")

    assert (await proxy.request("POST", "/form", data=b"x")).status == 201
    assert (await proxy.get("/doc")).x_cache == "HIT-L1"
    assert (await proxy.request("POST", "/form2", data=b"x")).status == 201
    assert (await proxy.get("/other")).x_cache == "MISS"


async def _subscribed(proc: SpawnedProxy) -> None:
    async def connected() -> bool:
        async with (
            aiohttp.ClientSession() as session,
            session.get(proc.admin_url + "/readyz") as resp,
        ):
            return bool((await resp.json())["invalidation"] == "connected")

    await wait_for_condition(connected, timeout=10, message=f"{proc.url} subscribed")


async def test_a_post_through_one_replica_evicts_the_other_replicas_l1_copy(
    origin: Origin, spawn_proxy: SpawnProxy, redis_url: str, tmp_path: Path
) -> None:
    origin.set_default(headers=CACHEABLE)
    origin.set("/form", status=201, headers={"Location": "/made", "Content-Location": "/cl"})
    # Separate L3 files, as on separate hosts.
    a = await spawn_proxy(SQLITE_PATH=str(tmp_path / "a.sqlite3"))
    b = await spawn_proxy(SQLITE_PATH=str(tmp_path / "b.sqlite3"))
    await _subscribed(a)
    await _subscribed(b)
    async with aiohttp.ClientSession() as session:
        for path in ("/doc", "/made", "/cl", "/kept"):
            assert (await fetch(session, "GET", b.url + path)).x_cache == "MISS"
            assert (await fetch(session, "GET", b.url + path)).x_cache == "HIT-L1"

        posted = await fetch(session, "POST", a.url + "/doc", data=b"change")
        assert posted.status == 200 and posted.x_cache == "BYPASS", posted
        made = await fetch(session, "POST", a.url + "/form", data=b"create")
        assert made.status == 201, made

        # A answered after B applied both: B's next GETs go to the origin.
        for path in ("/doc", "/made", "/cl"):
            refetched = await fetch(session, "GET", b.url + path)
            assert refetched.x_cache == "MISS", (path, refetched)
        assert (await fetch(session, "GET", b.url + "/kept")).x_cache == "HIT-L1"
    assert origin.count("/doc", "GET") == 2


async def test_the_answer_waits_until_a_backfill_the_invalidation_overtook_is_undone(
    origin: Origin, make_proxy: MakeProxy, sqlite_path: Path
) -> None:
    origin.set_default(headers=CACHEABLE)
    proxy = await make_proxy(SQLITE_PATH=str(sqlite_path))
    l3 = proxy.state.tier("l3")
    # Hold the L3 writer's lock: the L3 backfill of the GET below starts (the copy is current)
    # and then waits at it, as a write would behind a slow one.
    await l3.backend._write_lock.acquire()
    try:
        assert (await proxy.get("/doc")).x_cache == "MISS"
        changing = asyncio.create_task(proxy.request("PUT", "/doc", data=b"x"))
        await asyncio.sleep(0.3)
        # The purge ran; the old copy's write is still on its way: not answered yet.
        assert not changing.done()
    finally:
        l3.backend._write_lock.release()
    changed = await changing
    assert changed.status == 200, changed
    # The write landed and was undone before the answer went out.
    assert sqlite_row(sqlite_path, "/doc", origin.url) is None
    after = await proxy.get("/doc")
    assert after.x_cache == "MISS", after


async def test_a_backfill_that_timed_out_waiting_is_not_written_after_the_invalidation(
    origin: Origin, make_proxy: MakeProxy, sqlite_path: Path
) -> None:
    """As above, but the L3 write waits longer than its timeout: the backfill gives up, its
    undo (a delete) finds nothing, and the PUT is answered. The write must then not land
    when the writer frees up: that copy is what the PUT invalidated. (Writes go in batches;
    a row taken into a batch waiting behind a slow one was once written after all, and
    served as a hit until it expired.)"""
    origin.set_default(headers=CACHEABLE)
    proxy = await make_proxy(SQLITE_PATH=str(sqlite_path), L3_WRITE_TIMEOUT=0.3)
    l3 = proxy.state.tier("l3")
    await l3.backend._write_lock.acquire()  # the writer is busy with a slow write
    try:
        assert (await proxy.get("/doc")).x_cache == "MISS"
        changed = await proxy.request("PUT", "/doc", data=b"x")  # the backfill times out
        assert changed.status == 200, changed
    finally:
        l3.backend._write_lock.release()
    await proxy.settle()
    await asyncio.sleep(0.2)  # (the batch, freed, has run: nothing of it is left to do)
    assert sqlite_row(sqlite_path, "/doc", origin.url) is None
    after = await proxy.get("/doc")
    assert after.x_cache == "MISS", after
