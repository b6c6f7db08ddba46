"""Purge: PURGE on the proxy listener and POST /purge on the admin listener, by key and by
surrogate key (tag), hard and soft, across L1, L2 and L3.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from support.clock import SteppedClock
from support.fixture_types import MakeProxy
from support.origin import Origin
from support.proxy import Fetched, ProxyHandle
from support.redis_server import RedisServer
from support.storage import key_id, redis_key, redis_tag_key, sqlite_row, tag_id
from support.wait import wait_for_condition

from .conftest import AUTH, TOKEN, AdminFor, by_label

CACHEABLE = {"Cache-Control": "max-age=300"}


async def _stored_everywhere(
    proxy: ProxyHandle, path: str, redis_client: Any, sqlite_path: Path
) -> None:
    await proxy.settle()
    assert proxy.state.tier("l1").backend.get_now(proxy.state.keys.key(path)) is not None
    await wait_for_condition(
        lambda: redis_client.exists(redis_key(path, proxy.settings.origin)), message="L2"
    )
    await wait_for_condition(
        lambda: sqlite_row(sqlite_path, path, proxy.settings.origin), message="L3"
    )


def _in_l1(proxy: ProxyHandle, path: str) -> Any:
    return proxy.state.tier("l1").backend.get_now(proxy.state.keys.key(path))


# ---- PURGE <path> ------------------------------------------------------------------------


async def test_purge_is_405_without_a_configured_token(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy()
    response = await proxy.request("PURGE", "/a", headers=AUTH)
    assert response.status == 405, response
    assert origin.count() == 0


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        f"bearer {TOKEN}",
        TOKEN,
        f"Basic {TOKEN}",
    ],
)
async def test_purge_with_a_missing_or_wrong_token_is_401_with_no_hint(
    authorization: str | None, origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/a", headers=CACHEABLE)
    proxy = await make_proxy(PURGE_TOKEN=TOKEN)
    assert (await proxy.get("/a")).x_cache == "MISS"
    headers = {} if authorization is None else {"Authorization": authorization}

    response = await proxy.request("PURGE", "/a", headers=headers)

    assert response.status == 401, response
    assert response.body == b"401 unauthorized\n"  # the same answer whatever was wrong
    assert (await proxy.get("/a")).x_cache == "HIT-L1"


async def test_token_is_compared_in_constant_time(
    origin: Origin, make_proxy: MakeProxy, admin_for: AdminFor, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = hmac.compare_digest

    def recording_compare_digest(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording_compare_digest)
    proxy = await make_proxy(PURGE_TOKEN=TOKEN)
    admin = await admin_for(proxy)

    assert (
        await proxy.request("PURGE", "/a", headers={"Authorization": "Bearer nope"})
    ).status == 401
    assert (
        await admin.purge({"keys": ["/a"]}, headers={"Authorization": "Bearer no"})
    ).status == 401
    assert (await proxy.request("PURGE", "/a", headers=AUTH)).status == 200

    assert calls == [
        (b"Bearer nope", f"Bearer {TOKEN}".encode()),
        (b"Bearer no", f"Bearer {TOKEN}".encode()),
        (f"Bearer {TOKEN}".encode(), f"Bearer {TOKEN}".encode()),
    ]


async def test_purge_removes_the_key_from_every_tier_and_answers_a_json_count(
    origin: Origin,
    make_proxy: MakeProxy,
    admin_for: AdminFor,
    redis_url: str,
    redis_client: Any,
    sqlite_path: Path,
) -> None:
    origin.set("/p", headers=CACHEABLE)
    origin.set("/keep", headers=CACHEABLE)
    proxy = await make_proxy(PURGE_TOKEN=TOKEN)
    admin = await admin_for(proxy)
    for path in ("/p", "/keep"):
        assert (await proxy.get(path)).x_cache == "MISS"
        await _stored_everywhere(proxy, path, redis_client, sqlite_path)

    response = await proxy.request("PURGE", "/p", headers=AUTH)

    assert response.status == 200, response
    assert response.headers["Content-Type"].startswith("application/json")
    body = json.loads(response.body)
    assert body["key"] == "/p"
    assert body["purged"] == 3
    assert body["tiers"] == {"l1": 1, "l2": 1, "l3": 1}
    assert body["soft"] is False
    assert body["replicas_acked"] == 1 and body["replicas_fenced"] == 0  # this proxy alone
    assert _in_l1(proxy, "/p") is None
    assert not redis_client.exists(redis_key("/p", origin.url))
    assert sqlite_row(sqlite_path, "/p", origin.url) is None
    assert _in_l1(proxy, "/keep") is not None and redis_client.exists(
        redis_key("/keep", origin.url)
    )
    assert sqlite_row(sqlite_path, "/keep", origin.url) is not None
    # Purging again finds nothing; the next GET goes to the origin.
    again = json.loads((await proxy.request("PURGE", "/p", headers=AUTH)).body)
    assert again["purged"] == 0 and again["tiers"] == {"l1": 0, "l2": 0, "l3": 0}
    assert (await proxy.get("/p")).x_cache == "MISS"
    assert origin.count("/p") == 2
    m = await admin.metrics()
    assert by_label(m, "tierproxy_purge_requests_total", "outcome", source="proxy") == {"ok": 2}
    assert by_label(m, "tierproxy_purged_entries_total", "tier", mode="hard") == {
        "l1": 1,
        "l2": 1,
        "l3": 1,
    }


async def test_purge_removes_every_vary_variant_and_head_reads_the_same_key(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, redis_client: Any, sqlite_path: Path
) -> None:
    origin.set("/v", headers={**CACHEABLE, "Vary": "Accept-Encoding"})
    proxy = await make_proxy(PURGE_TOKEN=TOKEN)
    assert (await proxy.get("/v", headers={"Accept-Encoding": "gzip"})).x_cache == "MISS"
    await _stored_everywhere(proxy, "/v", redis_client, sqlite_path)
    assert (await proxy.request("PURGE", "/v", headers=AUTH)).status == 200

    for encoding in ("gzip", "br", "identity"):
        response = await proxy.get("/v", headers={"Accept-Encoding": encoding})
        assert response.x_cache == "MISS", (encoding, response)
        assert (await proxy.request("PURGE", "/v", headers=AUTH)).status == 200
    assert (await proxy.head("/v")).x_cache == "MISS"


async def test_purge_normalises_the_path_like_a_request(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/a b", headers=CACHEABLE)
    proxy = await make_proxy(PURGE_TOKEN=TOKEN, REDIS_URL=None, SQLITE_PATH="off")
    assert (await proxy.get("/%7Euser/./x?q=%41")).x_cache == "MISS"
    response = await proxy.request("PURGE", "/~user/x?q=A", headers=AUTH)
    assert json.loads(response.body)["tiers"] == {"l1": 1}


async def test_soft_purge_keeps_the_copy_for_stale_on_error_and_revalidation(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, redis_client: Any, sqlite_path: Path
) -> None:
    origin.set("/soft", headers=CACHEABLE, etag='"v1"', honor_if_none_match=True)
    proxy = await make_proxy(PURGE_TOKEN=TOKEN)
    first = await proxy.get("/soft")
    await _stored_everywhere(proxy, "/soft", redis_client, sqlite_path)

    response = await proxy.request("PURGE", "/soft", headers={**AUTH, "Soft-Purge": "1"})

    body = json.loads(response.body)
    assert response.status == 200 and body["soft"] is True, body
    assert body["tiers"] == {"l1": 1, "l2": 1, "l3": 1}
    # Still in every tier but no longer fresh; with the origin failing each tier serves it stale.
    origin.set("/soft", status=500)
    views = {
        "L1": proxy,  # its L1 answers first
        "L2": await make_proxy(L1_MAX_BYTES=0, SQLITE_PATH="off"),
        "L3": await make_proxy(L1_MAX_BYTES=0, REDIS_URL=None),
    }
    for tier, view in views.items():
        stale = await view.get("/soft")
        assert stale.x_cache == f"STALE-{tier}", stale  # stale-on-error still works
        assert stale.body == first.body
    origin.set("/soft", headers=CACHEABLE, etag='"v1"', honor_if_none_match=True)
    revalidated = await proxy.get("/soft")
    assert revalidated.x_cache == "REVALIDATED", revalidated
    assert origin.requests_for("/soft")[-1].headers.get("If-None-Match") == '"v1"'
    assert (await proxy.get("/soft")).x_cache == "HIT-L1"


# ---- POST /purge on the admin listener ------------------------------------------------------


async def test_admin_purge_requires_the_token(make_proxy: MakeProxy, admin_for: AdminFor) -> None:
    off = await admin_for(await make_proxy())
    assert (await off.purge({"keys": ["/a"]})).status == 405
    on = await admin_for(await make_proxy(PURGE_TOKEN=TOKEN))
    assert (await on.purge({"keys": ["/a"]}, headers={})).status == 401
    assert (await on.purge({"keys": ["/a"]}, headers={"Authorization": "Bearer x"})).status == 401
    assert (await on.request("GET", "/purge", headers=AUTH)).status == 405


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"keys": "/a"}',
        b'{"keys": [1]}',
        b'{"tags": ["a b"]}',
        b'{"tags": [""]}',
        b'{"keys": ["/a"], "soft": "yes"}',
        b"{}",
        b'{"keys": ["a"]}',
        b'{"keys": ["/a"], "extra": 1}',
        b'{"keys": ["/a#frag"]}',
    ],
)
async def test_admin_purge_rejects_a_bad_body_with_400(
    body: bytes, make_proxy: MakeProxy, admin_for: AdminFor
) -> None:
    admin = await admin_for(await make_proxy(PURGE_TOKEN=TOKEN))
    response = await admin.request(
        "POST", "/purge", data=body, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status == 400, response
    assert "error" in json.loads(response.body)


async def test_admin_purge_by_keys(
    origin: Origin,
    make_proxy: MakeProxy,
    admin_for: AdminFor,
    redis_url: str,
    redis_client: Any,
    sqlite_path: Path,
) -> None:
    origin.set_default(headers=CACHEABLE)
    proxy = await make_proxy(PURGE_TOKEN=TOKEN)
    admin = await admin_for(proxy)
    for path in ("/k1", "/k2?x=1", "/k3"):
        await proxy.get(path)
        await _stored_everywhere(proxy, path, redis_client, sqlite_path)

    response = await admin.purge({"keys": ["/k1", "/k2?x=%31", "/nothing"]})

    body = json.loads(response.body)
    assert response.status == 200, body
    assert body["tiers"] == {"l1": 2, "l2": 2, "l3": 2} and body["purged"] == 6
    assert body["keys"] == 3 and body["tags"] == 0
    assert [(await proxy.get(p)).x_cache for p in ("/k1", "/k2?x=1", "/k3")] == [
        "MISS",
        "MISS",
        "HIT-L1",
    ]


async def test_tag_purge_removes_1000_tagged_entries_from_every_tier(
    origin: Origin,
    make_proxy: MakeProxy,
    admin_for: AdminFor,
    redis_url: str,
    redis_client: Any,
    sqlite_path: Path,
) -> None:
    origin.set_default(headers={**CACHEABLE, "Surrogate-Key": "bulk  catalogue"})
    for i in range(10):
        origin.set(f"/other/{i}", headers={**CACHEABLE, "Surrogate-Key": "other"})
    # Writes get time to spare: this tests purging, not write timeouts on a busy machine.
    proxy = await make_proxy(
        PURGE_TOKEN=TOKEN, BACKFILL_MAX_TASKS=5000, L2_WRITE_TIMEOUT=5, L3_WRITE_TIMEOUT=5
    )
    admin = await admin_for(proxy)
    bulk = [f"/bulk/{i}?page={i % 7}" for i in range(1000)]
    others = [f"/other/{i}" for i in range(10)]
    limit = asyncio.Semaphore(25)

    async def get(path: str) -> Fetched:
        async with limit:
            response = await proxy.get(path)
            assert response.x_cache == "MISS", response
            assert "Surrogate-Key" not in response.headers  # never shown to clients
            return response

    await asyncio.gather(*(get(p) for p in bulk + others))
    await proxy.settle(timeout=30)

    l1 = proxy.state.tier("l1").backend
    assert l1.tagged("bulk") == 1000 and l1.tagged("other") == 10
    assert redis_client.scard(redis_tag_key("bulk", origin.url)) == 1000
    assert redis_client.pttl(redis_tag_key("bulk", origin.url)) >= max(
        redis_client.pttl(redis_key(p, origin.url)) for p in bulk[:50]
    )
    with sqlite3.connect(sqlite_path) as db:
        indexed = db.execute(
            "SELECT COUNT(*) FROM tags WHERE tag = ?", (tag_id("bulk", origin.url),)
        ).fetchone()[0]
    assert indexed == 1000

    response = await admin.purge({"tags": ["bulk"]})

    body = json.loads(response.body)
    assert response.status == 200, body
    assert body["tiers"] == {"l1": 1000, "l2": 1000, "l3": 1000}, body
    assert l1.tagged("bulk") == 0 and l1.tagged("catalogue") == 0
    assert len(l1) == 10
    assert not redis_client.exists(redis_tag_key("bulk", origin.url))
    assert not any(redis_client.exists(redis_key(p, origin.url)) for p in bulk)
    assert all(redis_client.exists(redis_key(p, origin.url)) for p in others)
    with sqlite3.connect(sqlite_path) as db:
        left = {row[0] for row in db.execute("SELECT key FROM entries")}
        tag_rows = db.execute("SELECT COUNT(*) FROM tags").fetchone()[0]
    assert left == {key_id(p, origin.url) for p in others}
    assert tag_rows == 10  # the trigger removed the purged entries' rows
    assert (await proxy.get(bulk[0])).x_cache == "MISS"
    assert (await proxy.get(others[0])).x_cache == "HIT-L1"


async def test_soft_tag_purge_marks_tagged_entries_stale_in_every_tier(
    origin: Origin,
    make_proxy: MakeProxy,
    admin_for: AdminFor,
    redis_url: str,
    redis_client: Any,
    sqlite_path: Path,
) -> None:
    origin.set_default(headers={**CACHEABLE, "Surrogate-Key": "news"})
    proxy = await make_proxy(PURGE_TOKEN=TOKEN)
    admin = await admin_for(proxy)
    paths = [f"/n{i}" for i in range(20)]
    for path in paths:
        await proxy.get(path)
    await proxy.settle()
    for path in paths:
        await _stored_everywhere(proxy, path, redis_client, sqlite_path)

    body = json.loads((await admin.purge({"tags": ["news"], "soft": True})).body)

    assert body["tiers"] == {"l1": 20, "l2": 20, "l3": 20}, body
    assert redis_client.exists(redis_tag_key("news", origin.url))  # soft: entries and index stay
    origin.set_default(status=502)
    for tiers in (
        {},
        {"L1_MAX_BYTES": 0, "SQLITE_PATH": "off"},
        {"L1_MAX_BYTES": 0, "REDIS_URL": None},
    ):
        view = await make_proxy(**tiers) if tiers else proxy
        response = await view.get(paths[3])
        assert (response.x_cache or "").startswith("STALE-"), (tiers, response)


async def test_tag_sets_in_redis_are_pruned_of_entries_that_are_gone(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, redis_client: Any
) -> None:
    origin.set_default(headers={**CACHEABLE, "Surrogate-Key": "churn"})
    proxy = await make_proxy(L1_MAX_BYTES=0, SQLITE_PATH="off")
    first = [f"/c{i}" for i in range(200)]
    for path in first:
        await proxy.get(path)
    await proxy.settle()
    assert redis_client.scard(redis_tag_key("churn", origin.url)) == 200
    gone = first[:150]
    redis_client.delete(*(redis_key(p, origin.url) for p in gone))  # as if evicted or expired

    for i in range(60):  # each tagged write samples the set and drops members that are gone
        await proxy.get(f"/later{i}")
    await proxy.settle()

    members = {m.decode() for m in redis_client.smembers(redis_tag_key("churn", origin.url))}
    live = {key_id(p, origin.url) for p in first[150:]} | {
        key_id(f"/later{i}", origin.url) for i in range(60)
    }
    assert live <= members  # a live entry is never dropped from its tag
    assert len(members) - len(live) < 75, len(members)  # most of the 150 dead ones pruned


async def test_surrogate_tags_are_capped_per_entry(origin: Origin, make_proxy: MakeProxy) -> None:
    many = " ".join(f"t{i}" for i in range(200)) + " " + "x" * 2000
    origin.set("/many", headers={**CACHEABLE, "Surrogate-Key": many})
    proxy = await make_proxy(REDIS_URL=None, SQLITE_PATH="off")
    await proxy.get("/many")
    entry = proxy.state.tier("l1").backend.get_now(proxy.state.keys.key("/many"))
    assert entry.tags == tuple(f"t{i}" for i in range(64))


async def test_a_fetch_that_began_before_a_purge_is_not_stored_after_it(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/race", headers=CACHEABLE, hang=True)
    proxy = await make_proxy(PURGE_TOKEN=TOKEN, REDIS_URL=None, SQLITE_PATH="off")
    pending = asyncio.create_task(proxy.get("/race"))
    await wait_for_condition(lambda: origin.count("/race") == 1, message="fetch started")
    assert (await proxy.request("PURGE", "/race", headers=AUTH)).status == 200
    origin.release()
    response = await pending
    assert response.status == 200 and response.x_cache == "MISS"
    assert _in_l1(proxy, "/race") is None
    assert (await proxy.get("/race")).x_cache == "MISS"


async def test_a_purge_of_another_key_does_not_stop_a_fetch_in_flight_from_being_stored(
    origin: Origin, make_proxy: MakeProxy, admin_for: AdminFor
) -> None:
    # Found by the origin-outage scenario: a purge of one key used to keep every copy fetched
    # meanwhile out of the cache, so such a key had no stale copy in a later origin outage.
    origin.set("/inflight", headers=CACHEABLE, hang=True)
    origin.set("/other", headers={**CACHEABLE, "Surrogate-Key": "other-tag"})
    proxy = await make_proxy(PURGE_TOKEN=TOKEN, REDIS_URL=None)
    admin = await admin_for(proxy)
    await proxy.get("/other")
    pending = asyncio.create_task(proxy.get("/inflight"))
    await wait_for_condition(lambda: origin.count("/inflight") == 1, message="fetch started")
    assert (await proxy.request("PURGE", "/other", headers=AUTH)).status == 200
    response = await admin.purge({"keys": ["/unrelated/1", "/unrelated/2"]})
    assert response.status == 200, response
    origin.release()
    assert (await pending).x_cache == "MISS"
    assert _in_l1(proxy, "/inflight") is not None
    await proxy.settle()
    assert (await proxy.get("/inflight")).x_cache == "HIT-L1"

    # A purge by tag may touch any key: a copy fetched meanwhile is not stored.
    origin.set("/inflight-2", headers=CACHEABLE, hang=True)
    pending = asyncio.create_task(proxy.get("/inflight-2"))
    await wait_for_condition(lambda: origin.count("/inflight-2") == 1, message="fetch started")
    assert (await admin.purge({"tags": ["other-tag"]})).status == 200
    origin.release()
    assert (await pending).x_cache == "MISS"
    assert _in_l1(proxy, "/inflight-2") is None


async def test_purge_reports_503_when_a_tier_cannot_be_purged(
    origin: Origin,
    make_proxy: MakeProxy,
    redis_server: RedisServer,
    redis_url: str,
    redis_client: Any,
    sqlite_path: Path,
) -> None:
    origin.set("/down", headers=CACHEABLE)
    proxy = await make_proxy(PURGE_TOKEN=TOKEN, L2_WRITE_TIMEOUT=0.2)
    await proxy.get("/down")
    await _stored_everywhere(proxy, "/down", redis_client, sqlite_path)
    redis_server.kill()
    try:
        response = await proxy.request("PURGE", "/down", headers=AUTH)
    finally:
        redis_server.start()
    body = json.loads(response.body)
    assert response.status == 503, body
    assert body["tiers"]["l1"] == 1 and body["tiers"]["l3"] == 1
    assert body["tiers"]["l2"] == "error" and body["replicas_acked"] is None


async def test_soft_purge_is_idempotent_and_leaves_stale_entries_alone(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/s", headers={"Cache-Control": "max-age=1"})
    clock = SteppedClock()
    proxy = await make_proxy(PURGE_TOKEN=TOKEN, REDIS_URL=None, SQLITE_PATH="off", clock=clock)
    await proxy.get("/s")
    entry = _in_l1(proxy, "/s")
    clock.advance_to(entry.fresh_until + 0.05)
    body = json.loads(
        (await proxy.request("PURGE", "/s", headers={**AUTH, "Soft-Purge": "1"})).body
    )
    assert body["tiers"] == {"l1": 0}  # already stale: nothing to mark
    assert _in_l1(proxy, "/s") is entry  # left exactly as it was


# ---- the indexes' bounds and the L3 schema ---------------------------------------------------


async def test_l1_tag_index_is_bounded_with_the_entries(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set_default(headers={**CACHEABLE, "Surrogate-Key": "all"}, size=2000)
    proxy = await make_proxy(REDIS_URL=None, SQLITE_PATH="off", L1_MAX_BYTES=100_000)
    for i in range(300):  # far more than fit: most are evicted
        await proxy.get(f"/e{i}")
    l1 = proxy.state.tier("l1").backend
    assert 0 < len(l1) < 60 and l1.bytes <= l1.max_bytes
    assert l1.tagged("all") == len(l1)  # evicted entries left the index too
    assert set(l1._tags) == {"all"}


_V1_SCHEMA = """
CREATE TABLE entries (key TEXT PRIMARY KEY, value BLOB NOT NULL, size INTEGER NOT NULL,
                      expires_at REAL NOT NULL, accessed_at REAL NOT NULL);
