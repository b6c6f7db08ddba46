"""Vary with many variants per URL (RFC 9111 §4.1), through the real proxy, origin, Redis and
SQLite: every variant kept in every tier and read back by a fresh process, the per-URL bound,
normalised request values, and never another variant's body."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.fixture_types import MakeProxy, SpawnProxy
from support.origin import Origin
from support.proxy import Fetched, ProxyHandle, fetch
from support.storage import key_id, redis_key, sqlite_row
from support.wait import wait_for_condition

from tierproxy import variants

VARYING = {"Cache-Control": "max-age=300", "Vary": "Accept-Language"}
LANGUAGES = ("en", "de", "fr")
L2_ONLY: dict[str, Any] = {"L1_MAX_BYTES": 0, "SQLITE_PATH": "off"}
L3_ONLY: dict[str, Any] = {"L1_MAX_BYTES": 0, "REDIS_URL": None}
L1_ONLY: dict[str, Any] = {"REDIS_URL": None, "SQLITE_PATH": "off"}


def _record(path: str, language: str) -> str:
    """The key material of ``path``'s variant for ``Accept-Language: language``."""
    return variants.record_material(path, (("accept-language", language),))


def _asked_by(origin: Origin, path: str, response: Fetched) -> str:
    """The Accept-Language of the origin request whose answer ``response`` carries (the test
    origin's default body names its request number for the target)."""
    match = re.fullmatch(rb"origin body for .* \(request (\d+)\)", response.body)
    assert match is not None, response
    asked = origin.requests_for(path)[int(match.group(1)) - 1].headers
    return asked.get("Accept-Language", "")


async def _get(proxy: ProxyHandle, path: str, language: str) -> Fetched:
    return await proxy.get(path, headers={"Accept-Language": language})


async def _stored_in_l2_and_l3(
    path: str, languages: tuple[str, ...], origin: Origin, redis_client: Any, sqlite_path: Path
) -> None:
    for language in languages:
        material = _record(path, language)

        def in_redis(material: str = material) -> bool:
            return bool(redis_client.exists(redis_key(material, origin.url)))

        def in_sqlite(material: str = material) -> bool:
            return sqlite_row(sqlite_path, material, origin.url) is not None

        await wait_for_condition(in_redis, message=f"{language} in Redis")
        await wait_for_condition(in_sqlite, message=f"{language} in L3")


async def test_three_languages_are_kept_at_once_and_served_from_every_tier(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, redis_client: Any, sqlite_path: Path
) -> None:
    origin.set("/lang", headers=VARYING)
    proxy = await make_proxy()
    bodies: dict[str, bytes] = {}
    for language in LANGUAGES:
        first = await _get(proxy, "/lang", language)
        assert first.x_cache == "MISS", first
        assert _asked_by(origin, "/lang", first) == language
        bodies[language] = first.body
    assert len(set(bodies.values())) == 3

    for language in LANGUAGES:  # all three at once in L1, none pushed out by another
        hit = await _get(proxy, "/lang", language)
        assert (hit.x_cache, hit.body) == ("HIT-L1", bodies[language]), (language, hit)
    assert origin.count("/lang") == 3
    await proxy.settle()
    await _stored_in_l2_and_l3("/lang", LANGUAGES, origin, redis_client, sqlite_path)

    # Fresh processes (no L1): each variant read back from L2 alone, then from L3 alone.
    for env, label in ((L2_ONLY, "HIT-L2"), (L3_ONLY, "HIT-L3")):
        fresh = await make_proxy(**env)
        for language in LANGUAGES:
            hit = await _get(fresh, "/lang", language)
            assert (hit.x_cache, hit.body) == (label, bodies[language]), (label, language, hit)
        # the same request spelled otherwise gets the same variant
        spelled = await _get(fresh, "/lang", " DE ")
        assert (spelled.x_cache, spelled.body) == (label, bodies["de"]), spelled
        await fresh.close()
    assert origin.count("/lang") == 3

    other = await _get(proxy, "/lang", "it")  # a language never asked for: the origin's
    assert other.x_cache == "MISS", other
    assert _asked_by(origin, "/lang", other) == "it"


