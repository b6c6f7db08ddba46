"""Jittered backoff (tierproxy.backoff): retry pauses, and the per-key origin backoff on the
injected clock - bounded, and forgotten on success."""

from __future__ import annotations

import random

from support.clock import SteppedClock

from tierproxy.backoff import KeyBackoff, SessionBackoff, full_jitter


def test_full_jitter_stays_within_its_doubling_capped_window() -> None:
    rng = random.Random(7)
    for attempt, window in [(0, 0.01), (1, 0.02), (2, 0.04), (5, 0.25), (40, 0.25)]:
        pauses = [full_jitter(attempt, 0.01, 0.25, rng) for _ in range(200)]
        assert all(0 <= pause <= window for pause in pauses), (attempt, max(pauses))
        assert max(pauses) > window / 2  # spread over the window, not pinned to one value


def test_a_key_backs_off_from_the_threshold_on_within_its_interval() -> None:
    clock = SteppedClock()
    backoff = KeyBackoff(threshold=2, base=0.5, cap=4.0, clock=clock, rng=random.Random(1))
    assert backoff.allow("/k")
    assert backoff.failure("/k") == 0  # one failure: not yet
    assert backoff.allow("/k")
    interval = backoff.failure("/k")
    assert 0.25 <= interval <= 0.5
    assert not backoff.allow("/k")
    assert backoff.allow("/other")
    clock.advance(interval)
    assert backoff.allow("/k")
    # Doubling, then capped; never below half the window.
    intervals = [backoff.failure("/k") for _ in range(8)]
    assert 0.5 <= intervals[0] <= 1.0
    assert 1.0 <= intervals[1] <= 2.0
    assert all(2.0 <= interval <= 4.0 for interval in intervals[3:]), intervals


def test_success_forgets_the_key() -> None:
    clock = SteppedClock()
    backoff = KeyBackoff(threshold=1, clock=clock)
    backoff.failure("/k")
    assert not backoff.allow("/k")
    backoff.success("/k")
    assert backoff.allow("/k")
    assert len(backoff) == 0


def test_memory_is_bounded_least_recently_failed_first() -> None:
    backoff = KeyBackoff(threshold=1, limit=3, clock=SteppedClock())
    for key in ("/a", "/b", "/c", "/d"):
        backoff.failure(key)
    assert len(backoff) == 3
    assert backoff.allow("/a")  # dropped: the oldest
    assert not backoff.allow("/d")
    backoff.failure("/b")  # failing again makes it the most recent
    backoff.failure("/e")
    assert backoff.allow("/c") and not backoff.allow("/b")


def test_session_backoff_grows_with_early_ends_and_starts_over_after_a_lasting_run() -> None:
    backoff = SessionBackoff(base=0.1, cap=1.0, stable_after=10.0)
    pauses = [backoff.pause(lived=0.5) for _ in range(6)]
    # equal jitter: each pause within [window/2, window], window 0.1, 0.2, 0.4, 0.8, 1.0, 1.0
    for pause, window in zip(pauses, (0.1, 0.2, 0.4, 0.8, 1.0, 1.0), strict=True):
        assert window / 2 <= pause <= window
    assert backoff.attempt == 6
    assert 0.05 <= backoff.pause(lived=10.0) <= 0.1  # a run that lasted: the first window
    assert backoff.attempt == 1
