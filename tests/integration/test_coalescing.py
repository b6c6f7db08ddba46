"""Request coalescing is exact: one origin fetch per key for every request that overlaps it.

A request whose lookup (L1 -> L2 -> L3) was still running when another request's fetch for
the same key finished - its tiers did not hold the entry yet - gets that entry, like the
requests that found the fetch in flight. Answers that cannot be shared (private, Set-Cookie)
are fetched by the waiters one at a time per key, never all at once.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from support.fixture_types import MakeFaultProxy, MakeProxy
from support.origin import Origin
from support.proxy import Fetched, ProxyHandle, fetch
from support.redis_server import RedisServer
from support.storage import parse_cache_status
from support.wait import wait_for_condition

CACHEABLE = {"Cache-Control": "max-age=300"}

KEYS = 20
CLIENTS_PER_KEY = 200
ARRIVALS_OVER = 0.7  # seconds over which the clients of every key arrive
ORIGIN_LATENCY = 0.5


def _waiters(proxy: ProxyHandle) -> float:
    value = proxy.state.metrics.registry.get_sample_value("tierproxy_coalesced_waiters_total")
    return value or 0.0


def _collapsed(response: Fetched) -> bool:
    return any(
        m.params.get("collapsed") is True
        for m in parse_cache_status(response.headers.get("Cache-Status"))
    )


@pytest.mark.parametrize("l1", ["on", "off"])
async def test_a_stampede_on_cold_keys_fetches_each_key_from_the_origin_once(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, l1: str
) -> None:
    """20 cold keys x 200 clients arriving over 0.7 s, origin 0.5 s, L2 and L3 on (lookups
    take real time): exactly one origin fetch per key, every client gets that fetch's body."""
    origin.set_default(headers=CACHEABLE, latency=ORIGIN_LATENCY)
    overrides = {
        "ACCESS_LOG": "off",
        "REQUEST_DEADLINE": 10,
        "ORIGIN_TIMEOUT": 5,
        "L2_TIMEOUT": 2,
        "L3_TIMEOUT": 2,
        # What is tested is coalescing, not storage under load: on a busy machine 4,000
        # connections starve the writes (L3 writes took 1.7 s and opened the write breaker),
        # and an entry no tier could store is rightly fetched again.
        "L2_WRITE_TIMEOUT": 10,
        "L3_WRITE_TIMEOUT": 10,
    }
    if l1 == "off":
        overrides["L1_MAX_BYTES"] = 0
    proxy = await make_proxy(**overrides)
    assert proxy.tier_names() == (["l1", "l2", "l3"] if l1 == "on" else ["l2", "l3"])
    loop = asyncio.get_running_loop()
    total = KEYS * CLIENTS_PER_KEY

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        start = loop.time() + 0.05

        async def client(n: int) -> tuple[int, Fetched]:
            # Clients of all keys interleaved, evenly spread over ARRIVALS_OVER.
            await asyncio.sleep(max(0.0, start + ARRIVALS_OVER * n / total - loop.time()))
            key = n % KEYS
            return key, await fetch(session, "GET", f"{proxy.url}/k{key}", timeout=20)

        results = await asyncio.gather(*(client(n) for n in range(total)))

    counts = {f"/k{key}": origin.count(f"/k{key}") for key in range(KEYS)}
    assert counts == {f"/k{key}": 1 for key in range(KEYS)}, counts
    assert all(r.status == 200 for _, r in results), [r for _, r in results if r.status != 200][:3]
    for key, response in results:
        assert response.body == f"origin body for /k{key} (request 1)".encode(), response
    # The requests that got the fetch's answer rather than a hit say so, and were counted.
    collapsed = sum(1 for _, r in results if r.x_cache == "MISS" and _collapsed(r))
    misses = sum(1 for _, r in results if r.x_cache == "MISS")
    assert misses - collapsed == KEYS, (misses, collapsed)
    assert _waiters(proxy) >= collapsed > 0


async def test_a_request_whose_lookup_outlasts_the_fetch_gets_the_fetched_entry(
    origin: Origin,
    make_proxy: MakeProxy,
    redis_url: str,
    redis_server: RedisServer,
    fault_proxy: MakeFaultProxy,
) -> None:
    """B's L2 lookup is still waiting when A's fetch of the same key finishes, and ends well
    after the L2 write could have landed: B must get A's entry (collapsed), not start a
    second fetch. L1 and L3 off, Redis unreachable from before B's lookup: no tier holds it."""
    front = await fault_proxy(redis_server.port)
    origin.set("/late", headers=CACHEABLE, hang=True)
    proxy = await make_proxy(
        REDIS_URL=f"redis://127.0.0.1:{front.port}/0",
        L1_MAX_BYTES=0,
        SQLITE_PATH="off",
        L2_TIMEOUT=1.0,
        L2_WRITE_TIMEOUT=0.1,
    )
    first = asyncio.create_task(proxy.get("/late"))
    await wait_for_condition(lambda: origin.count("/late") == 1, message="A's fetch started")
    front.set_mode("blackhole")
    second = asyncio.create_task(proxy.get("/late"))
    await wait_for_condition(
        lambda: proxy.state.inflight == 2, message="B looking up L2 (Redis unreachable)"
    )
    origin.release()
    a = await first
    b = await second

    assert a.status == b.status == 200
    assert a.x_cache == "MISS" and not _collapsed(a), a
    assert b.x_cache == "MISS" and _collapsed(b), b
    assert b.elapsed > 0.9, b  # its lookup waited out the L2 timeout, long after A's fetch
    assert b.body == a.body == b"origin body for /late (request 1)"
    assert origin.count("/late") == 1
    assert _waiters(proxy) == 1


