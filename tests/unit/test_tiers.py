"""The tier boundary: make_tiers wires what the settings enable, and every operation the
request path needs - the L1 fast path included - goes through GuardedTier."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy
from support.clock import SteppedClock

from tierproxy.config import load_settings
from tierproxy.entry import Entry
from tierproxy.keys import KeySpace
from tierproxy.metrics import Metrics
from tierproxy.tiers import make_tiers

ORIGIN = "http://127.0.0.1:9000"
KEYS = KeySpace(ORIGIN)
NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


def _samples(metric: Any) -> list[Any]:
    return [sample for family in metric.collect() for sample in family.samples]


def _entry(fresh_for: float) -> Entry:
    now = time.time()
    return Entry(
        key="/a",
        status=200,
        headers=(),
        body=b"x",
        stored_at=now,
        fresh_until=now + fresh_for,
        stale_until=now + 2 * fresh_for,
        swr_until=now,
        expires_at=now + 3 * fresh_for,
    )


async def test_make_tiers_builds_the_enabled_tiers_fastest_first(tmp_path: Path) -> None:
    metrics = Metrics()
    settings = load_settings(
        {
            "TIERPROXY_ORIGIN": ORIGIN,
            "TIERPROXY_REDIS_URL": "redis://127.0.0.1:1/0",
            "TIERPROXY_SQLITE_PATH": str(tmp_path / "l3.sqlite3"),
        }
    )
    tiers = make_tiers(settings, metrics, KEYS)
    try:
        assert [tier.name for tier in tiers] == ["l1", "l2", "l3"]
        assert [tier.synchronous for tier in tiers] == [True, False, False]
        assert [tier.shared for tier in tiers] == [False, True, False]
        # Only the shared tier carries the replicas' purge log.
        assert [tier.replicated() is not None for tier in tiers] == [False, True, False]
        assert [tier.read_timeout for tier in tiers] == [
            settings.l1_timeout,
            settings.l2_timeout,
            settings.l3_timeout,
        ]
    finally:
        for tier in tiers:
            await tier.close()

    only_l1 = make_tiers(
        load_settings({"TIERPROXY_ORIGIN": ORIGIN, "TIERPROXY_SQLITE_PATH": "off"}), Metrics(), KEYS
    )
    assert [tier.name for tier in only_l1] == ["l1"]
    none = make_tiers(
        load_settings(
            {
                "TIERPROXY_ORIGIN": ORIGIN,
                "TIERPROXY_SQLITE_PATH": "off",
                "TIERPROXY_L1_MAX_BYTES": "0",
            }
        ),
        Metrics(),
        KEYS,
    )
    assert none == []


def test_the_l1_fast_path_goes_through_the_guarded_tier_and_its_clock() -> None:
    metrics = Metrics()
    clock = SteppedClock()
    settings = load_settings({"TIERPROXY_ORIGIN": ORIGIN, "TIERPROXY_SQLITE_PATH": "off"})
    (l1,) = make_tiers(settings, metrics, KEYS, clock=clock)
    l1.watch(metrics)
    key = KEYS.key("/a")
    entry = _entry(fresh_for=10)

    assert l1.set_now(key, entry)
    assert l1.get_now(key, NO_HEADERS) is entry
    assert _samples(metrics.l1_entries)[0].value == 1
    assert _samples(metrics.l1_bytes)[0].value == entry.size

    clock.advance(10)  # past its freshness on the tier's clock: counted stale, still returned
    assert l1.get_now(key, NO_HEADERS) is entry
    lookups = {
        s.labels["outcome"]: s.value
        for s in _samples(metrics.tier_lookups)
        if s.labels.get("tier") == "l1" and s.name.endswith("_total")
    }
    assert (lookups["hit"], lookups["stale"]) == (1, 1)

    assert l1.remove_now(key) and l1.get_now(key, NO_HEADERS) is None
    l1.set_now(key, entry)
    assert l1.clear() == 1 and l1.get_now(key, NO_HEADERS) is None

    l1.set_now(key, entry)
    clock.advance(20)  # past its expiry: dropped
    assert l1.get_now(key, NO_HEADERS) is None
    assert _samples(metrics.l1_entries)[0].value == 0
