"""Coalescing across replicas (TIERPROXY_COALESCE=cluster): several proxies sharing one real
Redis send one origin fetch per cold key between them; a leaseholder that dies, a frozen
Redis, a purge during the wait and an unstorable answer never cost a client an error.

Replicas are in-process proxies (one event loop) except where one must die (subprocesses,
SIGKILL). The origin counts requests and answers slowly on purpose.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from support.fixture_types import MakeProxy, SpawnProxy
from support.origin import Origin
from support.proxy import REPO_ROOT, Fetched, ProxyHandle, fetch
from support.redis_server import RedisServer
from support.wait import wait_for_condition

from tierproxy.config import ConfigError, load_settings
from tierproxy.entry import Entry
from tierproxy.states import OriginFailed, Outcome, ProxyRequest

CACHEABLE = {"Cache-Control": "max-age=300"}
# Concurrent clients per replica for the cold-key burst (3 replicas). 300 each by default;
# TIERPROXY_TEST_CLUSTER_CLIENTS lowers it on a small machine.
CLIENTS = int(os.environ.get("TIERPROXY_TEST_CLUSTER_CLIENTS", "300"))
TOKEN = "cluster-coalescing-purge-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _env(**extra: Any) -> dict[str, Any]:
    return {
        "SQLITE_PATH": "off",  # L3 is per host: not what is shared here
        "KEY_PREFIX": f"t{secrets.token_hex(4)}:",
        "ORIGIN_TIMEOUT": 4,
        "REQUEST_DEADLINE": 10,
        "L2_TIMEOUT": 1.0,  # 900 clients on one test loop: lookups must not time out here
        "L2_WRITE_TIMEOUT": 1.0,
        "PURGE_TOKEN": TOKEN,
        **extra,
    }


def _leases(proxy: ProxyHandle, outcome: str) -> float:
    value = proxy.state.metrics.registry.get_sample_value(
        "tierproxy_coalesce_leases_total", {"outcome": outcome}
    )
    return float(value or 0.0)


async def _burst(urls: list[str], clients: int) -> list[Fetched]:
    """``clients`` concurrent GETs at each URL, all released at once."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        return await asyncio.gather(
            *(fetch(session, "GET", url, timeout=30) for url in urls for _ in range(clients))
        )


async def _replicas(make_proxy: MakeProxy, count: int, **env: Any) -> list[ProxyHandle]:
    shared = _env(**env)
    proxies = [await make_proxy(**shared) for _ in range(count)]
    if shared.get("COALESCE") == "cluster":
        await wait_for_condition(
            lambda: all(p.state.readthrough.cluster.leases.connected for p in proxies), timeout=5
        )
    return proxies


# -- configuration ----------------------------------------------------------------------------


def test_coalesce_is_validated_at_start_up() -> None:
    base = {"TIERPROXY_ORIGIN": "http://127.0.0.1:9"}
    assert load_settings(base).coalesce == "local"
    with pytest.raises(ConfigError, match="TIERPROXY_COALESCE='everywhere'.*local or cluster"):
        load_settings({**base, "TIERPROXY_COALESCE": "everywhere"})
    with pytest.raises(ConfigError, match="TIERPROXY_COALESCE=cluster needs TIERPROXY_REDIS_URL"):
        load_settings({**base, "TIERPROXY_COALESCE": "cluster"})
    with_redis = {**base, "TIERPROXY_REDIS_URL": "redis://127.0.0.1:1"}
    assert load_settings({**with_redis, "TIERPROXY_COALESCE": "cluster"}).coalesce == "cluster"


