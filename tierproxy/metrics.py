"""Prometheus metrics, one registry per proxy instance (no globals: tests run several).

Label children used on the hot path are bound once here, so a hit costs a dict lookup and an
increment, not a ``labels()`` call.

``tierproxy_tier_lookups_total{tier, outcome}`` is the per-tier view. For ``l1``/``l2``/``l3``
one lookup has exactly one outcome: ``hit`` (fresh copy), ``stale`` (a copy past its freshness,
still usable for revalidation or stale serving), ``miss`` (nothing, or a Vary variant for other
request headers), ``timeout``, ``error``, ``skipped`` (breaker open, no deadline left, or
the tier's storage unavailable - e.g. the L3 file being reopened) or ``corrupt`` (unreadable
entry, deleted). ``tierproxy_tier_writes_total{tier, op, outcome}``: ``ok``, ``timeout``,
``error``, ``full`` (no room even after evicting: skipped) or ``skipped`` (the writes'
breaker is open - ``tierproxy_breaker_open{tier="<tier>-writes"}`` - or the storage is
unavailable). For ``origin`` one fetch has one outcome: ``hit`` (an
answer below 500), ``error`` (refused, broken or a 5xx), ``timeout`` or ``skipped`` (deadline
already spent); ``tierproxy_origin_fetches_total{outcome}`` keeps the 5xx/error split.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "BREAKER_STATES",
    "TIER_OUTCOMES",
    "X_CACHE_VALUES",
    "LoopCounter",
    "LoopHistogram",
    "Metrics",
    "group_registry",
    "multiprocess_mode",
]

TIER_OUTCOMES = ("hit", "stale", "miss", "timeout", "error", "skipped", "corrupt")
X_CACHE_VALUES = (
    "HIT-L1",
    "HIT-L2",
    "HIT-L3",
    "MISS",
    "STALE-L1",
    "STALE-L2",
    "STALE-L3",
    "REVALIDATED",
    "BYPASS",
)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
BREAKER_STATES = ("closed", "open", "half-open")

# Sub-millisecond resolution for L1/L2, up to the default request deadline and beyond.
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class LoopHistogramChild:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Prometheus "le": a value equal to a bound belongs to that bound's bucket.
        self.counts[bisect_left(LATENCY_BUCKETS, value)] += 1
        self.sum += value


class LoopCounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


ChildT = TypeVar("ChildT", LoopHistogramChild, LoopCounterChild)


class _LoopCollector(Collector, Generic[ChildT]):
    """Labelled children updated and scraped on the event loop thread only: no locks.

    prometheus_client's metrics take a lock per update (~0.5 us for a Counter, ~2 us for a
    Histogram); these cost an addition or two, which is what lets every lookup and response
    be counted on the hit path.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        child: type[ChildT],
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._child: type[ChildT] = child
        self._children: dict[tuple[str, ...], ChildT] = {}
        registry.register(self)

    def labels(self, *values: str) -> ChildT:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}")
            child = self._children[values] = self._child()
        return child

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            self._add(family, list(values), child)
        return [family]

    def _family(self) -> Metric:
        raise NotImplementedError

    def _add(self, family: Metric, values: list[str], child: ChildT) -> None:
        raise NotImplementedError


class LoopHistogram(_LoopCollector[LoopHistogramChild]):
    """A Histogram (``_bucket``/``_count``/``_sum``, same name and labels) without locks."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        super().__init__(name, documentation, labelnames, registry, LoopHistogramChild)

    def _family(self) -> Metric:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: Metric, values: list[str], child: LoopHistogramChild) -> None:
        assert isinstance(family, HistogramMetricFamily)
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), child.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        family.add_metric(values, buckets, child.sum)


class LoopCounter(_LoopCollector[LoopCounterChild]):
    """A Counter (``<name>_total``, same name and labels) without locks."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        super().__init__(name, documentation, labelnames, registry, LoopCounterChild)

    def _family(self) -> Metric:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: Metric, values: list[str], child: LoopCounterChild) -> None:
        assert isinstance(family, CounterMetricFamily)
        family.add_metric(values, child.value)


