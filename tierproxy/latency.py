"""How long a tier takes, and what that makes its lookup timeout; operations near their timeout.

:class:`AdaptiveTimeout` (``TIERPROXY_ADAPTIVE_TIMEOUTS=on``) keeps a rolling estimate of one
tier's lookup latency in O(1) memory and O(1) time per sample:

* a decayed histogram: fixed log-spaced buckets (a quarter-octave wide, 10 us to ~140 s);
  each new sample weighs a little more than the one before (``growth`` per sample, so a
  sample's weight halves every ``half_life`` samples relative to the newest), rescaled
  rarely so the numbers stay finite. The p99 is the upper bound of the bucket where the top
  1% of the weight begins.
* an exponentially weighted mean and variance with the same half-life.

The effective timeout is ``min(max(p99 * 1.5, mean + 3 sigma, floor), ceiling)``, where
``ceiling`` is the configured ``TIERPROXY_Lx_TIMEOUT`` and ``floor`` is
``TIERPROXY_ADAPTIVE_FLOOR``. It is recomputed every ``refresh`` samples, on every timeout and
on every probe answer, so a lookup reads one attribute. Until ``warmup`` samples have been
seen it is the ceiling.

The same estimate gives hedged lookups (``TIERPROXY_HEDGE=on``, :mod:`tierproxy.readthrough`)
their delay: ``p95``, recomputed with ``current`` and None until ``warmup`` samples have been
seen. With hedging on and adaptive timeouts off, a tier keeps this estimate without using
``current`` (:class:`tierproxy.tiers.base.GuardedTier`).

Timeouts, errors and health probes feed the estimate; two properties are kept.

*A frozen tier costs each lookup the learned timeout until the breaker opens.* An error is a
sample of how long the tier took to fail. A timeout is a sample *at the timeout used* (the
true latency is at least that) and nothing more: the next lookup gets (about) the same
timeout, and the tier's breaker counts it as a failure. Lookups that were in flight together
count once (:class:`tierproxy.tiers.base.GuardedTier` counts a lookup that timed out only if
it began after the last counted timeout ended): a stall of the event loop that times out
every lookup in flight at once is one failure, while a frozen Redis opens the breaker after
``TIERPROXY_BREAKER_FAILURES`` lookups that each waited the learned few milliseconds. (A
handful of timeout samples is more than 1% of the decayed weight, so the p99 itself climbs
to the timeout's bucket and the next timeouts are up to ~1.8 times the learned one - still
milliseconds.)

*A tier that slowed down below its ceiling is not locked at a too-low timeout.* Timeout
samples alone cannot lift the estimate above the timeout used, and once the breaker is open
no lookup reaches the tier, so every lookup could time out, the breaker open, a probe close
it, and so on for ever. The background health probe (:mod:`tierproxy.probes`, under the
configured read timeout) breaks that circle: a probe that answers in ``L`` seconds is passed
to :meth:`AdaptiveTimeout.observe_probe`, which puts a weight of 2% of the histogram's
decayed total into ``L``'s bucket, so the p99 is at least ``L`` and the next effective
timeout at least ``1.5 * L`` (the ceiling at most). A tier slowed to ``L`` thus recovers
through one breaker trip and one probe; its lookups, now answered, keep the estimate there,
and if the tier is fast again the 2% decays like any other sample (below 1% after one
half-life of fast lookups). O(1): one bucket, one recomputation. (A probe that answers late
only because it was sent just before a frozen Redis resumed would lift the timeout to the
ceiling: GuardedTier pings again at once and passes the faster of the two answers.)

:class:`NearTimeout` counts operations that used more than 80% of their timeout
(``tierproxy_near_timeout_total{tier}``) and says so in the log at most once per tier per
10 s (on the injected clock's monotonic reading), with the count since its last line.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_left
from typing import TYPE_CHECKING

from .clock import SYSTEM, Clock

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = ["BUCKET_BOUNDS", "AdaptiveTimeout", "NearTimeout"]

log = logging.getLogger("tierproxy.latency")

#: Upper bounds of the histogram's buckets: 10 us * 2^(i/4), up to ~100 s; one more bucket
#: (the last) takes anything above.
BUCKET_BOUNDS: tuple[float, ...] = tuple(1e-5 * 2 ** (i / 4) for i in range(96))

_RESCALE_AT = 1e100  # sample weights grow geometrically; scaled back to 1 past this
_QUANTILE = 0.99
_P99_FACTOR = 1.5
_SIGMAS = 3.0
#: A probe's answer weighs this share of the histogram (more than 1 - _QUANTILE).
_PROBE_SHARE = 0.02


class AdaptiveTimeout:
    """One tier's lookup timeout, from its recent latencies (see the module docstring).

    ``current`` is the effective timeout: read it, don't call anything, on the request path.
    """

    __slots__ = (
        "_alpha",
        "_counts",
        "_growth",
        "_refresh",
        "_since_refresh",
        "_total",
        "_warmup",
        "_weight",
        "ceiling",
        "current",
        "floor",
        "mean",
        "p95",
        "samples",
        "variance",
    )

    def __init__(
        self,
        ceiling: float,
        floor: float,
        *,
        half_life: int = 256,
        warmup: int = 100,
        refresh: int = 16,
    ) -> None:
        if not 0 < floor <= ceiling:
            raise ValueError(f"need 0 < floor <= ceiling, got floor={floor} ceiling={ceiling}")
        if half_life < 1 or warmup < 1 or refresh < 1:
            raise ValueError("half_life, warmup and refresh must be 1 or more")
        self.ceiling = ceiling
        self.floor = floor
        self._growth = 2.0 ** (1.0 / half_life)
        self._alpha = 1.0 - 2.0 ** (-1.0 / half_life)
        self._warmup = warmup
        self._refresh = refresh
        self._counts = [0.0] * (len(BUCKET_BOUNDS) + 1)
        self._total = 0.0
        self._weight = 1.0
        self._since_refresh = 0
        self.samples = 0
        self.mean = 0.0
        self.variance = 0.0
        #: The effective timeout; the ceiling until ``warmup`` samples were seen.
        self.current = ceiling
        #: The latencies' 95th percentile (a bucket's upper bound); None until ``warmup``
        #: samples were seen. What a hedged lookup waits for before asking the next tier.
        self.p95: float | None = None

    # -- samples ----------------------------------------------------------------------

    def observe(self, seconds: float) -> None:
        """A lookup that succeeded in ``seconds``."""
        self._add(seconds)

    def observe_error(self, seconds: float) -> None:
        """A lookup that failed (not a timeout) after ``seconds``: a sample."""
        self._add(seconds)

    def observe_timeout(self, timeout: float) -> None:
        """A lookup that timed out at ``timeout`` (one this estimate gave): a sample at
        ``timeout`` (its latency was at least that), the estimate recomputed at once. The
        timeout is not widened: a frozen tier costs each lookup the learned timeout until the
        breaker opens; a slowed one is found again by a probe (:meth:`observe_probe`)."""
        self._add(timeout)
        self._refresh_now()

    def observe_probe(self, seconds: float) -> None:
        """A health probe answered in ``seconds``: the p99 is lifted to at least ``seconds``
        (2% of the decayed weight put in its bucket, without counting as a sample), so the
        next effective timeout is at least ``1.5 * seconds``, the ceiling at most."""
        lift = _PROBE_SHARE * self._total + self._weight
        self._counts[bisect_left(BUCKET_BOUNDS, seconds)] += lift
        self._total += lift
        self._refresh_now()

    def sample(self, seconds: float) -> None:
        """A latency sample only: a lookup that timed out at a fixed (not learned) timeout
        took at least ``seconds``."""
        self._add(seconds)

    def _add(self, seconds: float) -> None:
        weight = self._weight
        self._counts[bisect_left(BUCKET_BOUNDS, seconds)] += weight
        self._total += weight
        weight *= self._growth
        if weight > _RESCALE_AT:
            counts = self._counts
            for index, count in enumerate(counts):
                counts[index] = count / weight
            self._total /= weight
            weight = 1.0
        self._weight = weight
        # Exponentially weighted mean and variance (West, 1979), same half-life; the plain
        # average until there are enough samples for that (no bias towards the initial 0).
        self.samples += 1
        alpha = max(self._alpha, 1.0 / self.samples)
        diff = seconds - self.mean
        step = alpha * diff
        self.mean += step
        self.variance = (1.0 - alpha) * (self.variance + diff * step)
        self._since_refresh += 1
        if self._since_refresh >= self._refresh or self.samples == self._warmup:
            self._refresh_now()

    # -- the estimate -----------------------------------------------------------------

    def p99(self) -> float:
        """The upper bound of the bucket holding the 99th percentile of the decayed weight."""
        return self.quantile(_QUANTILE)

    def quantile(self, q: float) -> float:
        """The upper bound of the bucket holding the ``q`` quantile (0 < q < 1) of the
        decayed weight; 0.0 before any sample."""
        counts = self._counts
        tail = self._total * (1.0 - q)
        above = 0.0
        for index in range(len(counts) - 1, -1, -1):
            above += counts[index]
            if above > tail:
                return BUCKET_BOUNDS[index] if index < len(BUCKET_BOUNDS) else math.inf
        return 0.0

    @property
    def sigma(self) -> float:
        return math.sqrt(self.variance)

    def estimate(self) -> float:
        """``max(p99 * 1.5, mean + 3 sigma)``, before the clamp."""
        return max(self.p99() * _P99_FACTOR, self.mean + _SIGMAS * self.sigma)

    def _refresh_now(self) -> None:
        self._since_refresh = 0
        if self.samples < self._warmup:
            self.current = self.ceiling
            return
        self.p95 = self.quantile(0.95)
        self.current = min(self.ceiling, max(self.floor, self.estimate()))


class NearTimeout:
    """Counts a tier's (or the origin's) operations that used more than ``fraction`` of
    their timeout, and logs them at most once per ``interval`` seconds of ``clock``'s
    monotonic reading, with the count since the last line.

    Operations that timed out are not counted here (they are counted as timeouts).
    """

    __slots__ = ("_clock", "_counter", "_next_line", "_pending", "fraction", "interval", "tier")

    def __init__(
        self,
        tier: str,
        metrics: Metrics,
        clock: Clock = SYSTEM,
        *,
        fraction: float = 0.8,
        interval: float = 10.0,
    ) -> None:
        self.tier = tier
        self.fraction = fraction
        self.interval = interval
        self._clock = clock
        self._counter = metrics.near_timeout.labels(tier)
        self._pending = 0
        self._next_line = -math.inf

    def observe(self, elapsed: float, timeout: float) -> bool:
        """``elapsed`` seconds of an operation that had ``timeout``; True when it was near."""
        if elapsed <= self.fraction * timeout:
            return False
        self._counter.inc()
        self._pending += 1
        now = self._clock.monotonic()
        if now >= self._next_line:
            log.warning(
                "%s: %d operation(s) used more than %d%% of their timeout since the last "
                "report (the latest: %.1f ms of %.1f ms)",
                self.tier,
                self._pending,
                round(self.fraction * 100),
                elapsed * 1000,
                timeout * 1000,
            )
            self._pending = 0
            self._next_line = now + self.interval
        return True
