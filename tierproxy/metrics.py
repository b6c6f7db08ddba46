"""Prometheus metrics, one registry per proxy instance (no globals: tests run several).

Label children used on the hot path are bound once here, so a hit costs a dict lookup and an
increment, not a ``labels()`` call.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics", "TIER_OUTCOMES", "X_CACHE_VALUES"]

TIER_OUTCOMES = ("hit", "stale", "miss", "timeout", "error", "skipped", "corrupt")
X_CACHE_VALUES = (
    "HIT-L1", "HIT-L2", "HIT-L3", "MISS", "STALE-L1", "STALE-L2", "STALE-L3", "REVALIDATED", "BYPASS",
)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")

# Sub-millisecond resolution for L1/L2, up to the default request deadline and beyond.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tier_lookups = Counter(
            "tierproxy_tier_lookups", "Cache tier lookups by outcome", ["tier", "outcome"], registry=r
        )
        self.tier_op_seconds = Histogram(
            "tierproxy_tier_op_seconds", "Latency of successful tier operations",
            ["tier", "op"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.tier_write_outcomes = Counter(
            "tierproxy_tier_writes", "Tier writes (set/delete) by outcome",
            ["tier", "op", "outcome"], registry=r,
        )
        self.origin_fetches = Counter(
            "tierproxy_origin_fetches", "Origin fetches by outcome", ["outcome"], registry=r
        )
        self.origin_fetch_seconds = Histogram(
            "tierproxy_origin_fetch_seconds", "Origin time to response headers",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.responses = Counter(
            "tierproxy_responses", "Responses by X-Cache value and status class",
            ["cache", "status_class"], registry=r,
        )
        self.stale_served = Counter(
            "tierproxy_stale_served", "Stale copies served, by reason", ["reason"], registry=r
        )
        self.backfills = Counter(
            "tierproxy_backfills", "Background tier writes", ["tier", "outcome"], registry=r
        )
        self.coalesced_waiters = Counter(
            "tierproxy_coalesced_waiters", "Requests that waited on another request's origin fetch",
            registry=r,
        )
        self.background_dropped = Counter(
            "tierproxy_background_dropped", "Background tasks refused because the set was full",
            registry=r,
        )
        self.inflight = Gauge("tierproxy_inflight_requests", "Requests being handled", registry=r)
        self.background_tasks = Gauge(
            "tierproxy_background_tasks", "Background tasks running", registry=r
        )
        self.breaker_open = Gauge(
            "tierproxy_breaker_open", "1 while a tier's breaker is open", ["tier"], registry=r
        )
        self.tier_timeout = Gauge(
            "tierproxy_tier_timeout_seconds", "Effective lookup timeout per tier", ["tier"], registry=r
        )
        self.l1_bytes = Gauge("tierproxy_l1_bytes", "Bytes held in L1", registry=r)
        self.l1_entries = Gauge("tierproxy_l1_entries", "Entries held in L1", registry=r)
        self.l3_bytes = Gauge("tierproxy_l3_bytes", "Bytes held in L3", registry=r)
        self.l3_entries = Gauge("tierproxy_l3_entries", "Entries held in L3", registry=r)
        self._responses = {
            (cache, cls): self.responses.labels(cache, cls)
            for cache in X_CACHE_VALUES
            for cls in STATUS_CLASSES
        }

    def tier_lookup_counters(self, tier: str) -> dict[str, Counter]:
        return {outcome: self.tier_lookups.labels(tier, outcome) for outcome in TIER_OUTCOMES}

    def tier_latency(self, tier: str) -> dict[str, Histogram]:
        return {op: self.tier_op_seconds.labels(tier, op) for op in ("get", "set", "delete")}

    def response(self, x_cache: str, status: int) -> None:
        cls = f"{status // 100}xx"
        child = self._responses.get((x_cache, cls))
        if child is None:
            child = self.responses.labels(x_cache, cls)
        child.inc()
