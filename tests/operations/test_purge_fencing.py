"""What is purged stays purged, on every replica: also on one cut off from Redis while the
PURGE ran, one that was down and restarts with its L3 file, and one that lost its subscription
for a moment. A PURGE answers 200 only when every live replica applied it or has stopped
trusting its local copies (its lease ran out), and says which.

Replicas here are in-process proxies sharing one redis-server; a replica "cut off" reaches
Redis through a fault proxy (tests/support/faultproxy.py) switched to blackhole or reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import pytest
from support.fixture_types import MakeFaultProxy, MakeProxy, SpawnProxy
from support.origin import Origin
from support.proxy import Fetched, ProxyHandle, SpawnedProxy, fetch
from support.redis_server import RedisServer
from support.storage import redis_key, sqlite_row
from support.wait import wait_for_condition

from tierproxy.entry import Entry
from tierproxy.keys import KeySpace
from tierproxy.tiers.base import Blob, TierUnavailable
from tierproxy.tiers.purge_log import REPLICAS, PurgeLog
from tierproxy.tiers.redis import RedisTier

from .conftest import AUTH, TOKEN, AdminFor, value

CACHEABLE = {"Cache-Control": "max-age=300"}
LEASE = 1.0


def _purged_copy_served_as_hit(response: Fetched, old_body: bytes) -> bool:
    return (response.x_cache or "").startswith("HIT") and response.body == old_body


def _l2_holds(redis_client: Any, origin: Origin, path: str, body: bytes) -> bool:
    raw = redis_client.get(redis_key(path, origin.url))
    return raw is not None and body in raw


async def _trusting(proxy: ProxyHandle) -> None:
    invalidation = proxy.state.invalidation
    await wait_for_condition(
        lambda: (
            invalidation.state == "connected" and getattr(invalidation, "trusted", lambda: True)()
        ),
        timeout=20,
        message="replica subscribed and holding its lease",
    )


async def test_a_replica_cut_off_during_a_purge_never_serves_or_writes_back_the_purged_copy(
    origin: Origin,
    make_proxy: MakeProxy,
    admin_for: AdminFor,
    redis_server: RedisServer,
    redis_url: str,
    redis_client: Any,
    fault_proxy: MakeFaultProxy,
    tmp_path: Path,
) -> None:
    origin.set_default(headers=CACHEABLE)
    link = await fault_proxy(redis_server.port)
    a = await make_proxy(PURGE_TOKEN=TOKEN, SQLITE_PATH=tmp_path / "a.sqlite3", PURGE_LEASE=LEASE)
    b = await make_proxy(
        PURGE_TOKEN=TOKEN,
        SQLITE_PATH=tmp_path / "b.sqlite3",
        PURGE_LEASE=LEASE,
        REDIS_URL=f"redis://127.0.0.1:{link.port}/0",
        L2_TIMEOUT=0.1,
        L2_WRITE_TIMEOUT=0.5,
    )
    await _trusting(a)
    await _trusting(b)
    first = await b.get("/p")  # B fetched it: B's L1, L2 and B's own L3 hold it
    assert first.x_cache == "MISS"
    old = first.body
    await b.settle()
    await wait_for_condition(
        lambda: sqlite_row(tmp_path / "b.sqlite3", "/p", origin.url), message="B's L3"
    )
    assert (await a.get("/p")).x_cache == "HIT-L2"
    assert (await b.get("/p")).x_cache == "HIT-L1"

    link.set_mode("blackhole")  # B's connections to Redis stay open; nothing gets through
    started = time.monotonic()
    purge = await a.request("PURGE", "/p", headers=AUTH)
    body = json.loads(purge.body)
    took = time.monotonic() - started
    assert purge.status == 200, body

    # During the partition: B's copies are no longer fresh to it; it revalidates.
    for _ in range(3):
        during = await b.get("/p")
        assert during.status == 200, during
        assert not _purged_copy_served_as_hit(during, old), during
    after = await b.get("/p")
    assert after.x_cache is not None and not after.x_cache.startswith("HIT-L3"), after
    # A applied it; B neither acknowledged nor renewed its lease: it is fenced, and said so.
    assert body.get("replicas_acked") == 1 and body.get("replicas_fenced") == 1, body
    assert "replicas_notified" not in body, body
    assert took < LEASE + 3.0

    link.set_mode("pass")  # healed: B resubscribes and replays the purge it missed
    await _trusting(b)
    for _ in range(3):
        after = await b.get("/p")
        assert not _purged_copy_served_as_hit(after, old), after
    await b.settle()
    await a.settle()
    assert not _l2_holds(redis_client, origin, "/p", old), "the purged copy is back in L2"
    from_a = await a.get("/p")
    assert not _purged_copy_served_as_hit(from_a, old), from_a
    assert not _l2_holds(redis_client, origin, "/p", old)


async def test_a_replica_restarted_with_its_l3_file_does_not_resurrect_a_purged_copy(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    origin.set_default(headers=CACHEABLE)
    b_file = tmp_path / "b.sqlite3"
    a = await make_proxy(PURGE_TOKEN=TOKEN, SQLITE_PATH=tmp_path / "a.sqlite3", PURGE_LEASE=LEASE)
    b = await make_proxy(SQLITE_PATH=b_file, PURGE_LEASE=LEASE)
    first = await b.get("/r")
    assert first.x_cache == "MISS"
    old = first.body
    await b.settle()
    assert sqlite_row(b_file, "/r", origin.url) is not None
    await b.close()  # B is down while the purge runs

    purge = await a.request("PURGE", "/r", headers=AUTH)
    assert purge.status == 200, purge
    assert not redis_client.exists(redis_key("/r", origin.url))

    b_again = await make_proxy(SQLITE_PATH=b_file, PURGE_LEASE=LEASE)  # same L3 file
    await _trusting(b_again)
    response = await b_again.get("/r")
    assert response.status == 200
    assert not _purged_copy_served_as_hit(response, old), response
    await b_again.settle()
    assert not _l2_holds(redis_client, origin, "/r", old), "the purged copy was written back to L2"
    from_a = await a.get("/r")
    assert not _purged_copy_served_as_hit(from_a, old), from_a


async def test_a_replica_that_lost_its_subscription_replays_the_purges_it_missed(
    origin: Origin,
    make_proxy: MakeProxy,
    admin_for: AdminFor,
    redis_server: RedisServer,
    redis_url: str,
    redis_client: Any,
    fault_proxy: MakeFaultProxy,
    tmp_path: Path,
) -> None:
    origin.set_default(headers=CACHEABLE)
    link = await fault_proxy(redis_server.port)
    b_file = tmp_path / "b.sqlite3"
    a = await make_proxy(PURGE_TOKEN=TOKEN, SQLITE_PATH=tmp_path / "a.sqlite3", PURGE_LEASE=LEASE)
    b = await make_proxy(
        SQLITE_PATH=b_file, PURGE_LEASE=LEASE, REDIS_URL=f"redis://127.0.0.1:{link.port}/0"
    )
    admin_b = await admin_for(b)
    await _trusting(a)
    await _trusting(b)
    for path in ("/q", "/kept"):
        assert (await b.get(path)).x_cache == "MISS"
    await b.settle()
    assert sqlite_row(b_file, "/q", origin.url) is not None

    link.set_mode("reset")  # B's connections are reset and it cannot reconnect
    await wait_for_condition(
        lambda: b.state.invalidation.state != "connected",
        timeout=10,
        message="B noticing its subscription is gone",
    )
    purge = await a.request("PURGE", "/q", headers=AUTH)
    assert purge.status == 200, purge
    assert sqlite_row(b_file, "/q", origin.url) is not None  # B's own L3: only B can purge it

    link.set_mode("pass")
    await _trusting(b)
    # The purge log in Redis covered the gap: B applied what it missed, to its L3 as well...
    await wait_for_condition(
        lambda: sqlite_row(b_file, "/q", origin.url) is None, message="B's L3 purged"
    )
    assert b.state.tier("l1").backend.get_now(b.state.keys.key("/q")) is None
    m = await admin_b.metrics()
    # (two log entries: the purge, and its second round - L1 only - published after A purged
    # L2 again for a write B may have landed before it was fenced)
    assert value(m, "tierproxy_invalidations_received_total", outcome="replayed") == 2
    # ...so it had no reason to distrust the rest of its L1.
    assert (await b.get("/kept")).x_cache == "HIT-L1"
    assert (await b.get("/q")).x_cache == "MISS"


async def test_a_purge_is_acknowledged_by_every_connected_replica(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, tmp_path: Path
) -> None:
    origin.set_default(headers=CACHEABLE)
    a = await make_proxy(PURGE_TOKEN=TOKEN, SQLITE_PATH="off", PURGE_LEASE=5)
    b = await make_proxy(SQLITE_PATH="off", PURGE_LEASE=5)
    c = await make_proxy(SQLITE_PATH="off", PURGE_LEASE=5)
    for proxy in (a, b, c):
        await _trusting(proxy)
        await proxy.get("/k")
    started = time.monotonic()
    purge = await a.request("PURGE", "/k", headers=AUTH)
    body = json.loads(purge.body)
    assert purge.status == 200 and body["replicas_acked"] == 3, body
    assert body["replicas_fenced"] == 0, body
    assert time.monotonic() - started < 1.0  # acknowledged at once, not waited out
    for proxy in (b, c):  # an acknowledgement means it was applied
        assert proxy.state.tier("l1").backend.get_now(proxy.state.keys.key("/k")) is None


async def test_a_replica_that_shut_down_does_not_hold_up_a_purge(
    origin: Origin, make_proxy: MakeProxy, redis_url: str
) -> None:
    origin.set_default(headers=CACHEABLE)
    a = await make_proxy(PURGE_TOKEN=TOKEN, SQLITE_PATH="off", PURGE_LEASE=5)
    b = await make_proxy(SQLITE_PATH="off", PURGE_LEASE=5)
    await _trusting(a)
    await _trusting(b)
    await b.close()  # graceful: it leaves the replicas' registry
    started = time.monotonic()
    purge = await a.request("PURGE", "/gone", headers=AUTH)
    body = json.loads(purge.body)
    assert purge.status == 200 and body["replicas_acked"] == 1, body
    assert body["replicas_fenced"] == 0, body
    assert time.monotonic() - started < 1.0  # not a lease's wait


async def _lease_held(proc: SpawnedProxy) -> None:
    async def held() -> bool:
        async with (
            aiohttp.ClientSession() as session,
            session.get(proc.admin_url + "/readyz") as resp,
        ):
            return bool((await resp.json()).get("purge_lease", "held") == "held")

    await wait_for_condition(held, timeout=20, message=f"{proc.url} holding its purge lease")


async def test_a_replica_stopped_while_a_purge_ran_serves_no_purged_copy_when_it_resumes(
    origin: Origin, spawn_proxy: SpawnProxy, redis_url: str, tmp_path: Path
) -> None:
    # SIGSTOP: the replica's connections stay open but it answers nothing. When it resumes,
    # the request may be read before the purge message waiting on its subscription: its lease,
    # checked on every would-be fresh hit, has run out meanwhile.
    origin.set_default(headers=CACHEABLE)
    a = await spawn_proxy(
        PURGE_TOKEN=TOKEN, SQLITE_PATH=str(tmp_path / "a.sqlite3"), PURGE_LEASE=LEASE
    )
    b = await spawn_proxy(SQLITE_PATH=str(tmp_path / "b.sqlite3"), PURGE_LEASE=LEASE)
    await _lease_held(a)
    await _lease_held(b)
    async with aiohttp.ClientSession() as session:
        first = await fetch(session, "GET", b.url + "/s")
        assert first.x_cache == "MISS", first
        assert (await fetch(session, "GET", b.url + "/s")).x_cache == "HIT-L1"
        os.kill(b.pid, signal.SIGSTOP)
        try:
            purge = await fetch(session, "PURGE", a.url + "/s", headers=AUTH)
        finally:
            os.kill(b.pid, signal.SIGCONT)
        resumed = await fetch(session, "GET", b.url + "/s")
        assert resumed.status == 200, resumed
        assert not _purged_copy_served_as_hit(resumed, first.body), resumed
        body = json.loads(purge.body)
        assert purge.status == 200 and body.get("replicas_fenced") == 1, body
        await _lease_held(b)  # back: it applied the purge and holds its lease again
        again = await fetch(session, "GET", b.url + "/s")
        assert not _purged_copy_served_as_hit(again, first.body), again


async def test_a_purge_after_redis_lost_its_data_waits_out_leases_it_cannot_see(
    origin: Origin,
    make_proxy: MakeProxy,
    redis_server: RedisServer,
    redis_url: str,
    fault_proxy: MakeFaultProxy,
    tmp_path: Path,
) -> None:
    """Redis restarts empty: the replicas' leases are gone from it, but replica B (cut off
    from the new Redis) still holds its own. A PURGE from A must not answer 200 while B may
    still serve the purged copy as fresh: A found the log lost, and PURGEs wait out a lease."""
    origin.set_default(headers=CACHEABLE)
    link = await fault_proxy(redis_server.port)
    a = await make_proxy(PURGE_TOKEN=TOKEN, SQLITE_PATH=tmp_path / "a.sqlite3", PURGE_LEASE=3.0)
    b = await make_proxy(
        PURGE_TOKEN=TOKEN,
        SQLITE_PATH=tmp_path / "b.sqlite3",
        PURGE_LEASE=3.0,
        REDIS_URL=f"redis://127.0.0.1:{link.port}/0",
        L2_TIMEOUT=0.1,
        L2_WRITE_TIMEOUT=0.5,
    )
    await _trusting(a)
    await _trusting(b)
    old = (await b.get("/p")).body
    assert (await b.get("/p")).x_cache == "HIT-L1"
    await b.settle()

    link.set_mode("blackhole")  # B keeps what lease it has; it hears nothing more
    redis_server.restart()  # empty: the purge log and the leases are gone
    await wait_for_condition(
        lambda: a.state.invalidation.subscriptions >= 2,
        timeout=10,
        message="A subscribed to the new Redis",
    )
    await _trusting(a)
    purge = await a.request("PURGE", "/p", headers=AUTH)
    assert purge.status == 200, purge.body
    after = await b.get("/p")
    assert not _purged_copy_served_as_hit(after, old), after


class Write(NamedTuple):
    name: str
    send: Callable[[], Awaitable[None]]


@contextlib.asynccontextmanager
async def _fenced_tier(redis_url: str, path: str) -> AsyncIterator[tuple[RedisTier, Write]]:
    """A RedisTier writing as replica ``replica-1`` (fenced by its lease), and one write of a
    minute-long entry for ``path`` (its Redis name as ``write.name``)."""
    keys = KeySpace("http://origin.test")
    tier = RedisTier(redis_url, socket_timeout=1.0, max_connections=2, keys=keys)
    tier.fence_id = "replica-1"
    await tier.open()
    try:
        now = time.time()
        entry = Entry(
            key=path,
            status=200,
            headers=(),
            body=b"old",
            stored_at=now,
            fresh_until=now + 60,
            stale_until=now + 60,
            swr_until=now,
            expires_at=now + 60,
        )
        key = keys.key(path)
        yield tier, Write(tier.entry_name(key), partial(tier.set, key, entry, Blob(entry)))
    finally:
        await tier.close()


async def test_redis_refuses_an_l2_write_from_a_replica_whose_lease_ran_out(
    redis_url: str, redis_client: Any
) -> None:
    """The fence is in Redis itself: a write that arrives late - its replica was paused or cut
    off past its lease, and a PURGE counted it fenced - is refused, however late it lands."""
    async with _fenced_tier(redis_url, "/f") as (tier, write):
        with pytest.raises(TierUnavailable):
            await write.send()  # never registered: no lease
        assert not redis_client.exists(write.name)
        await tier.purge_log().heartbeat("replica-1", 300, "0-0")  # a lease of 0.3 s
        await write.send()
        assert redis_client.exists(write.name)
        redis_client.delete(write.name)
        await asyncio.sleep(0.4)  # real time: the lease, as Redis keeps it, runs out
        with pytest.raises(TierUnavailable):
            await write.send()
        assert not redis_client.exists(write.name)


async def test_redis_refuses_an_l2_write_that_outlived_the_lease_it_was_sent_under(
    redis_url: str, redis_client: Any
) -> None:
    """A write held up on its way (a socket buffer, retransmissions) longer than the lease
    it was sent under is refused, though the replica has renewed its lease meanwhile: its
    withdrawal marker lives only so long (120 s), and a purge counted on the lease. Here the
    write carries a 0.3 s lease end, as a write sent then would; the renewal that followed
    went through another connection, as heartbeats do (tierproxy.invalidation)."""
    async with _fenced_tier(redis_url, "/g") as (tier, write):
        await tier.purge_log().heartbeat("replica-1", 300, "0-0")  # the lease the write knows
        await write.send()  # within it: stored
        assert redis_client.exists(write.name)
        redis_client.delete(write.name)
        # Renewed for a minute, its reply not yet seen by the writer.
        renewal = PurgeLog(tier.client, tier.purge_log().replicas_key.removesuffix(REPLICAS))
        await renewal.heartbeat("replica-1", 60_000, "0-0")
        await asyncio.sleep(0.4)  # real time: the lease the write was sent under ends
        with pytest.raises(TierUnavailable, match="lease"):
            await write.send()
        assert not redis_client.exists(write.name)