def multiprocess_mode() -> bool:
    """Whether this process is one of a group of workers (``TIERPROXY_WORKERS`` > 1): its
    prometheus_client values then live in files in ``PROMETHEUS_MULTIPROC_DIR`` (set by the
    supervisor before the worker starts), summed by the supervisor's /metrics."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def group_registry(directory: str) -> CollectorRegistry:
    """The supervisor's registry: every worker's values in ``directory``, aggregated."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry


class _Gauge(Gauge):
    """A Gauge whose ``set_function`` also works for a group of workers.

    In multiprocess mode prometheus_client reads values from the workers' files, never by
    calling a function: there the function is kept and :meth:`Metrics.sync` writes its value.
    Group values are the sum over live workers (``livesum``) unless said otherwise.
    """

    _function: Callable[[], float] | None = None

    def __init__(self, *args: Any, multiprocess_mode: str = "livesum", **kwargs: Any) -> None:
        super().__init__(*args, multiprocess_mode=multiprocess_mode, **kwargs)  # type: ignore[misc, arg-type]

    def set_function(self, f: Callable[[], float]) -> None:
        if multiprocess_mode():
            self._function = f
        else:
            super().set_function(f)

    def sync(self) -> None:
        children: list[Any] = list(self._metrics.values()) if self._labelnames else [self]
        for child in children:
            if child._function is not None:
                child.set(child._function())


