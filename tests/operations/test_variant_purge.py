"""Purging a URL that varies: every variant goes, from every tier and every replica - by key
(PURGE, POST /purge, an unsafe method's invalidation) and by surrogate key (tag)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
from support.fixture_types import MakeProxy, SpawnProxy
from support.origin import Origin
from support.proxy import ProxyHandle, SpawnedProxy, fetch
from support.storage import redis_key, redis_tier_keys, sqlite_count, sqlite_row
from support.wait import wait_for_condition

from tierproxy import variants

from .conftest import AUTH, TOKEN, AdminFor, scrape_url, value

VARYING = {"Cache-Control": "max-age=300", "Vary": "Accept-Language"}
LANGUAGES = ("en", "de", "fr")


def _entries_in_redis(redis_client: Any) -> list[bytes]:
    return [key for key in redis_tier_keys(redis_client) if b":tag:" not in key]


def _record(path: str, language: str) -> str:
    return variants.record_material(path, (("accept-language", language),))


async def _all_variants_everywhere(
    proxy: ProxyHandle, path: str, origin: Origin, redis_client: Any, sqlite_path: Path
) -> None:
    for language in LANGUAGES:
        response = await proxy.get(path, headers={"Accept-Language": language})
        assert response.x_cache == "MISS", response
    await proxy.settle()
    for language in LANGUAGES:
        material = _record(path, language)

        def stored(material: str = material) -> bool:
            return bool(redis_client.exists(redis_key(material, origin.url))) and (
                sqlite_row(sqlite_path, material, origin.url) is not None
            )

        await wait_for_condition(stored, message=f"{language} in L2 and L3")
    # three records and the URL's index, in each of L1, L2 and L3
    assert len(proxy.state.tier("l1").backend) == 4
    assert len(_entries_in_redis(redis_client)) == 4
    assert sqlite_count(sqlite_path) == 4


async def _none_left(
    proxy: ProxyHandle, path: str, origin: Origin, redis_client: Any, sqlite_path: Path
) -> None:
    assert len(proxy.state.tier("l1").backend) == 0
    assert _entries_in_redis(redis_client) == []
    assert sqlite_count(sqlite_path) == 0
    for language in LANGUAGES:
        again = await proxy.get(path, headers={"Accept-Language": language})
        assert again.x_cache == "MISS", (language, again)


async def test_purge_of_a_url_removes_every_variant_from_every_tier(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, redis_client: Any, sqlite_path: Path
) -> None:
    origin.set("/lang", headers=VARYING)
    proxy = await make_proxy(PURGE_TOKEN=TOKEN)
    await _all_variants_everywhere(proxy, "/lang", origin, redis_client, sqlite_path)

    response = await proxy.request("PURGE", "/lang", headers=AUTH)

    body = json.loads(response.body)
    assert response.status == 200, body
    assert body["tiers"] == {"l1": 4, "l2": 4, "l3": 4}, body
    await _none_left(proxy, "/lang", origin, redis_client, sqlite_path)
    assert origin.count("/lang") == 6


async def test_tag_purge_removes_every_tagged_variant(
    origin: Origin,
    make_proxy: MakeProxy,
    admin_for: AdminFor,
    redis_url: str,
    redis_client: Any,
    sqlite_path: Path,
) -> None:
    origin.set("/lang", headers={**VARYING, "Surrogate-Key": "catalogue"})
    proxy = await make_proxy(PURGE_TOKEN=TOKEN)
    admin = await admin_for(proxy)
    await _all_variants_everywhere(proxy, "/lang", origin, redis_client, sqlite_path)

    response = await admin.purge({"tags": ["catalogue"]})

    body = json.loads(response.body)
    assert response.status == 200, body
    assert body["tiers"] == {"l1": 3, "l2": 3, "l3": 3}, body  # the records carry the tag
    for language in LANGUAGES:
        again = await proxy.get("/lang", headers={"Accept-Language": language})
        assert again.x_cache == "MISS", (language, again)


async def test_an_unsafe_method_invalidates_every_variant(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, redis_client: Any, sqlite_path: Path
) -> None:
    origin.set("/lang", headers=VARYING)
    proxy = await make_proxy()
    await _all_variants_everywhere(proxy, "/lang", origin, redis_client, sqlite_path)

    assert (await proxy.request("POST", "/lang", data=b"x")).x_cache == "BYPASS"
    await proxy.settle()

    await _none_left(proxy, "/lang", origin, redis_client, sqlite_path)


async def _ready(proc: SpawnedProxy) -> None:
    async def subscribed() -> bool:
        async with (
            aiohttp.ClientSession() as session,
            session.get(proc.admin_url + "/readyz") as resp,
        ):
            return bool((await resp.json())["invalidation"] == "connected")

    await wait_for_condition(subscribed, timeout=10, message=f"{proc.url} subscribed")


async def test_a_purge_on_one_replica_removes_every_variant_from_the_others(
    origin: Origin, spawn_proxy: SpawnProxy, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    origin.set("/lang", headers=VARYING)
    a = await spawn_proxy(PURGE_TOKEN=TOKEN, SQLITE_PATH=str(tmp_path / "a.sqlite3"))
    b = await spawn_proxy(PURGE_TOKEN=TOKEN, SQLITE_PATH=str(tmp_path / "b.sqlite3"))
    await _ready(a)
    await _ready(b)
    async with aiohttp.ClientSession() as session:
        for language in LANGUAGES:  # B fetches each variant: in B's L1, L3 and in L2
            got = await fetch(
                session, "GET", b.url + "/lang", headers={"Accept-Language": language}
            )
            assert got.x_cache == "MISS", got

        async def b_holds_all() -> bool:
            m = await scrape_url(b.admin_url)
            return value(m, "tierproxy_l3_entries") == 4 and value(m, "tierproxy_l1_entries") == 4

        await wait_for_condition(b_holds_all, message="B's L1 and L3 hold every variant")

        purge = await fetch(session, "PURGE", a.url + "/lang", headers=AUTH)
        body = json.loads(purge.body)
        assert purge.status == 200 and body["replicas_acked"] == 2, body

        async def b_emptied() -> bool:
            m = await scrape_url(b.admin_url)
            return value(m, "tierproxy_l1_entries") == 0 and value(m, "tierproxy_l3_entries") == 0

        await wait_for_condition(b_emptied, message="B's L1 and L3 purged of every variant")
        assert redis_tier_keys(redis_client) == []
        for language in LANGUAGES:
            got = await fetch(
                session, "GET", b.url + "/lang", headers={"Accept-Language": language}
            )
            assert got.x_cache == "MISS", (language, got)


async def test_a_soft_purge_marks_every_variant_stale(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, redis_client: Any, sqlite_path: Path
) -> None:
    origin.set("/lang", headers=VARYING, etag='"v1"', honor_if_none_match=True)
    proxy = await make_proxy(PURGE_TOKEN=TOKEN)
    await _all_variants_everywhere(proxy, "/lang", origin, redis_client, sqlite_path)

    response = await proxy.request("PURGE", "/lang", headers={**AUTH, "Soft-Purge": "1"})

    body = json.loads(response.body)
    assert response.status == 200, body
    assert body["tiers"] == {"l1": 3, "l2": 3, "l3": 3}, body  # the records; the index stays
    for language in LANGUAGES:
        again = await proxy.get("/lang", headers={"Accept-Language": language})
        assert again.x_cache == "REVALIDATED", (language, again)
        conditional = origin.requests_for("/lang")[-1].headers
        assert conditional.get("Accept-Language") == language
        assert conditional.get("If-None-Match") == '"v1"'
    assert origin.count("/lang") == 6