CREATE TABLE stats (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL,
                    entries INTEGER NOT NULL);
INSERT INTO stats VALUES (0, 10, 1);
INSERT INTO entries VALUES ('abc', x'00', 10, 9999999999, 0);
CREATE TRIGGER entries_del AFTER DELETE ON entries BEGIN
    UPDATE stats SET bytes = bytes - old.size, entries = entries - 1 WHERE id = 0;
END;
PRAGMA user_version = 1;
"""


async def test_a_version_1_cache_file_gets_the_tag_index_and_loses_its_unindexed_entries(
    origin: Origin, make_proxy: MakeProxy, sqlite_path: Path
) -> None:
    with sqlite3.connect(sqlite_path) as db:
        db.executescript(_V1_SCHEMA)
    origin.set("/t", headers={**CACHEABLE, "Surrogate-Key": "x"})
    proxy = await make_proxy(REDIS_URL=None, PURGE_TOKEN=TOKEN)
    await proxy.get("/t")
    await proxy.settle()

    with sqlite3.connect(sqlite_path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert {row[0] for row in db.execute("SELECT key FROM entries")} == {
            key_id("/t", origin.url)
        }
        assert db.execute("SELECT entries FROM stats").fetchone()[0] == 1
        assert db.execute("SELECT tag FROM tags").fetchall() == [(tag_id("x", origin.url),)]


async def test_a_cache_file_from_a_newer_version_is_moved_aside(
    origin: Origin, make_proxy: MakeProxy, sqlite_path: Path
) -> None:
    with sqlite3.connect(sqlite_path) as db:
        db.execute("CREATE TABLE future (x)")
        db.execute("PRAGMA user_version = 99")
    proxy = await make_proxy(REDIS_URL=None)
    origin.set("/n", headers=CACHEABLE)
    assert (await proxy.get("/n")).status == 200
    await proxy.settle()
    aside = list(sqlite_path.parent.glob(sqlite_path.name + ".corrupt-*"))
    assert [p.name for p in aside if not p.name.endswith(("-wal", "-shm"))], aside
    assert sqlite_row(sqlite_path, "/n", origin.url) is not None


async def test_a_backfill_overtaken_by_a_purge_is_not_left_behind(
    origin: Origin,
    make_proxy: MakeProxy,
    admin_for: AdminFor,
    redis_server: RedisServer,
    redis_url: str,
    redis_client: Any,
) -> None:
    origin.set("/sup", headers=CACHEABLE)
    proxy = await make_proxy(SQLITE_PATH="off", L2_WRITE_TIMEOUT=5)
    admin = await admin_for(proxy)
    with redis_server.frozen():
        assert (await proxy.get("/sup")).x_cache == "MISS"  # its L2 backfill now waits on Redis
        # A purge heard from another replica meanwhile (local tiers only: no Redis needed).
        await proxy.state.readthrough.purge([proxy.state.keys.key("/sup")], [], shared=False)
    await proxy.settle()

    assert not redis_client.exists(
        redis_key("/sup", origin.url)
    )  # the write that landed was undone
    m = await admin.metrics()
    assert by_label(m, "tierproxy_backfills_total", "outcome", tier="l2") == {
        "started": 1,
        "superseded": 1,
    }