@pytest.mark.parametrize("value", ["everywhere", "cluster"])
def test_tierproxy_serve_exits_2_on_a_bad_coalesce(value: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERPROXY_")}
    env.update(TIERPROXY_ORIGIN="http://127.0.0.1:9", TIERPROXY_COALESCE=value)
    env["PYTHONPATH"] = str(REPO_ROOT)  # this checkout's tierproxy
    done = subprocess.run(
        [sys.executable, "-m", "tierproxy", "serve"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "TIERPROXY_COALESCE" in done.stderr
    assert "Traceback" not in done.stderr


# -- one fetch across the replicas -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "fetches"), [("cluster", 1), ("local", 3)])
async def test_three_replicas_on_one_cold_key(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, mode: str, fetches: int
) -> None:
    """3 replicas x CLIENTS concurrent clients on one cold key: one origin fetch in all with
    ``cluster``; one per replica with ``local`` (so the count measures the feature)."""
    origin.set("/cold", headers=CACHEABLE, latency=0.5)
    proxies = await _replicas(make_proxy, 3, COALESCE=mode)
    answers = await _burst([f"{p.url}/cold" for p in proxies], CLIENTS)
    assert {a.status for a in answers} == {200}
    assert len({a.body for a in answers}) == fetches  # one fetch's answer everywhere (cluster)
    assert origin.count("/cold") == fetches
    if mode == "cluster":
        assert sum(_leases(p, "acquired") for p in proxies) == 1
        assert sum(_leases(p, "waited-hit") for p in proxies) == 2  # one leader per replica
        assert sum(_leases(p, "error") for p in proxies) == 0
    else:
        assert sum(_leases(p, "acquired") for p in proxies) == 0


# -- a leaseholder that dies -----------------------------------------------------------------


@pytest.mark.slow
async def test_a_killed_leaseholder_costs_a_handful_of_fetches(
    origin: Origin, spawn_proxy: SpawnProxy, redis_url: str
) -> None:
    """The replica holding the lease is SIGKILLed mid-fetch: its lease runs out (origin
    timeout + L2 write timeout), one of the others takes it and fetches; every client of
    the surviving replicas gets a 200."""
    env = _env(COALESCE="cluster", ORIGIN_TIMEOUT=2)
    origin.set("/dies", headers=CACHEABLE, hang=True, hang_limit=30)
    holder, *others = [await spawn_proxy(**env) for _ in range(3)]
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        first = asyncio.create_task(fetch(session, "GET", f"{holder.url}/dies", timeout=30))
        await wait_for_condition(lambda: origin.count("/dies") == 1, timeout=10)
        waiting = [
            asyncio.create_task(fetch(session, "GET", f"{p.url}/dies", timeout=30))
            for p in others
            for _ in range(50)
        ]
        await asyncio.sleep(0.5)  # they are waiting on the lease now
        assert origin.count("/dies") == 1
        holder.kill()
        origin.set("/dies", headers=CACHEABLE, latency=0.5)
        origin.release()
        answers = await asyncio.gather(*waiting)
        first.cancel()
    assert {a.status for a in answers} == {200}
    assert len({a.body for a in answers}) == 1
    assert origin.count("/dies") <= 3, origin.count("/dies")


# -- Redis frozen ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_frozen_redis_coalesces_per_replica_without_errors(
    origin: Origin, make_proxy: MakeProxy, redis_server: RedisServer, redis_url: str
) -> None:
    origin.set("/frozen", headers=CACHEABLE, latency=0.5)
    proxies = await _replicas(make_proxy, 3, COALESCE="cluster", L2_TIMEOUT=0.1)
    with redis_server.frozen():
        answers = await _burst([f"{p.url}/frozen" for p in proxies], 50)
    assert {a.status for a in answers} == {200}
    assert max(a.elapsed for a in answers) < 5.0
    assert origin.count("/frozen") <= 3  # like local: one per replica
    assert sum(_leases(p, "error") for p in proxies) >= 1
    assert sum(_leases(p, "acquired") for p in proxies) == 0


# -- a purge during the wait -----------------------------------------------------------------


async def test_a_purge_during_the_wait_lets_no_pre_purge_entry_through(
    origin: Origin, make_proxy: MakeProxy, redis_url: str
) -> None:
    origin.set("/p", headers=CACHEABLE, body=b"v1", latency=1.0)
    holder, waiter = await _replicas(make_proxy, 2, COALESCE="cluster")
    first = asyncio.create_task(holder.get("/p"))
    await wait_for_condition(lambda: origin.count("/p") == 1, timeout=5)
    waiting = [asyncio.create_task(waiter.get("/p")) for _ in range(5)]
    await asyncio.sleep(0.2)  # waiting on the holder's lease
    origin.set("/p", headers=CACHEABLE, body=b"v2", latency=0.1)
    purged = await waiter.request("PURGE", "/p", headers=AUTH)
    assert purged.status == 200, purged.body
    assert (await first).body == b"v1"  # the holder's own client gets what it asked for
    for answer in await asyncio.gather(*waiting):
        assert answer.status == 200
        assert answer.body == b"v2"
    await holder.settle()
    await waiter.settle()
    assert (await waiter.get("/p")).body == b"v2"
    assert (await holder.get("/p")).body == b"v2"


# -- an unstorable answer --------------------------------------------------------------------


async def test_an_unstorable_answer_sends_the_waiters_to_the_origin_at_once(
    origin: Origin, make_proxy: MakeProxy, redis_url: str
) -> None:
    """The leaseholder's answer is private: it publishes ``unstored`` and the waiter fetches
    at once (taking the lease it released), not after a fallback re-check (a second here) or
    its deadline."""
    origin.set("/private", headers={"Cache-Control": "private, max-age=300"}, latency=0.5)
    holder, waiter = await _replicas(make_proxy, 2, COALESCE="cluster", ORIGIN_TIMEOUT=8)
    first = asyncio.create_task(holder.get("/private"))
    await wait_for_condition(lambda: origin.count("/private") == 1, timeout=5)
    second = await waiter.get("/private")
    assert (await first).status == 200
    assert second.status == 200
    assert origin.count("/private") == 2
    assert _leases(waiter, "acquired") == 1
    # The rest of the holder's 0.5 s fetch, then its own 0.5 s; a fallback re-check would add 1 s.
    assert second.elapsed < 1.3, second.elapsed


# -- a slow origin within its timeout --------------------------------------------------------


async def test_a_slow_origin_within_its_timeout_serves_every_replica_from_one_fetch(
    origin: Origin, make_proxy: MakeProxy, redis_url: str
) -> None:
    """Default timeouts (origin 2 s, request deadline 3 s) and an origin taking 1.7 s: the
    waiters on the other replica wait for the leaseholder's fetch (bounded by the origin
    timeout) instead of giving up half way and fetching with too little time left."""
    env = {"SQLITE_PATH": "off", "KEY_PREFIX": f"t{secrets.token_hex(4)}:", "COALESCE": "cluster"}
    holder, waiter = [await make_proxy(**env) for _ in range(2)]
    await wait_for_condition(
        lambda: (
            holder.state.readthrough.cluster.leases.connected
            and waiter.state.readthrough.cluster.leases.connected
        ),
        timeout=5,
    )
    origin.set("/slow", headers=CACHEABLE, latency=1.7)
    first = asyncio.create_task(holder.get("/slow"))
    await wait_for_condition(lambda: origin.count("/slow") == 1, timeout=5)
    others = [asyncio.create_task(p.get("/slow")) for p in (holder, waiter) for _ in range(5)]
    answers = [await first, *await asyncio.gather(*others)]
    assert [a.status for a in answers] == [200] * len(answers)
    assert len({a.body for a in answers}) == 1
    assert origin.count("/slow") == 1
    assert _leases(waiter, "waited-hit") == 1
    assert _leases(waiter, "waited-timeout") == 0


# -- no lease left behind --------------------------------------------------------------------


def _request(proxy: ProxyHandle, target: str, budget: float) -> ProxyRequest:
    key = proxy.state.readthrough.keys.for_target(target)
    deadline = asyncio.get_running_loop().time() + budget
    return ProxyRequest("GET", key, CIMultiDictProxy(CIMultiDict()), "127.0.0.1", "http", deadline)


async def test_a_leader_cancelled_after_taking_the_lease_releases_it(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, redis_client: Any
) -> None:
    """Cancelled during its L2 re-read (just after taking the lease): the lease goes with it,
    and the other replica does not wait for a fetch nobody makes."""
    origin.set("/c", headers=CACHEABLE, latency=0.1)
    holder, other = await _replicas(make_proxy, 2, COALESCE="cluster", REQUEST_DEADLINE=3)
    cluster = holder.state.readthrough.cluster
    real_read = cluster.read

    async def slow_read(req: ProxyRequest) -> Entry | None:  # the real L2 read, later
        await asyncio.sleep(0.5)
        entry: Entry | None = await real_read(req)
        return entry

    cluster.read = slow_read
    req = _request(holder, "/c", 3.0)
    fetched: list[int] = []

    async def fetch_() -> Outcome:
        fetched.append(1)
        raise AssertionError("a cancelled leader does not fetch")

    task = asyncio.create_task(cluster.fetch(req, req.key.material, fetch_))
    lease = cluster.leases.lease_name(req.key.material)
    await wait_for_condition(lambda: bool(redis_client.exists(lease)), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for_condition(lambda: not redis_client.exists(lease), timeout=3)
    answer = await other.get("/c")
    assert answer.status == 200
    assert answer.elapsed < 1.0, answer.elapsed
    assert fetched == []


async def test_a_lease_taken_as_redis_timed_out_is_released(
    origin: Origin,
    make_proxy: MakeProxy,
    redis_server: RedisServer,
    redis_url: str,
    redis_client: Any,
) -> None:
    """The SET is sent but Redis answers too late (frozen, then thawed): the request fetches
    as without a lease, and the lease its SET made once Redis ran it does not stay."""
    origin.set("/late", headers=CACHEABLE)
    (holder,) = await _replicas(make_proxy, 1, COALESCE="cluster")
    cluster = holder.state.readthrough.cluster
    req = _request(holder, "/late", 0.3)  # the SET waits for at most this long
    lease = cluster.leases.lease_name(req.key.material)
    fetched: list[int] = []

    async def fetch_() -> Outcome:
        fetched.append(1)
        return OriginFailed("origin-timeout")

    with redis_server.frozen():
        await cluster.fetch(req, req.key.material, fetch_)
        assert fetched == [1]
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.3)  # Redis ran the SET (and the release, after it)
    assert _leases(holder, "error") == 1
    await wait_for_condition(lambda: not redis_client.exists(lease), timeout=2)


async def test_a_lease_held_under_this_replicas_own_id_is_its_own(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, redis_client: Any
) -> None:
    """A lease of this replica left in Redis (a release that failed) is not waited on."""
    origin.set("/own", headers=CACHEABLE)
    (proxy,) = await _replicas(make_proxy, 1, COALESCE="cluster", REQUEST_DEADLINE=3)
    leases = proxy.state.readthrough.cluster.leases
    material = proxy.state.readthrough.keys.for_target("/own").material
    lease = leases.lease_name(material)
    redis_client.set(lease, f"{leases.owner}:0", px=30_000)
    answer = await proxy.get("/own")
    assert answer.status == 200
    assert answer.elapsed < 1.0, answer.elapsed
    assert _leases(proxy, "acquired") == 1
    await wait_for_condition(lambda: not redis_client.exists(lease), timeout=3)


# -- the channel lost for a moment -----------------------------------------------------------


async def test_a_lost_channel_does_not_send_the_waiters_to_the_origin(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, redis_client: Any
) -> None:
    """Every pub/sub connection is killed while the waiters wait: they go on waiting (the
    lease, L2, the fallback re-check) instead of all fetching at once."""
    origin.set("/lost", headers=CACHEABLE, latency=1.5)
    holder, waiter = await _replicas(make_proxy, 2, COALESCE="cluster")
    first = asyncio.create_task(holder.get("/lost"))
    await wait_for_condition(lambda: origin.count("/lost") == 1, timeout=5)
    waiting = [asyncio.create_task(waiter.get("/lost")) for _ in range(5)]
    await asyncio.sleep(0.3)  # waiting on the holder's lease
    assert redis_client.client_kill_filter(_type="pubsub") >= 1
    answers = [await first, *await asyncio.gather(*waiting)]
    assert [a.status for a in answers] == [200] * len(answers)
    assert len({a.body for a in answers}) == 1
    assert origin.count("/lost") == 1
    assert _leases(waiter, "waited-hit") == 1


# -- a release that removed nothing -----------------------------------------------------------


async def test_a_release_of_a_lease_no_longer_held_publishes_nothing(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, redis_client: Any
) -> None:
    """The holder's lease ran out and another replica holds it now (set by hand here): the
    holder's release deletes nothing and must not tell that one's waiters ``unstored``."""
    origin.set("/gone", headers={"Cache-Control": "private, max-age=300"}, latency=0.8)
    holder, waiter = await _replicas(make_proxy, 2, COALESCE="cluster")
    leases = holder.state.readthrough.cluster.leases
    lease = leases.lease_name(holder.state.readthrough.keys.for_target("/gone").material)
    first = asyncio.create_task(holder.get("/gone"))
    await wait_for_condition(lambda: origin.count("/gone") == 1, timeout=5)
    redis_client.set(lease, "another-replica:0", px=30_000)
    waiting = asyncio.create_task(waiter.get("/gone"))
    await asyncio.sleep(0.2)  # waiting on "another replica"
    assert (await first).status == 200
    await asyncio.sleep(0.5)  # the holder's release has run
    assert origin.count("/gone") == 1
    redis_client.delete(lease)  # "another replica" is gone: the waiter's re-check takes it
    assert (await waiting).status == 200
    assert origin.count("/gone") == 2
    assert _leases(waiter, "waited-unstored") == 0
    assert _leases(waiter, "acquired") == 1


# -- local costs what it did -----------------------------------------------------------------


@pytest.mark.parametrize(("mode", "tracked"), [("local", 0), ("cluster", 1)])
async def test_only_cluster_tracks_the_shared_writes(
    origin: Origin,
    make_proxy: MakeProxy,
    redis_server: RedisServer,
    redis_url: str,
    mode: str,
    tracked: int,
) -> None:
    """The L2 write still on its way is tracked (a future per write) only for the fetch
    lease's release; with ``local`` nothing waits for it, so nothing is kept."""
    origin.set("/w", headers=CACHEABLE)
    (proxy,) = await _replicas(make_proxy, 1, COALESCE=mode, L2_TIMEOUT=0.2)
    backfill = proxy.state.readthrough.backfill
    with redis_server.frozen():  # the L2 write waits on Redis
        answer = await proxy.get("/w")
        assert answer.status == 200
        assert len(backfill._shared) == tracked
    await proxy.settle()
    assert len(backfill._shared) == 0


# -- after an answer that was not stored -----------------------------------------------------


async def test_after_an_unstored_answer_one_replica_leads_the_next_fetch(
    origin: Origin, make_proxy: MakeProxy, redis_url: str
) -> None:
    """The leaseholder's answer is not stored, the next one would be: of the two replicas
    told ``unstored``, one takes the lease and fetches, the other serves what it stored."""
    origin.set("/next", headers={"Cache-Control": "private"}, latency=0.8)
    holder, *waiters = await _replicas(make_proxy, 3, COALESCE="cluster")
    first = asyncio.create_task(holder.get("/next"))
    await wait_for_condition(lambda: origin.count("/next") == 1, timeout=5)
    origin.set("/next", headers=CACHEABLE, latency=0.5)  # what the next fetch gets
    waiting = [asyncio.create_task(p.get("/next")) for p in waiters]
    assert (await first).status == 200
    answers = await asyncio.gather(*waiting)
    assert [a.status for a in answers] == [200, 200]
    assert answers[0].body == answers[1].body
    assert origin.count("/next") == 2
    assert sum(_leases(p, "acquired") for p in waiters) == 1