async def test_accept_language_is_normalised_and_resolved_against_content_language(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/sel", headers={**VARYING, "Content-Language": "de"})
    proxy = await make_proxy()
    stored = await _get(proxy, "/sel", "en, de")
    assert stored.x_cache == "MISS", stored
    for asked in ("de, en", "eN, De", " en ,   de", "fr;q=0.5, de;q=1.0", "de"):
        hit = await _get(proxy, "/sel", asked)
        assert (hit.x_cache, hit.body) == ("HIT-L1", stored.body), (asked, hit)
    # de not the first preference: the origin decides
    assert (await _get(proxy, "/sel", "en")).x_cache == "MISS"
    assert (await _get(proxy, "/sel", "fr, de")).x_cache == "MISS"
    assert origin.count("/sel") == 3


async def test_accept_language_order_and_subtags_are_kept(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """An origin without Content-Language may answer in the first language listed (as common
    frameworks do), and one with en-GB may have en too: neither is served for the other."""
    origin.set("/first", headers=VARYING)
    proxy = await make_proxy()
    assert (await _get(proxy, "/first", "fr, de")).x_cache == "MISS"
    reordered = await _get(proxy, "/first", "de, fr")
    assert reordered.x_cache == "MISS", reordered
    assert _asked_by(origin, "/first", reordered) == "de, fr"
    assert (await _get(proxy, "/first", "FR ,de")).x_cache == "HIT-L1"
    origin.set("/gb", headers={**VARYING, "Content-Language": "en-GB"})
    assert (await _get(proxy, "/gb", "en-GB")).x_cache == "MISS"
    assert (await _get(proxy, "/gb", "en")).x_cache == "MISS"
    assert (await _get(proxy, "/gb", "*")).x_cache == "MISS"
    assert origin.count("/gb") == 3


async def test_the_bound_drops_the_least_recently_used_variant_in_l1(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/few", headers=VARYING)
    proxy = await make_proxy(MAX_VARIANTS=2, **L1_ONLY)
    for language in ("en", "de"):
        assert (await _get(proxy, "/few", language)).x_cache == "MISS"
    assert (await _get(proxy, "/few", "en")).x_cache == "HIT-L1"  # en used after de
    assert (await _get(proxy, "/few", "fr")).x_cache == "MISS"  # de, least recently used, out

    assert (await _get(proxy, "/few", "en")).x_cache == "HIT-L1"
    assert (await _get(proxy, "/few", "fr")).x_cache == "HIT-L1"
    again = await _get(proxy, "/few", "de")
    assert again.x_cache == "MISS", again
    assert origin.count("/few") == 4
    l1 = proxy.state.tier("l1").backend
    assert l1.get_now(proxy.state.keys.key(_record("/few", "en"))) is None  # en dropped now
    index = l1.get_now(proxy.state.keys.key("/few"))
    assert index is not None and len(index.variants) == 2


async def test_the_bound_drops_the_least_recently_stored_variant_in_l2_and_l3(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, redis_client: Any, sqlite_path: Path
) -> None:
    origin.set("/few", headers=VARYING)
    proxy = await make_proxy(MAX_VARIANTS=2)
    for language in LANGUAGES:
        assert (await _get(proxy, "/few", language)).x_cache == "MISS"
    await proxy.settle()
    await _stored_in_l2_and_l3("/few", ("de", "fr"), origin, redis_client, sqlite_path)
    assert not redis_client.exists(redis_key(_record("/few", "en"), origin.url))
    assert sqlite_row(sqlite_path, _record("/few", "en"), origin.url) is None

    for env, label in ((L2_ONLY, "HIT-L2"), (L3_ONLY, "HIT-L3")):
        fresh = await make_proxy(MAX_VARIANTS=2, **env)
        assert (await _get(fresh, "/few", "fr")).x_cache == label
        assert (await _get(fresh, "/few", "de")).x_cache == label
        assert (await _get(fresh, "/few", "en")).x_cache == "MISS"
        await fresh.close()


async def test_concurrent_misses_for_different_variants_each_get_their_own(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/slow", headers=VARYING, latency=0.2)
    proxy = await make_proxy()
    asked = [language for language in LANGUAGES for _ in range(3)]

    responses = await asyncio.gather(*(_get(proxy, "/slow", language) for language in asked))

    for language, response in zip(asked, responses, strict=True):
        assert response.status == 200, response
        assert _asked_by(origin, "/slow", response) == language, (language, response)
    assert origin.count("/slow") == 3  # one fetch per variant, shared by its own requests


async def test_a_record_under_another_variants_key_is_never_served(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, redis_client: Any, sqlite_path: Path
) -> None:
    """Tampered storage: the de variant's record copied over the en variant's in L2 and L3.
    A record carries its key material: a miss, never de's body for en."""
    origin.set("/swap", headers=VARYING)
    proxy = await make_proxy()
    en = await _get(proxy, "/swap", "en")
    de = await _get(proxy, "/swap", "de")
    await proxy.settle()
    await _stored_in_l2_and_l3("/swap", ("en", "de"), origin, redis_client, sqlite_path)
    en_id, de_id = (key_id(_record("/swap", lang), origin.url) for lang in ("en", "de"))
    redis_client.set(
        redis_key(_record("/swap", "en"), origin.url),
        redis_client.get(redis_key(_record("/swap", "de"), origin.url)),
    )
    with sqlite3.connect(sqlite_path) as db:
        db.execute(
            "UPDATE entries SET value = (SELECT value FROM entries WHERE key = ?) WHERE key = ?",
            (de_id, en_id),
        )

    for env in (L2_ONLY, L3_ONLY):
        fresh = await make_proxy(**env)
        answer = await _get(fresh, "/swap", "en")
        assert answer.x_cache == "MISS", answer
        assert answer.body != de.body and _asked_by(origin, "/swap", answer) == "en"
        assert (await _get(fresh, "/swap", "de")).body == de.body
        await fresh.close()
    assert en.body != de.body


async def test_vary_star_is_never_stored(origin: Origin, make_proxy: MakeProxy) -> None:
    origin.set("/star", headers={"Cache-Control": "max-age=300", "Vary": "Accept-Language, *"})
    proxy = await make_proxy()
    for _ in range(2):
        response = await _get(proxy, "/star", "en")
        assert response.x_cache != "HIT-L1", response
    assert origin.count("/star") == 2


async def test_a_url_that_stops_varying_is_served_its_new_single_copy(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/turn", headers=VARYING)
    proxy = await make_proxy(**L1_ONLY)
    assert (await _get(proxy, "/turn", "en")).x_cache == "MISS"
    origin.set("/turn", headers={"Cache-Control": "max-age=300"})
    latest = await _get(proxy, "/turn", "fr")
    assert latest.x_cache == "MISS", latest
    for language in ("en", "de", "fr"):
        hit = await _get(proxy, "/turn", language)
        assert (hit.x_cache, hit.body) == ("HIT-L1", latest.body), hit


async def test_a_tier_that_lost_its_index_is_filled_again_from_the_next_tier(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, redis_client: Any, sqlite_path: Path
) -> None:
    """L2's variant index gone (evicted, or a lost update between replicas) while L3 still
    lists every variant: each language comes from L3 with its own body, and L2 lists it again."""
    origin.set("/idx", headers=VARYING)
    proxy = await make_proxy()
    bodies = {language: (await _get(proxy, "/idx", language)).body for language in LANGUAGES}
    await proxy.settle()
    await _stored_in_l2_and_l3("/idx", LANGUAGES, origin, redis_client, sqlite_path)
    assert redis_client.delete(redis_key("/idx", origin.url)) == 1  # the index only

    # (the same process: a new one with Redis would revalidate L3 copies it cannot know were
    # not purged meanwhile, see LocalTrust)
    proxy.state.tier("l1").clear()
    for language in LANGUAGES:
        hit = await _get(proxy, "/idx", language)
        assert (hit.x_cache, hit.body) == ("HIT-L3", bodies[language]), (language, hit)
    await proxy.settle()
    again = await make_proxy(**L2_ONLY)
    for language in LANGUAGES:
        hit = await _get(again, "/idx", language)
        assert (hit.x_cache, hit.body) == ("HIT-L2", bodies[language]), (language, hit)
    assert origin.count("/idx") == 3


async def test_cold_misses_for_many_variants_are_fetched_side_by_side(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """8 languages x 3 clients at once on a cold URL, origin 0.4 s, deadline 2.5 s: one after
    the other the fetches would take 3.2 s. Once the first answer says the URL varies, each
    variant is its own single flight: every client gets its own language in time, and the
    origin sees one fetch per language."""
    languages = ("en", "de", "fr", "it", "es", "nl", "pt", "pl")
    origin.set("/many", headers=VARYING, latency=0.4)
    proxy = await make_proxy(REQUEST_DEADLINE=2.5, ORIGIN_TIMEOUT=2)
    asked = [language for language in languages for _ in range(3)]

    responses = await asyncio.gather(*(_get(proxy, "/many", language) for language in asked))

    for language, response in zip(asked, responses, strict=True):
        assert response.status == 200, (language, response)
        assert _asked_by(origin, "/many", response) == language, (language, response)
    assert origin.count("/many") == len(languages)
    assert origin.peak_concurrency("/many") > 1


async def test_every_variant_survives_a_restart_in_l2_and_l3(
    origin: Origin, spawn_proxy: SpawnProxy, redis_url: str, redis_client: Any, sqlite_path: Path
) -> None:
    """A real process stores three languages and stops (SIGTERM drains its writes); new
    processes read each back from L3 alone and from L2 alone, each with its own body."""
    origin.set("/restart", headers=VARYING)
    first = await spawn_proxy()
    async with aiohttp.ClientSession() as session:
        bodies: dict[str, bytes] = {}
        for language in LANGUAGES:
            got = await fetch(
                session, "GET", first.url + "/restart", headers={"Accept-Language": language}
            )
            assert got.x_cache == "MISS", got
            bodies[language] = got.body
        await _stored_in_l2_and_l3("/restart", LANGUAGES, origin, redis_client, sqlite_path)
        first.terminate()
        assert await first.wait() == 0, first.stderr

        for env, label in ((L3_ONLY, "HIT-L3"), (L2_ONLY, "HIT-L2")):
            again = await spawn_proxy(**env)
            for language in LANGUAGES:
                got = await fetch(
                    session, "GET", again.url + "/restart", headers={"Accept-Language": language}
                )
                assert (got.x_cache, got.body) == (label, bodies[language]), (label, got)
            again.terminate()
            await again.wait()
    assert origin.count("/restart") == 3


@pytest.mark.parametrize("field", ["X-Forwarded-Proto", "X-Forwarded-For", "X-Real-IP", "Via"])
async def test_a_response_varying_on_a_field_the_proxy_rewrites_is_not_stored(
    field: str, origin: Origin, make_proxy: MakeProxy
) -> None:
    """The origin saw the proxy's value of the field (set or dropped by the proxy), not the
    client's: a variant keyed on the client's would be served to clients the origin would
    have answered otherwise (an http redirect to https clients, one client IP's answer)."""
    origin.set("/rw", headers={"Cache-Control": "max-age=300", "Vary": f"{field}, Accept"})
    proxy = await make_proxy()
    for _ in range(2):
        got = await proxy.get("/rw")
        assert got.status == 200 and got.x_cache == "BYPASS", got
    assert origin.count("/rw") == 2


async def test_a_variant_chosen_by_very_long_values_is_not_stored(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """Each variant's request values are kept in its URL's index, read on every L2/L3
    lookup of the URL: values over 1 KiB are not stored (the answer is still served)."""
    origin.set("/long", headers=VARYING)
    proxy = await make_proxy()
    huge = ", ".join(f"x{i:04d}" for i in range(300))  # ~2 KiB
    for _ in range(2):
        got = await _get(proxy, "/long", huge)
        assert got.status == 200 and got.x_cache == "BYPASS", got
    assert (await _get(proxy, "/long", "en")).x_cache == "MISS"
    assert (await _get(proxy, "/long", "en")).x_cache == "HIT-L1"
    assert origin.count("/long") == 3
