"""L1: byte bound, LRU eviction, expiry."""

from __future__ import annotations

import time

from support.clock import SteppedClock

from tierproxy.entry import Entry
from tierproxy.keys import KeySpace
from tierproxy.tiers.base import Breaker
from tierproxy.tiers.memory import MemoryTier

KEYS = KeySpace("http://origin.test")


def entry(key: str, size: int = 100, expires_in: float = 60) -> Entry:
    now = time.time()
    return Entry(
        key=key,
        status=200,
        headers=(),
        body=b"x" * size,
        stored_at=now,
        fresh_until=now + expires_in,
        stale_until=now + expires_in,
        swr_until=now + expires_in,
        expires_at=now + expires_in,
    )


def test_byte_bound_holds_and_least_recently_used_goes_first() -> None:
    one = entry("/1").size
    tier = MemoryTier(max_bytes=one * 3)  # room for exactly three
    tier.max_entry_bytes = one  # lift the one-eighth cap so three fit
    for name in ("/1", "/2", "/3"):
        assert tier.set_now(KEYS.key(name), entry(name))
    assert tier.get_now(KEYS.key("/1")) is not None  # /1 is now the most recent
    tier.set_now(KEYS.key("/4"), entry("/4"))
    assert tier.get_now(KEYS.key("/2")) is None
    assert {k for k in ("/1", "/3", "/4") if tier.get_now(KEYS.key(k))} == {"/1", "/3", "/4"}
    assert tier.bytes <= tier.max_bytes
    assert tier.bytes == 3 * one


def test_bytes_stay_within_bound_under_many_keys() -> None:
    tier = MemoryTier(max_bytes=100_000)
    for i in range(10_000):
        tier.set_now(KEYS.key(f"/k?{i}"), entry(f"/k?{i}", size=i % 500))
        assert tier.bytes <= tier.max_bytes
    assert tier.bytes == sum(e.size for e in tier._entries.values())


def test_replacing_a_key_does_not_leak_bytes() -> None:
    tier = MemoryTier(max_bytes=10_000)
    for size in (10, 500, 20):
        tier.set_now(KEYS.key("/a"), entry("/a", size=size))
    assert len(tier) == 1
    assert tier.bytes == entry("/a", size=20).size


def test_oversized_entry_is_not_kept() -> None:
    tier = MemoryTier(max_bytes=8_000)
    assert not tier.set_now(KEYS.key("/big"), entry("/big", size=5_000))
    assert tier.get_now(KEYS.key("/big")) is None
    assert tier.bytes == 0


def test_expired_entries_are_dropped_on_lookup() -> None:
    tier = MemoryTier(max_bytes=10_000)
    tier.set_now(KEYS.key("/old"), entry("/old", expires_in=-1))
    assert tier.get_now(KEYS.key("/old")) is None
    assert tier.bytes == 0


def test_an_entry_expires_when_its_clock_says_so() -> None:
    clock = SteppedClock()
    tier = MemoryTier(max_bytes=10_000, clock=clock)
    tier.set_now(KEYS.key("/soon"), entry("/soon", expires_in=30))
    assert tier.get_now(KEYS.key("/soon")) is not None
    clock.advance(30)
    assert tier.get_now(KEYS.key("/soon")) is None
    assert tier.bytes == 0 and len(tier) == 0


def test_breaker_opens_after_consecutive_failures_and_probes_once_after_cooldown() -> None:
    clock = SteppedClock()
    breaker = Breaker(failures_to_open=3, cooldown=5.0, clock=clock)
    for _ in range(2):
        breaker.failure()
    assert breaker.allow()
    breaker.failure()
    assert breaker.is_open and not breaker.allow()
    clock.advance(4.9)
    assert not breaker.allow() and breaker.state() == "open"  # still cooling down
    clock.advance(0.1)
    assert breaker.allow()
    assert breaker.state() == "half-open"
    assert not breaker.allow()  # only one probe at a time
    breaker.success()
    assert breaker.state() == "closed" and breaker.allow()


def test_a_probe_that_never_reports_does_not_hold_the_breaker_half_open_for_ever() -> None:
    clock = SteppedClock()
    breaker = Breaker(failures_to_open=1, cooldown=5.0, clock=clock)
    breaker.failure()
    clock.advance(5.0)
    assert breaker.allow()  # the first probe starts; say it was cancelled mid-call
    assert not breaker.allow()
    clock.advance(4.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow()  # after another cooldown, the next request probes instead
    assert breaker.state() == "half-open"


def test_an_entry_is_charged_what_it_holds_headers_and_wire_head_included() -> None:
    import sys

    headers = tuple((f"X-Header-{i}", "v" * 40) for i in range(12))
    held = Entry(
        key="/h",
        status=200,
        headers=headers,
        body=b"x" * 200,
        stored_at=0.0,
        fresh_until=1.0,
        stale_until=1.0,
        swr_until=1.0,
        expires_at=1.0,
    )
    assert held.wire_head is not None  # built at construction, so charged at insert
    floor = (
        sys.getsizeof(held.body)
        + sys.getsizeof(held.wire_head)
        + sys.getsizeof(held)
        + sum(sys.getsizeof(n) + sys.getsizeof(v) for n, v in headers)
    )
    assert held.size >= floor
    tier = MemoryTier(max_bytes=held.size * 12)  # room for 12 (and one may take an eighth)
    for i in range(20):
        tier.set_now(
            KEYS.key(f"/h{i}"),
            Entry(
                key=f"/h{i}",
                status=200,
                headers=headers,
                body=b"x" * 200,
                stored_at=0.0,
                fresh_until=1.0,
                stale_until=1.0,
                swr_until=1.0,
                expires_at=time.time() + 60,
            ),
        )
    assert tier.bytes <= tier.max_bytes and len(tier) <= 12


def test_a_breaker_closed_by_a_probe_reopens_at_the_first_failure() -> None:
    clock = SteppedClock()
    breaker = Breaker(failures_to_open=3, cooldown=5.0, clock=clock)
    for _ in range(3):
        breaker.failure()
    assert breaker.is_open
    breaker.close_after_probe()
    assert breaker.state() == "closed" and breaker.health() == "up"
    breaker.failure()
    assert breaker.is_open  # one failure, not three: the probe's answer was not a lookup's
    clock.advance(5.0)
    assert breaker.allow()
    breaker.success()  # a real operation confirmed it: back to counting failures
    breaker.failure()
    assert not breaker.is_open