@pytest.mark.parametrize(
    "headers",
    [{"Cache-Control": "private, max-age=60"}, {**CACHEABLE, "Set-Cookie": "session=s1"}],
    ids=["private", "set-cookie"],
)
async def test_unshareable_answers_are_fetched_by_the_waiters_one_at_a_time(
    origin: Origin, make_proxy: MakeProxy, headers: dict[str, str]
) -> None:
    """A private answer is each client's own: every client gets its own fetch, but the
    origin never sees more than one of them at a time for the key."""
    origin.set("/own", headers=headers, latency=0.1)
    proxy = await make_proxy(
        REDIS_URL=None, SQLITE_PATH="off", REQUEST_DEADLINE=10, ORIGIN_TIMEOUT=5
    )
    clients = 6

    results = await asyncio.gather(*(proxy.get("/own") for _ in range(clients)))

    assert [r.status for r in results] == [200] * clients, results
    assert [r.x_cache for r in results] == ["BYPASS"] * clients, results
    # Each client got an answer fetched for it, not another client's.
    assert sorted(r.body for r in results) == sorted(
        f"origin body for /own (request {n})".encode() for n in range(1, clients + 1)
    )
    assert origin.count("/own") == clients
    assert origin.peak_concurrency("/own") == 1
    assert _waiters(proxy) >= clients - 1


async def test_a_waiter_past_its_deadline_gives_up_while_the_queue_goes_on(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """Waiting one at a time is bounded by each waiter's own deadline (504, not a hang)."""
    origin.set("/queue", headers={"Cache-Control": "private"}, latency=0.5)
    proxy = await make_proxy(
        REDIS_URL=None, SQLITE_PATH="off", REQUEST_DEADLINE=1.2, ORIGIN_TIMEOUT=1.2
    )

    results = await asyncio.gather(*(proxy.get("/queue") for _ in range(4)))

    statuses = sorted(r.status for r in results)
    # The first fetch answers well within the deadline; the third cannot (3 x 0.5 s > 1.2 s).
    assert statuses[0] == 200 and statuses[-1] == 504, results
    assert all(r.elapsed < 3.0 for r in results), results
    assert origin.peak_concurrency("/queue") == 1


async def test_after_an_unshareable_answer_one_waiter_fetches_and_the_others_share_its_entry(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """Alice's request carries credentials, so her answer is hers alone (RFC 9111 §3.5): the
    clients waiting on her fetch send one more fetch between them, and share its entry."""
    origin.set("/report", headers={"Cache-Control": "max-age=60"}, latency=0.3)
    proxy = await make_proxy(REDIS_URL=None, SQLITE_PATH="off")

    alice_task = asyncio.create_task(
        proxy.get("/report", headers={"Authorization": "Bearer alice-token"})
    )
    await wait_for_condition(lambda: origin.count("/report") == 1, message="alice's fetch")
    others = await asyncio.gather(*(proxy.get("/report") for _ in range(4)))
    alice = await alice_task

    assert alice.status == 200 and alice.x_cache == "BYPASS", alice
    assert [r.status for r in others] == [200] * 4, others
    assert {r.body for r in others} == {b"origin body for /report (request 2)"}
    assert sorted(_collapsed(r) for r in others) == [False, True, True, True], others
    assert origin.count("/report") == 2
    assert origin.peak_concurrency("/report") == 1
    assert [r.headers.get("Authorization") for r in origin.requests] == ["Bearer alice-token", None]


# -- coalescing never outlives a purge or an invalidation -------------------------------------

_TOKEN = "coalescing-purge-token-0123456789"
_AUTH = {"Authorization": f"Bearer {_TOKEN}"}


async def test_a_request_after_a_purge_never_joins_a_fetch_begun_before_it(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """A fetch that began before PURGE answered 200 may bring back what was purged: a request
    arriving after the purge fetches anew instead of waiting on it."""
    origin.set("/b", headers=CACHEABLE, body=b"v1", latency=0.6)
    proxy = await make_proxy(PURGE_TOKEN=_TOKEN)
    before = asyncio.create_task(proxy.get("/b"))
    await wait_for_condition(
        lambda: origin.count("/b") == 1, timeout=5, message="the first fetch reached the origin"
    )
    origin.set("/b", headers=CACHEABLE, body=b"v2", latency=0.1)
    purged = await proxy.request("PURGE", "/b", headers=_AUTH)
    assert purged.status == 200, purged.body
    after = await proxy.get("/b")
    assert after.body == b"v2", (after.x_cache, after.headers.get("Cache-Status"))
    assert (await before).body == b"v1"  # its own client still gets what it asked for
    await proxy.settle()
    again = await proxy.get("/b")
    assert again.body == b"v2", again.x_cache  # and v1 was not stored over v2
