"""Prometheus metrics on the admin listener: exact counts after known request sequences.

Scrapes go through ``GET /metrics`` and are parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from support.clock import SteppedClock
from support.fixture_types import MakeProxy
from support.origin import Origin
from support.redis_server import RedisServer
from support.storage import parse_cache_status, redis_key, sqlite_row
from support.wait import wait_for_condition

from .conftest import AdminFor, Samples, by_label, value

CACHEABLE = {"Cache-Control": "max-age=300"}
TIERS = ("l1", "l2", "l3", "origin")


def lookups(samples: Samples, tier: str) -> dict[str, float]:
    return by_label(samples, "tierproxy_tier_lookups_total", "outcome", tier=tier)


async def test_counters_per_tier_after_a_known_sequence(
    origin: Origin,
    make_proxy: MakeProxy,
    admin_for: AdminFor,
    redis_url: str,
    redis_client: Any,
    sqlite_path: Path,
) -> None:
    origin.set("/m", headers=CACHEABLE)
    origin.set("/private", headers={"Cache-Control": "private"})
    proxy = await make_proxy()
    admin = await admin_for(proxy)
    l1 = proxy.state.tier("l1").backend

    assert (await proxy.get("/m")).x_cache == "MISS"  # L1, L2, L3 miss; origin
    await wait_for_condition(
        lambda: redis_client.exists(redis_key("/m", origin.url)), message="L2 fill"
    )
    await wait_for_condition(lambda: sqlite_row(sqlite_path, "/m", origin.url), message="L3 fill")
    await proxy.settle()
    assert (await proxy.get("/m")).x_cache == "HIT-L1"
    l1.clear()
    assert (await proxy.get("/m")).x_cache == "HIT-L2"  # backfills L1 (in memory, not a task)
    l1.clear()
    redis_client.delete(redis_key("/m", origin.url))
    assert (await proxy.get("/m")).x_cache == "HIT-L3"  # backfills L1 and L2
    await proxy.settle()
    assert (await proxy.request("POST", "/m", data=b"x")).x_cache == "BYPASS"  # invalidates
    assert (await proxy.get("/private")).x_cache == "BYPASS"  # fetched, not storable
    await proxy.settle()

    m = await admin.metrics()
    assert lookups(m, "l1") == {"hit": 1, "miss": 4}
    assert lookups(m, "l2") == {"hit": 1, "miss": 3}
    assert lookups(m, "l3") == {"hit": 1, "miss": 2}
    assert lookups(m, "origin") == {"hit": 3}
    assert by_label(m, "tierproxy_origin_fetches_total", "outcome") == {"ok": 3}
    assert by_label(m, "tierproxy_responses_total", "cache", status_class="2xx") == {
        "MISS": 1,
        "HIT-L1": 1,
        "HIT-L2": 1,
        "HIT-L3": 1,
        "BYPASS": 2,
    }
    assert by_label(m, "tierproxy_backfills_total", "outcome", tier="l2") == {
        "started": 2,
        "completed": 2,
    }
    assert by_label(m, "tierproxy_backfills_total", "outcome", tier="l3") == {
        "started": 1,
        "completed": 1,
    }
    # Every successful lookup is timed, L1 included (sub-millisecond buckets).
    for tier, count in (("l1", 5), ("l2", 4), ("l3", 3), ("origin", 3)):
        assert value(m, "tierproxy_tier_op_seconds_count", tier=tier, op="get") == count, tier
    assert value(m, "tierproxy_tier_op_seconds_bucket", tier="l1", op="get", le="0.001") == 5
    # The POST's invalidation is a purge of its key in every tier (slowest first).
    assert by_label(m, "tierproxy_tier_writes_total", "op", tier="l2", outcome="ok") == {
        "set": 2,
        "purge": 1,
    }
    assert by_label(m, "tierproxy_tier_writes_total", "op", tier="l3", outcome="ok") == {
        "set": 1,
        "purge": 1,
    }
    assert value(m, "tierproxy_stale_served_total", reason="origin-5xx") == 0
    assert value(m, "tierproxy_coalesced_waiters_total") == 0
    assert value(m, "tierproxy_background_dropped_total") == 0
    # Gauges: the state right now.
    assert value(m, "tierproxy_l1_entries") == 0  # /m invalidated by the POST
    assert value(m, "tierproxy_l3_entries") == 0
    assert value(m, "tierproxy_inflight_requests") == 0
    assert value(m, "tierproxy_background_tasks") == 0
    for tier in ("l1", "l2", "l3"):
        assert value(m, "tierproxy_breaker_open", tier=tier) == 0
        assert value(m, "tierproxy_breaker_state", tier=tier, state="closed") == 1
        assert value(m, "tierproxy_tier_state", tier=tier, state="up") == 1
    assert value(m, "tierproxy_tier_timeout_seconds", tier="l1") == 0.01
    assert value(m, "tierproxy_tier_timeout_seconds", tier="l2") == 0.1
    assert value(m, "tierproxy_tier_timeout_seconds", tier="l3") == 0.5
    assert value(m, "tierproxy_tier_timeout_seconds", tier="origin") == 2.0
    assert value(m, "tierproxy_request_deadline_seconds") == 3.0
    assert value(m, "tierproxy_invalidation_connected") == 1
    assert origin.count("/m") == 2  # the GET that missed, the POST


async def test_size_gauges_follow_l1_and_l3(
    origin: Origin, make_proxy: MakeProxy, admin_for: AdminFor, sqlite_path: Path
) -> None:
    origin.set_default(headers=CACHEABLE, size=1000)
    proxy = await make_proxy()
    admin = await admin_for(proxy)
    for i in range(3):
        assert (await proxy.get(f"/g{i}")).x_cache == "MISS"
    await proxy.settle()

    m = await admin.metrics()
    l1 = proxy.state.tier("l1").backend
    l3 = proxy.state.tier("l3").backend
    assert value(m, "tierproxy_l1_entries") == 3
    assert value(m, "tierproxy_l1_bytes") == l1.bytes > 3000
    assert value(m, "tierproxy_l3_entries") == 3
    assert value(m, "tierproxy_l3_bytes") == l3.bytes > 3000


async def test_timeouts_then_breaker_open_skips_are_counted_with_breaker_gauges(
    origin: Origin,
    make_proxy: MakeProxy,
    admin_for: AdminFor,
    redis_server: RedisServer,
    redis_url: str,
) -> None:
    origin.set_default(headers={"Cache-Control": "no-store"})  # no backfill writes to Redis
    proxy = await make_proxy(
        L1_MAX_BYTES=0, SQLITE_PATH="off", L2_TIMEOUT=0.05, BREAKER_FAILURES=2, BREAKER_COOLDOWN=60
    )
    admin = await admin_for(proxy)

    with redis_server.frozen():
        first = await proxy.get("/t1")
        m = await admin.metrics()
        assert value(m, "tierproxy_tier_state", tier="l2", state="degraded") == 1
        second = await proxy.get("/t2")
        third = await proxy.get("/t3")
        m = await admin.metrics()

    assert [r.status for r in (first, second, third)] == [200, 200, 200]
    assert lookups(m, "l2") == {"timeout": 2, "skipped": 1}
    assert lookups(m, "origin") == {"hit": 3}
    assert value(m, "tierproxy_breaker_open", tier="l2") == 1
    assert value(m, "tierproxy_breaker_state", tier="l2", state="open") == 1
    assert value(m, "tierproxy_breaker_state", tier="l2", state="closed") == 0
    assert value(m, "tierproxy_tier_state", tier="l2", state="breaker-open") == 1
    assert value(m, "tierproxy_tier_op_seconds_count", tier="l2", op="get") == 0
    assert by_label(m, "tierproxy_responses_total", "cache") == {"BYPASS": 3}


async def test_stale_lookups_and_stale_served_by_reason(
    origin: Origin, make_proxy: MakeProxy, admin_for: AdminFor
) -> None:
    origin.set("/s", headers={"Cache-Control": "max-age=1"})
    clock = SteppedClock()
    proxy = await make_proxy(REDIS_URL=None, SQLITE_PATH="off", clock=clock)
    admin = await admin_for(proxy)
    miss = await proxy.get("/s")
    assert miss.x_cache == "MISS"
    entry = proxy.state.tier("l1").backend.get_now(proxy.state.keys.key("/s"))
    clock.advance_to(entry.fresh_until + 0.05)
    origin.update("/s", status=500)

    stale = await proxy.get("/s")

    assert stale.x_cache == "STALE-L1", stale
    m = await admin.metrics()
    assert lookups(m, "l1") == {"miss": 1, "stale": 1}
    assert lookups(m, "origin") == {"hit": 1, "error": 1}
    assert by_label(m, "tierproxy_origin_fetches_total", "outcome") == {"ok": 1, "5xx": 1}
    assert by_label(m, "tierproxy_stale_served_total", "reason") == {"origin-5xx": 1}
    assert by_label(m, "tierproxy_responses_total", "cache") == {"MISS": 1, "STALE-L1": 1}


async def test_coalesced_waiters_are_counted(
    origin: Origin, make_proxy: MakeProxy, admin_for: AdminFor
) -> None:
    origin.set("/c", headers=CACHEABLE, hang=True)
    proxy = await make_proxy(REDIS_URL=None, SQLITE_PATH="off")
    admin = await admin_for(proxy)

    requests = [asyncio.create_task(proxy.get("/c")) for _ in range(5)]
    try:

        async def four_waiting() -> bool:
            m = await admin.metrics()
            return value(m, "tierproxy_coalesced_waiters_total") == 4

        await wait_for_condition(four_waiting, message="4 requests waiting on the first")
        assert value(await admin.metrics(), "tierproxy_inflight_requests") == 5
    finally:
        origin.release()
    responses = await asyncio.gather(*requests)

    assert [r.status for r in responses] == [200] * 5
    assert origin.count("/c") == 1
    collapsed = [
        any(m.collapsed for m in parse_cache_status(r.headers["Cache-Status"])) for r in responses
    ]
    assert sorted(collapsed) == [False] + [True] * 4, responses
    m = await admin.metrics()
    assert value(m, "tierproxy_coalesced_waiters_total") == 4
    assert lookups(m, "l1") == {"miss": 5}
    assert lookups(m, "origin") == {"hit": 1}
    assert value(m, "tierproxy_inflight_requests") == 0


async def test_every_documented_metric_is_exposed(
    origin: Origin, make_proxy: MakeProxy, admin_for: AdminFor, redis_url: str
) -> None:
    proxy = await make_proxy()
    admin = await admin_for(proxy)
    await proxy.get("/x")
    await proxy.settle()  # the miss's backfill writes are what tier_writes_total counts
    names = {name for name, _ in await admin.metrics()}
    expected = {
        "tierproxy_tier_lookups_total",
        "tierproxy_tier_op_seconds_bucket",
        "tierproxy_tier_writes_total",
        "tierproxy_origin_fetches_total",
        "tierproxy_origin_fetch_seconds_bucket",
        "tierproxy_responses_total",
        "tierproxy_inflight_requests",
        "tierproxy_background_tasks",
        "tierproxy_breaker_open",
        "tierproxy_breaker_state",
        "tierproxy_tier_state",
        "tierproxy_tier_timeout_seconds",
        "tierproxy_request_deadline_seconds",
        "tierproxy_l1_bytes",
        "tierproxy_l1_entries",
        "tierproxy_l3_bytes",
        "tierproxy_l3_entries",
        "tierproxy_invalidation_connected",
        "tierproxy_l1_clears_total",
        "tierproxy_log_lines_dropped",
    }
    assert expected <= names, expected - names


async def test_grafana_dashboard_uses_only_exposed_metric_names(
    origin: Origin, make_proxy: MakeProxy, admin_for: AdminFor, redis_url: str
) -> None:
    import json
    import re
    from pathlib import Path

    dashboard = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"
    exprs = [
        target["expr"]
        for panel in json.loads(dashboard.read_text())["panels"]
        for target in panel.get("targets", [])
    ]
    used = {name for expr in exprs for name in re.findall(r"\btierproxy_[a-z0-9_]+", expr)}
    proxy = await make_proxy()
    await proxy.get("/d")
    text = (await (await admin_for(proxy)).request("GET", "/metrics")).body.decode()
    # Declared families (a labelled counter has no samples until first used).
    declared = set(re.findall(r"^# TYPE (tierproxy_[a-z0-9_]+) ", text, re.MULTILINE))

    def known(name: str) -> bool:
        return name in declared or re.sub(r"_(bucket|count|sum)$", "", name) in declared

    assert used and all(known(name) for name in used), sorted(n for n in used if not known(n))
