"""TIERPROXY_QUERY / TIERPROXY_QUERY_IGNORE through the real proxy, origin, Redis and SQLite:
ignored parameters leave the key and the request the origin gets; ``sort`` changes the key
only; a purge by URL and an unsafe request's invalidation find the same key a GET makes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from support.fixture_types import MakeProxy, SpawnProxy
from support.origin import Origin
from support.proxy import fetch
from support.storage import redis_key, sqlite_row

from tierproxy.admin import build_admin_app

CACHEABLE = {"Cache-Control": "max-age=300"}
TOKEN = "query-keys-purge-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_ignored_parameters_leave_the_key_and_the_origin_request(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, redis_client: Any, sqlite_path: Path
) -> None:
    origin.set_default(headers=CACHEABLE)
    proxy = await make_proxy(QUERY_IGNORE="utm_*,gclid,fbclid")

    first = await proxy.get("/p?a=1&utm_source=news&gclid=abc")
    assert first.x_cache == "MISS", first
    assert [r.path_qs for r in origin.requests] == ["/p?a=1"]  # never sent on
    for variant in (
        "/p?a=1",
        "/p?utm_medium=mail&a=1&fbclid=x",
        "/p?utm%5Fsource=escaped&a=1",  # utm%5Fsource is utm_source
        "/p?a=1&gclid=1&gclid=2",
    ):
        hit = await proxy.get(variant)
        assert hit.x_cache == "HIT-L1", (variant, hit)
        assert hit.body == first.body
    assert (await proxy.get("/p?a=2&utm_source=news")).x_cache == "MISS"
    assert (await proxy.get("/p?a=1&gclidx=1")).x_cache == "MISS"  # not an ignored name
    assert [r.path_qs for r in origin.requests] == ["/p?a=1", "/p?a=2", "/p?a=1&gclidx=1"]

    # Stored in L2 and L3 under the key without them: a new process finds it there.
    await proxy.settle()
    assert redis_client.exists(redis_key("/p?a=1", origin.url))
    assert sqlite_row(sqlite_path, "/p?a=1", origin.url) is not None
    fresh = await make_proxy(QUERY_IGNORE="utm_*,gclid,fbclid")
    assert (await fresh.get("/p?fbclid=z&a=1")).x_cache == "HIT-L2"

    # Forwarded requests (other methods) lose them as well.
    await proxy.request("POST", "/form?utm_campaign=x&id=4", data=b"x")
    assert origin.requests[-1].path_qs == "/form?id=4"


async def test_sort_changes_the_key_only(origin: Origin, make_proxy: MakeProxy) -> None:
    origin.set_default(headers=CACHEABLE)
    proxy = await make_proxy(QUERY="sort", QUERY_IGNORE="utm_*")

    first = await proxy.get("/s?b=2&utm_x=1&a=1")
    assert first.x_cache == "MISS", first
    assert origin.requests[-1].path_qs == "/s?b=2&a=1"  # the client's order, not the key's
    assert (await proxy.get("/s?a=1&b=2")).x_cache == "HIT-L1"
    assert (await proxy.get("/s?b=2&a=1")).x_cache == "HIT-L1"
    # One name's repetitions keep their order: a different list is a different key.
    assert (await proxy.get("/s?a=1&a=2")).x_cache == "MISS"
    assert (await proxy.get("/s?a=2&a=1")).x_cache == "MISS"
    assert (await proxy.get("/s?a=1&x=0&a=2")).x_cache == "MISS"
    assert (await proxy.get("/s?x=0&a=1&a=2")).x_cache == "HIT-L1"
    assert origin.count("/s") == 4


async def test_keep_is_the_default_and_keys_every_parameter_in_order(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set_default(headers=CACHEABLE)
    proxy = await make_proxy()
    assert (await proxy.get("/k?b=2&a=1")).x_cache == "MISS"
    assert (await proxy.get("/k?a=1&b=2")).x_cache == "MISS"
    assert (await proxy.get("/k?a=1&b=2&utm_source=x")).x_cache == "MISS"
    assert [r.path_qs for r in origin.requests] == [
        "/k?b=2&a=1",
        "/k?a=1&b=2",
        "/k?a=1&b=2&utm_source=x",
    ]


async def test_purge_by_url_uses_the_same_key(
    origin: Origin, make_proxy: MakeProxy, redis_url: str
) -> None:
    origin.set_default(headers=CACHEABLE)
    proxy = await make_proxy(QUERY="sort", QUERY_IGNORE="utm_*", PURGE_TOKEN=TOKEN)
    for path in ("/a?y=1&x=2", "/b?y=1&x=2"):
        assert (await proxy.get(path)).x_cache == "MISS"
    await proxy.settle()

    # PURGE on the proxy port, spelled another way.
    purged = await proxy.request("PURGE", "/a?x=2&utm_id=9&y=1", headers=AUTH)
    assert purged.status == 200, purged
    assert json.loads(purged.body)["key"] == "/a?x=2&y=1"
    assert (await proxy.get("/a?y=1&x=2")).x_cache == "MISS"

    # The admin port's POST /purge, spelled yet another way.
    admin: TestClient[Any, Any] = TestClient(
        TestServer(build_admin_app(proxy.app), host="127.0.0.1")
    )
    await admin.start_server()
    try:
        response = await fetch(
            admin, "POST", "/purge", json={"keys": ["/b?utm_source=q&y=1&x=2"]}, headers=AUTH
        )
    finally:
        await admin.close()
    assert response.status == 200, response
    assert (await proxy.get("/b?x=2&y=1")).x_cache == "MISS"
    assert origin.count("/a") == 2 and origin.count("/b") == 2


async def test_an_unsafe_request_invalidates_the_key_a_get_makes(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set_default(headers=CACHEABLE)
    origin.set("/form", status=303, headers={"Location": "/list?utm_source=form&page=1"})
    proxy = await make_proxy(QUERY="sort", QUERY_IGNORE="utm_*")
    for path in ("/list?page=1", "/item?id=1&v=2"):
        assert (await proxy.get(path)).x_cache == "MISS"
        assert (await proxy.get(path)).x_cache == "HIT-L1"

    assert (await proxy.request("POST", "/form", data=b"x")).status == 303
    assert (await proxy.request("DELETE", "/item?utm_a=1&v=2&id=1")).status == 200

    assert (await proxy.get("/list?page=1")).x_cache == "MISS"
    assert (await proxy.get("/item?id=1&v=2")).x_cache == "MISS"


async def test_a_bad_query_setting_stops_start_up_with_one_line(spawn_proxy: SpawnProxy) -> None:
    for name, value in (("QUERY", "alphabetical"), ("QUERY_IGNORE", "utm_*,gcl id")):
        proc = await spawn_proxy(wait_healthy=False, **{name: value})
        assert await proc.wait(15) == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, proc.stderr
        assert f"TIERPROXY_{name}" in lines[0] and value in lines[0], lines[0]
