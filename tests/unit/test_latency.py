"""The adaptive timeout's math and the near-timeout monitor (tierproxy.latency).

No sleeping: samples are fed in, and the monitor's rate limit runs on a SteppedClock.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import sys

import pytest
from support.clock import SteppedClock

from tierproxy.config import ConfigError, load_settings
from tierproxy.latency import BUCKET_BOUNDS, AdaptiveTimeout, NearTimeout
from tierproxy.metrics import Metrics

CEILING = 0.1
FLOOR = 0.002
MS = 0.001


def _fed(samples: list[float], **kwargs: int) -> AdaptiveTimeout:
    adaptive = AdaptiveTimeout(CEILING, FLOOR, **kwargs)
    for sample in samples:
        adaptive.observe(sample)
    return adaptive


def _jittered(center: float, count: int, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [center * rng.uniform(0.8, 1.2) for _ in range(count)]


def test_the_buckets_are_quarter_octaves_from_10us_past_any_timeout() -> None:
    assert BUCKET_BOUNDS[0] == pytest.approx(1e-5)
    assert all(b / a == pytest.approx(2**0.25) for a, b in itertools.pairwise(BUCKET_BOUNDS))
    assert BUCKET_BOUNDS[-1] > 100


def test_the_ceiling_until_the_warm_up_then_the_estimate() -> None:
    adaptive = AdaptiveTimeout(CEILING, FLOOR)
    for sample in _jittered(3 * MS, 99):
        adaptive.observe(sample)
    assert adaptive.current == CEILING  # too few samples to trust

    adaptive.observe(3 * MS)
    assert FLOOR < adaptive.current < 10 * MS


def test_steady_latency_gives_max_of_p99_times_1_5_and_mean_plus_3_sigma() -> None:
    adaptive = _fed(_jittered(4 * MS, 1000))

    p99 = adaptive.p99()
    # p99 is the upper bound of a quarter-octave bucket: within 19% above the true one.
    assert 4.8 * MS <= p99 <= 4.8 * MS * 2**0.25
    assert adaptive.mean == pytest.approx(4 * MS, rel=0.05)
    assert 0 < adaptive.sigma < 1 * MS
    expected = max(p99 * 1.5, adaptive.mean + 3 * adaptive.sigma)
    assert adaptive.estimate() == pytest.approx(expected)
    adaptive.observe(4 * MS)  # a refresh is due at most every 16 samples: force one
    for sample in _jittered(4 * MS, 16, seed=2):
        adaptive.observe(sample)
    assert adaptive.current == pytest.approx(
        min(CEILING, max(FLOOR, adaptive.estimate())), rel=0.05
    )
    assert adaptive.current < 10 * MS


def test_a_heavy_tail_of_more_than_1_percent_lifts_the_p99() -> None:
    samples = [20 * MS if i % 50 == 0 else 1 * MS for i in range(2000)]  # 2% slow
    assert _fed(samples).p99() >= 20 * MS

    samples = [20 * MS if i % 400 == 0 else 1 * MS for i in range(2000)]  # 0.25% slow
    light = _fed(samples)
    assert light.p99() < 2 * MS
    # ...but the rare slow ones still widen mean + 3 sigma a little.
    assert light.mean + 3 * light.sigma > 1 * MS


def test_clamped_between_the_floor_and_the_ceiling() -> None:
    assert _fed([10e-6] * 200).current == FLOOR
    assert _fed([1.0] * 200).current == CEILING


def test_the_estimate_follows_a_tier_that_slows_down_and_recovers() -> None:
    adaptive = _fed(_jittered(1 * MS, 500))
    fast = adaptive.current
    assert fast < 5 * MS

    slow_samples = 0
    for sample in _jittered(20 * MS, 200, seed=3):
        adaptive.observe(sample)
        slow_samples += 1
        if adaptive.current > 25 * MS:
            break
    # 1% of the decayed weight (~370 samples' worth) is a handful of samples.
    assert adaptive.current > 25 * MS and slow_samples <= 32, (adaptive.current, slow_samples)

    for sample in _jittered(1 * MS, 3000, seed=4):  # ~12 half-lives: the slow ones fade
        adaptive.observe(sample)
    assert adaptive.current < 2 * fast


def test_a_timeout_is_a_sample_at_the_timeout_not_a_wider_timeout() -> None:
    # A frozen tier: every lookup times out at the learned timeout, and the next lookups
    # must cost (about) that too - not twice, four times... - until the breaker opens.
    adaptive = _fed(_jittered(1 * MS, 500))
    learned = adaptive.current
    assert learned < 5 * MS
    used = []
    for _ in range(5):  # TIERPROXY_BREAKER_FAILURES' default
        used.append(adaptive.current)
        adaptive.observe_timeout(adaptive.current)
    assert adaptive.samples == 505
    # Five samples at the timeout are more than 1% of the decayed weight, so the p99 reaches
    # the timeout's bucket (x 1.5, a quarter-octave bucket's bound): at most ~1.8 x learned.
    assert all(u <= 1.8 * learned for u in used), (learned, used)
    assert adaptive.current <= 1.8 * 1.8 * learned
    assert sum(used) < 5 * 2 * learned


def test_timeouts_alone_stay_far_below_the_ceiling_a_probe_lifts_them() -> None:
    # A tier slowed from 1 ms to 30 ms: lookups time out at the learned timeout. Without the
    # probe, consecutive timeouts would climb only by the p99's bucket each; the breaker opens
    # long before they reach 30 ms. A probe that answers in 30 ms lifts it past that at once.
    adaptive = _fed(_jittered(1 * MS, 500))
    for _ in range(5):
        adaptive.observe_timeout(adaptive.current)
    assert adaptive.current < 10 * MS
    adaptive.observe_probe(30 * MS)
    assert adaptive.current >= 1.5 * 30 * MS, adaptive.current
    assert adaptive.samples == 505  # a probe is not a lookup sample
    # The lookups now answer in ~30 ms: the estimate stays above them.
    for sample in _jittered(30 * MS, 600, seed=5):
        adaptive.observe(sample)
        assert adaptive.current > 30 * MS * 1.2, adaptive.current


def test_a_probe_lift_is_clamped_and_fades_when_the_tier_is_fast_again() -> None:
    adaptive = _fed(_jittered(1 * MS, 500))
    fast = adaptive.current
    adaptive.observe_probe(1.0)  # slower than the ceiling
    assert adaptive.current == CEILING
    for sample in _jittered(1 * MS, 2000, seed=6):  # ~8 half-lives of fast lookups
        adaptive.observe(sample)
    assert adaptive.current < 2 * fast


def test_a_fast_probe_changes_nothing_visible() -> None:
    adaptive = _fed(_jittered(3 * MS, 500))
    before = adaptive.current
    adaptive.observe_probe(0.3 * MS)
    assert adaptive.current == pytest.approx(before, rel=0.2)


def test_a_probe_before_the_warm_up_leaves_the_ceiling() -> None:
    adaptive = AdaptiveTimeout(CEILING, FLOOR)
    adaptive.observe_probe(1 * MS)
    assert adaptive.current == CEILING and adaptive.p95 is None


def test_errors_are_samples() -> None:
    adaptive = _fed(_jittered(1 * MS, 500))
    adaptive.observe_error(0.5 * MS)
    assert adaptive.samples == 501


def test_memory_stays_fixed_and_weights_are_rescaled_before_they_overflow() -> None:
    # half_life=1: each sample weighs twice the one before; 2**400 would overflow a float.
    adaptive = _fed(_jittered(3 * MS, 2000), half_life=1)
    assert len(adaptive._counts) == len(BUCKET_BOUNDS) + 1
    assert all(math.isfinite(count) for count in adaptive._counts)
    assert math.isfinite(adaptive._total) and adaptive._weight < 1e101
    # With such a short memory the estimate is the last few samples'.
    assert 3 * MS <= adaptive.p99() <= 3.6 * MS * 2**0.25
    assert not hasattr(adaptive, "__dict__")


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        AdaptiveTimeout(0.001, 0.002)
    with pytest.raises(ValueError):
        AdaptiveTimeout(0.1, 0.0)


def _near(metrics: Metrics, tier: str) -> float:
    return metrics.near_timeout.labels(tier).value


def test_near_timeouts_are_counted_and_logged_at_most_once_per_10_seconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tierproxy.latency")
    metrics, clock = Metrics(), SteppedClock()
    near = NearTimeout("l2", metrics, clock)

    assert near.observe(0.079, 0.1) is False  # 79%: not near
    assert near.observe(0.08, 0.1) is False  # exactly 80%: not more than
    assert near.observe(0.081, 0.1) is True
    for _ in range(4):
        clock.advance(2.0)
        assert near.observe(0.09, 0.1) is True
    assert _near(metrics, "l2") == 5
    lines = [r.getMessage() for r in caplog.records if r.name == "tierproxy.latency"]
    assert len(lines) == 1 and lines[0].startswith("l2: 1 operation(s)"), lines

    clock.advance(2.0)  # 10 s after the first line
    near.observe(0.095, 0.1)
    lines = [r.getMessage() for r in caplog.records if r.name == "tierproxy.latency"]
    assert len(lines) == 2, lines
    assert lines[1].startswith("l2: 5 operation(s) used more than 80% of their timeout"), lines
    assert "95.0 ms of 100.0 ms" in lines[1]
    assert _near(metrics, "l2") == 6


def test_near_timeout_lines_are_rate_limited_per_tier(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tierproxy.latency")
    metrics, clock = Metrics(), SteppedClock()
    l2, l3 = NearTimeout("l2", metrics, clock), NearTimeout("l3", metrics, clock)
    for _ in range(3):
        l2.observe(0.09, 0.1)
        l3.observe(0.45, 0.5)
    lines = [r.getMessage() for r in caplog.records if r.name == "tierproxy.latency"]
    assert [line[:3] for line in lines] == ["l2:", "l3:"]
    assert (_near(metrics, "l2"), _near(metrics, "l3")) == (3, 3)


def test_adaptive_settings_are_validated_at_start_up() -> None:
    base = {"TIERPROXY_ORIGIN": "http://127.0.0.1:9000", "TIERPROXY_REDIS_URL": "redis://h:1"}
    settings = load_settings(base)
    assert (settings.adaptive_timeouts, settings.adaptive_floor) == (False, 0.002)
    on = load_settings({**base, "TIERPROXY_ADAPTIVE_TIMEOUTS": "on"})
    assert on.adaptive_timeouts is True
    for name, bad in (
        ("TIERPROXY_ADAPTIVE_TIMEOUTS", "yes"),
        ("TIERPROXY_ADAPTIVE_FLOOR", "0"),
        ("TIERPROXY_ADAPTIVE_FLOOR", "-1"),
        ("TIERPROXY_ADAPTIVE_FLOOR", "nan"),
    ):
        with pytest.raises(ConfigError, match=name):
            load_settings({**base, name: bad})
    with pytest.raises(ConfigError, match="TIERPROXY_ADAPTIVE_FLOOR=0.5 is above"):
        load_settings(
            {**base, "TIERPROXY_ADAPTIVE_TIMEOUTS": "on", "TIERPROXY_ADAPTIVE_FLOOR": "0.5"}
        )
    # A floor above a tier's timeout is only a problem when it is used.
    assert load_settings({**base, "TIERPROXY_ADAPTIVE_FLOOR": "0.5"}).adaptive_floor == 0.5


def test_observe_costs_about_a_microsecond() -> None:
    """A rough guard, not the measurement (see the report): the L2 hit path calls it once."""
    import time

    adaptive = AdaptiveTimeout(CEILING, FLOOR)
    samples = _jittered(1 * MS, 20000)
    started = time.perf_counter()
    for sample in samples:
        adaptive.observe(sample)
    per_sample = (time.perf_counter() - started) / len(samples)
    assert per_sample < 20e-6 or sys.gettrace() is not None, per_sample


def test_the_p95_for_hedging_is_there_once_warm_and_follows_the_samples() -> None:
    adaptive = AdaptiveTimeout(CEILING, FLOOR)  # warm-up: 100 samples
    for _ in range(99):
        adaptive.observe(1 * MS)
    assert adaptive.p95 is None  # no hedging on too few samples
    adaptive.observe(1 * MS)
    assert adaptive.p95 is not None and 1 * MS <= adaptive.p95 < 1.2 * MS
    # 90% at 1 ms, 10% at 8 ms: the p95 lies in the slow ones' bucket, the median does not.
    mixed = AdaptiveTimeout(CEILING, FLOOR)
    for i in range(200):
        mixed.observe(8 * MS if i % 10 == 0 else 1 * MS)
    assert mixed.p95 is not None and 8 * MS <= mixed.p95 < 9.6 * MS
    assert 1 * MS <= mixed.quantile(0.5) < 1.2 * MS
    assert mixed.quantile(0.99) == mixed.p99()


def test_a_plain_sample_feeds_the_estimate_at_the_next_refresh() -> None:
    adaptive = _fed([1 * MS] * 100)
    before = adaptive.current
    adaptive.sample(CEILING)  # a lookup that timed out at a fixed timeout
    assert adaptive.samples == 101
    assert adaptive.current == before  # recomputed only at the next refresh