class _Shadows:
    """Multiprocess mode: the loop-local collectors' values copied into prometheus_client
    metrics (so into the worker's files) by :meth:`Metrics.sync`, as deltas."""

    def __init__(self) -> None:
        self._counters: dict[str, Counter] = {}
        self._histograms: dict[str, Histogram] = {}
        self._seen: dict[tuple[str, tuple[str, ...]], list[float]] = {}

    def _delta(self, name: str, values: tuple[str, ...], now: list[float]) -> list[float]:
        before = self._seen.get((name, values)) or [0.0] * len(now)
        self._seen[(name, values)] = list(now)
        return [a - b for a, b in zip(now, before, strict=True)]

    def counter(self, source: LoopCounter) -> None:
        shadow = self._counters.get(source.name)
        if shadow is None:
            shadow = self._counters[source.name] = Counter(
                source.name, source.documentation, source.labelnames, registry=None
            )
        for values, child in list(source._children.items()):
            (delta,) = self._delta(source.name, values, [child.value])
            if delta > 0:
                (shadow.labels(*values) if values else shadow).inc(delta)

    def histogram(self, source: LoopHistogram) -> None:
        shadow = self._histograms.get(source.name)
        if shadow is None:
            shadow = self._histograms[source.name] = Histogram(
                source.name,
                source.documentation,
                source.labelnames,
                registry=None,
                buckets=LATENCY_BUCKETS,
            )
        for values, child in list(source._children.items()):
            *counts, total = self._delta(
                source.name, values, [float(c) for c in child.counts] + [child.sum]
            )
            target: Any = shadow.labels(*values) if values else shadow
            # prometheus_client has no public "add n observations to bucket i"; its buckets
            # and sum are these values (non-cumulative per bucket, as LoopHistogramChild's).
            for bucket, delta in zip(target._buckets, counts, strict=True):
                if delta:
                    bucket.inc(delta)
            if total:
                target._sum.inc(total)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # The two counters every hit touches are loop-local (no lock per increment).
        self.tier_lookups = LoopCounter(
            "tierproxy_tier_lookups",
            "Cache tier lookups by outcome",
            ["tier", "outcome"],
            registry=r,
        )
        self.tier_op_seconds = LoopHistogram(
            "tierproxy_tier_op_seconds",
            "Latency of successful tier operations",
            ["tier", "op"],
            registry=r,
        )
        self.tier_write_outcomes = Counter(
            "tierproxy_tier_writes",
            "Tier writes (set/delete) by outcome",
            ["tier", "op", "outcome"],
            registry=r,
        )
        self.origin_fetches = Counter(
            "tierproxy_origin_fetches", "Origin fetches by outcome", ["outcome"], registry=r
        )
        self.origin_fetch_seconds = Histogram(
            "tierproxy_origin_fetch_seconds",
            "Origin time to response headers",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.origin_connections_discarded = Counter(
            "tierproxy_origin_connections_discarded",
            "Pooled origin connections closed instead of reused because bytes no request asked "
            "for arrived on them (unsolicited-bytes) or were found before reuse "
            "(unread-before-reuse)",
            ["reason"],
            registry=r,
        )
        self.origin_busy = Counter(
            "tierproxy_origin_busy",
            "Requests that found no free origin connection within TIERPROXY_ORIGIN_QUEUE_TIMEOUT "
            "(answered stale or 503; not origin failures)",
            registry=r,
        )
        self.streams_cut = Counter(
            "tierproxy_streams_cut",
            "Streamed pass-through responses cut off mid-body, by reason (origin-error, "
            "origin-timeout, stream-timeout, client-stalled, client-gone, local-error)",
            ["reason"],
            registry=r,
        )
        self.local_errors = Counter(
            "tierproxy_local_errors",
            "Unexpected errors in tierproxy's own code on the request path (answered 500; "
            "never counted against the origin)",
            ["where"],
            registry=r,
        )
        self.responses = LoopCounter(
            "tierproxy_responses",
            "Responses by X-Cache value and status class",
            ["cache", "status_class"],
            registry=r,
        )
        self.stale_served = Counter(
            "tierproxy_stale_served", "Stale copies served, by reason", ["reason"], registry=r
        )
        self.backfills = Counter(
            "tierproxy_backfills", "Background tier writes", ["tier", "outcome"], registry=r
        )
        self.hit_path_collector = LoopCounter(
            "tierproxy_hit_path_responses",
            "Fresh L1 hits answered by the connection handler itself (a subset of responses)",
            [],
            registry=r,
        )
        self.hit_path_responses = self.hit_path_collector.labels()
        self.coalesced_waiters = Counter(
            "tierproxy_coalesced_waiters",
            "Requests that waited on another request's origin fetch",
            registry=r,
        )
        self.background_dropped = Counter(
            "tierproxy_background_dropped",
            "Background tasks refused because the set was full",
            registry=r,
        )
        self.background_inline = Counter(
            "tierproxy_background_inline",
            "Required writes (invalidations) run by the request itself because their lane was full",
            registry=r,
        )
        self.inflight = _Gauge("tierproxy_inflight_requests", "Requests being handled", registry=r)
        self.background_tasks = _Gauge(
            "tierproxy_background_tasks", "Background tasks running", registry=r
        )
        self.breaker_open = _Gauge(
            "tierproxy_breaker_open", "1 while a tier's breaker is open", ["tier"], registry=r
        )
        self.tier_timeout = _Gauge(
            "tierproxy_tier_timeout_seconds",
            "Effective lookup timeout per tier",
            ["tier"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.l1_bytes = _Gauge("tierproxy_l1_bytes", "Bytes held in L1", registry=r)
        self.l1_entries = _Gauge("tierproxy_l1_entries", "Entries held in L1", registry=r)
        self.l3_bytes = _Gauge("tierproxy_l3_bytes", "Bytes held in L3", registry=r)
        self.l3_entries = _Gauge("tierproxy_l3_entries", "Entries held in L3", registry=r)
        self.l3_file_bytes = _Gauge(
            "tierproxy_l3_file_bytes", "Bytes the L3 file and its WAL take on disk", registry=r
        )
        self.l3_recoveries = Counter(
            "tierproxy_l3_recoveries",
            "L3 files found missing, replaced or corrupt under the running proxy and reopened",
            ["reason"],
            registry=r,
        )
        self.breaker_state = _Gauge(
            "tierproxy_breaker_state",
            "1 for the breaker's current state (closed, open, half-open)",
            ["tier", "state"],
            registry=r,
        )
        self.tier_state = _Gauge(
            "tierproxy_tier_state",
            "1 for each tier's readiness state (up, degraded, breaker-open, unavailable)",
            ["tier", "state"],
            registry=r,
        )
        self.request_deadline = _Gauge(
            "tierproxy_request_deadline_seconds",
            "The whole request's budget",
            registry=r,
            multiprocess_mode="livemax",
        )
        # -- purge and invalidation --------------------------------------------------------
        self.purge_requests = Counter(
            "tierproxy_purge_requests",
            "Purge requests by where they came from and outcome",
            ["source", "outcome"],
            registry=r,
        )
        self.purged_entries = Counter(
            "tierproxy_purged_entries",
            "Entries removed (hard) or marked stale (soft) by purges",
            ["tier", "mode"],
            registry=r,
        )
        self.invalidations_published = Counter(
            "tierproxy_invalidations_published",
            "Purge messages published to the other replicas",
            ["outcome"],
            registry=r,
        )
        self.invalidations_received = Counter(
            "tierproxy_invalidations_received",
            "Purge messages received from other replicas",
            ["outcome"],
            registry=r,
        )
        self.invalidation_connected = _Gauge(
            "tierproxy_invalidation_connected",
            "1 while subscribed to the replicas' invalidation channel",
            registry=r,
        )
        self.l1_clears = Counter(
            "tierproxy_l1_clears",
            "Whole-L1 clears (on (re)connecting to the invalidation channel)",
            ["reason"],
            registry=r,
        )
        # -- client connections (file descriptors) ----------------------------------------
        self.client_connections = _Gauge(
            "tierproxy_client_connections", "Open client connections", ["listener"], registry=r
        )
        self.client_connections_max = _Gauge(
            "tierproxy_client_connections_max",
            "The client connection cap (TIERPROXY_MAX_CLIENT_CONNECTIONS or derived from "
            "RLIMIT_NOFILE)",
            ["listener"],
            registry=r,
        )
        self.client_connections_shed = Counter(
            "tierproxy_client_connections_shed",
            "Client connections closed at the cap: idle-closed (oldest idle keep-alive first) "
            "or refused (503, none idle)",
            ["listener", "action"],
            registry=r,
        )
        self.client_connection_cap_episodes = Counter(
            "tierproxy_client_connection_cap_episodes",
            "Times the client connections reached the cap (each logged once)",
            ["listener"],
            registry=r,
        )
        self.purge_lease_held = _Gauge(
            "tierproxy_purge_lease_held",
            "1 while this replica holds its purge lease (its local copies may be served fresh)",
            registry=r,
        )
        self.local_distrusts = Counter(
            "tierproxy_local_distrusts",
            "Local copies (L1, L3) stored before now made untrusted: connect, gap, purge-failed",
            ["reason"],
            registry=r,
        )
        self.purge_replicas = Counter(
            "tierproxy_purge_replicas",
            "Other replicas per published purge: acked, fenced (lease ran out), unconfirmed",
            ["outcome"],
            registry=r,
        )
        self.log_dropped = _Gauge(
            "tierproxy_log_lines_dropped",
            "Log lines dropped because the log buffer was full",
            registry=r,
        )
        # -- timeouts (tierproxy.latency) and active health probes ---------------------------
        self.near_timeout = LoopCounter(
            "tierproxy_near_timeout",
            "Tier and origin operations that completed but used more than 80% of their "
            "(effective) timeout",
            ["tier"],
            registry=r,
        )
        self.tier_probes = Counter(
            "tierproxy_tier_probes",
            "Background health probes of a tier whose lookups' breaker is open, by outcome "
            "(ok: the breaker closed; failed, timeout, error)",
            ["tier", "outcome"],
            registry=r,
        )
        self.tier_probe_failures = _Gauge(
            "tierproxy_tier_probe_failures",
            "Consecutive failed background probes of a tier (0: not backing off)",
            ["tier"],
            registry=r,
        )
        self.tier_probe_backoff = _Gauge(
            "tierproxy_tier_probe_backoff_seconds",
            "The wait drawn before the next background probe of a tier whose probes keep "
            "failing (exponential, jittered, capped; 0: not backing off)",
            ["tier"],
            registry=r,
        )
        # -- origin retries --------------------------------------------------------------
        self.origin_retries = Counter(
            "tierproxy_origin_retries",
            "Retries of a GET/HEAD whose origin connection failed before any response byte: "
            "ok (the retry got an answer), failed (it failed too), skipped (no time left "
            "within the request deadline)",
            ["outcome"],
            registry=r,
        )
        # -- load shedding (TIERPROXY_MAX_INFLIGHT, tierproxy.upstream.InflightLimit) --------
        self.shed = Counter(
            "tierproxy_shed",
            "Requests not sent to the origin because TIERPROXY_MAX_INFLIGHT requests needed "
            "it already (answered with a stale copy or 503; not origin failures), by why the "
            "origin was needed (RFC 9211 fwd: miss, stale, bypass, method)",
            ["fwd"],
            registry=r,
        )
        self.origin_inflight = _Gauge(
            "tierproxy_origin_inflight",
            "Requests that need the origin now: fetches (not the requests sharing them), "
            "pass-throughs, background refreshes; waiting for a connection or its answer",
            registry=r,
        )
        # -- hedged lookups (TIERPROXY_HEDGE, tierproxy.readthrough) ----------------------
        self.hedges = Counter(
            "tierproxy_hedges",
            "Hedged lookups: started (L2 had not answered by its recent p95, so L3 was asked "
            "too), won (L3 answered first with a fresh copy; L2's lookup was cancelled)",
            ["outcome"],
            registry=r,
        )
        self.coalesce_leases = Counter(
            "tierproxy_coalesce_leases",
            "TIERPROXY_COALESCE=cluster: fetch leases in Redis by outcome - acquired (this "
            "replica fetched), waited-hit (served the entry another replica stored), "
            "waited-unstored (its answer was not stored: fetched at once), waited-timeout (no "
            "entry by the end of the wait: fetched), error (Redis failed: fetched, as local)",
            ["outcome"],
            registry=r,
        )
        self._shadows: _Shadows | None = None
        self._loop_collectors = [
            self.tier_lookups,
            self.tier_op_seconds,
            self.responses,
            self.hit_path_collector,
            self.near_timeout,
        ]
        self._responses = {
            (cache, cls): self.responses.labels(cache, cls)
            for cache in X_CACHE_VALUES
            for cls in STATUS_CLASSES
        }

    def sync(self) -> None:
        """Multiprocess mode (a worker of a group): write what is computed or counted in this
        process only (function gauges, the loop-local collectors) to the worker's files, for
        the supervisor's /metrics. Called about every second, and at shutdown."""
        if self._shadows is None:
            self._shadows = _Shadows()
        for value in list(vars(self).values()):
            if isinstance(value, _Gauge):
                value.sync()
        for collector in self._loop_collectors:
            if isinstance(collector, LoopCounter):
                self._shadows.counter(collector)
            elif isinstance(collector, LoopHistogram):
                self._shadows.histogram(collector)

    def tier_lookup_counters(self, tier: str) -> dict[str, LoopCounterChild]:
        return {outcome: self.tier_lookups.labels(tier, outcome) for outcome in TIER_OUTCOMES}

    def tier_latency(self, tier: str) -> dict[str, LoopHistogramChild]:
        return {
            op: self.tier_op_seconds.labels(tier, op) for op in ("get", "set", "delete", "purge")
        }

    def response(self, x_cache: str, status: int) -> None:
        cls = f"{status // 100}xx"
        child = self._responses.get((x_cache, cls))
        if child is None:
            child = self.responses.labels(x_cache, cls)
        child.inc()
