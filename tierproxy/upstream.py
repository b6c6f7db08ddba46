"""The origin, as the request path asks it: one fetch per call, under the request's budget,
each outcome counted, and the origin's breaker fed by what the origin did.

:meth:`Upstream.fetch` asks for a cacheable request (conditionally when a stale copy is held,
RFC 9111 §4.3.1) and decides whether the answer may be stored (:mod:`tierproxy.policy`);
:meth:`Upstream.forward` passes on a request the cache does not answer. Neither writes to a
tier: storing and invalidating are the orchestrator's (:mod:`tierproxy.readthrough`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from multidict import CIMultiDict

from . import policy, variants
from .backoff import KeyBackoff, full_jitter
from .clock import SYSTEM, Clock
from .entry import Entry
from .latency import NearTimeout
from .metrics import Metrics
from .origin import (
    OriginBusy,
    OriginClient,
    OriginError,
    OriginResponse,
    OriginTimeout,
    OriginUnanswered,
    rewritten_fields,
    upstream_headers,
)
from .states import Failed, OriginFailed, Outcome, ProxyRequest, Relayed, Stored, Unstorable
from .tiers.base import Breaker

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["InflightLimit", "Upstream"]

log = logging.getLogger("tierproxy.readthrough")


# Retries of a request whose origin connection failed before any response byte: full jitter
# over RETRY_BASE * 2**n seconds, at most RETRY_CAP; a retry is sent only when, after its
# pause, at least RETRY_MIN_TIME of the origin budget and the request deadline is left.
RETRY_BASE = 0.01
RETRY_CAP = 0.25
RETRY_MIN_TIME = 0.05
# Methods a retry may repeat (RFC 9110 §9.2.2: idempotent, and safe to repeat for a cache).
_RETRYABLE = ("GET", "HEAD")

# origin_fetches outcome -> the origin's row in the per-tier view (tier_lookups).
_ORIGIN_LOOKUP = {
    "ok": "hit",
    "5xx": "error",
    "error": "error",
    "timeout": "timeout",
    "skipped": "skipped",
}


class InflightLimit:
    """The requests that need the origin right now, and load shedding above
    TIERPROXY_MAX_INFLIGHT (``limit``; 0: off).

    Counted where a request is about to ask the origin (:meth:`Upstream.fetch`,
    :meth:`Upstream.forward`): a key's single flight (a request sharing another's fetch
    never gets here: it needs no connection of its own), a pass-through, a background
    refresh - from before it waits for an origin connection until its answer's head (and a
    body that fits TIERPROXY_MAX_ENTRY_BYTES) is in. A body streamed through afterwards is
    bounded by the origin pool and TIERPROXY_STREAM_TIMEOUT instead. ``enter()`` is False
    when ``limit`` requests are in already: that request is shed (not counted). Each shedding
    episode is logged once; it ends when the count falls to half the limit.
    """

    __slots__ = ("_gauge", "_shed_since", "count", "limit")

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.count = 0
        self._gauge = metrics.origin_inflight
        self._shed_since: int | None = None  # requests shed in this episode; None: none

    def enter(self) -> bool:
        if self.limit and self.count >= self.limit:
            if self._shed_since is None:
                self._shed_since = 0
                log.warning(
                    "origin: %d requests need the origin at once (TIERPROXY_MAX_INFLIGHT): "
                    "shedding the next ones (a stale copy or 503) until half as many do",
                    self.count,
                )
            self._shed_since += 1
            return False
        self.count += 1
        self._gauge.inc()
        return True

    def leave(self) -> None:
        self.count -= 1
        self._gauge.dec()
        if self._shed_since is not None and self.count <= self.limit // 2:
            log.info("origin: shedding over, %d requests were shed", self._shed_since)
            self._shed_since = None


class Upstream:
    """The origin client with its breaker and its counters (see module)."""

    def __init__(
        self,
        *,
        origin: OriginClient,
        metrics: Metrics,
        cache_policy: policy.CachePolicy,
        origin_timeout: float,
        max_entry_bytes: int,
        unkeyed_denylist: frozenset[str],
        breaker_failures: int,
        breaker_cooldown: float,
        retries: int = 1,
        max_inflight: int = 0,
        clock: Clock = SYSTEM,
    ) -> None:
        self.origin = origin
        self.metrics = metrics
        self.policy = cache_policy
        self.origin_timeout = origin_timeout
        self.max_entry_bytes = max_entry_bytes
        self.unkeyed_denylist = unkeyed_denylist
        self._rewritten = rewritten_fields(unkeyed_denylist)
        # Opens after TIERPROXY_BREAKER_FAILURES consecutive origin failures: while open, a
        # request holding a stale copy it may serve gets it at once instead of waiting out
        # the origin timeout; misses still go to the origin, and one request per cooldown
        # probes it. Its failure count is also the origin's readiness state (degraded).
        self.breaker = Breaker(breaker_failures, breaker_cooldown, clock=clock)
        # Per key, while the origin keeps failing for it (timeouts, errors, 5xx; as many in a
        # row as open the breaker): a request holding a stale copy it may serve gets it, and
        # the origin is asked for that key at most once per backoff interval
        # (tierproxy.backoff, states.on_stale).
        self.backoff = KeyBackoff(threshold=breaker_failures, clock=clock)
        self.retries = retries
        # Above TIERPROXY_MAX_INFLIGHT requests needing the origin, more are shed at once.
        self.inflight = InflightLimit(max_inflight, metrics)
        self._retries = {
            name: metrics.origin_retries.labels(name) for name in ("ok", "failed", "skipped")
        }
        self._outcomes = {
            name: metrics.origin_fetches.labels(name) for name in ("ok", "5xx", "timeout", "error")
        }
        self._lookups = metrics.tier_lookup_counters("origin")
        self._latency = metrics.tier_op_seconds.labels("origin", "get")
        # Fetches that answered but used more than 80% of their budget (a timeout to come).
        self.near_timeout = NearTimeout("origin", metrics, clock)

    @classmethod
    def from_settings(
        cls, settings: Settings, origin: OriginClient, metrics: Metrics, *, clock: Clock = SYSTEM
    ) -> Upstream:
        return cls(
            origin=origin,
            metrics=metrics,
            cache_policy=policy.CachePolicy(
                settings.default_ttl,
                settings.max_stale,
                settings.max_ttl,
                settings.targeted_fields,
            ),
            origin_timeout=settings.origin_timeout,
            max_entry_bytes=settings.max_entry_bytes,
            unkeyed_denylist=settings.unkeyed_denylist,
            breaker_failures=settings.breaker_failures,
            breaker_cooldown=settings.breaker_cooldown,
            retries=settings.origin_retries,
            max_inflight=settings.max_inflight,
            clock=clock,
        )

    def _count(self, outcome: str) -> None:
        """Count one origin fetch's outcome; only what the origin did moves its breaker.

        ``skipped`` (the deadline was spent before asking), ``busy`` (no free origin
        connection within TIERPROXY_ORIGIN_QUEUE_TIMEOUT), ``shed`` (not asked: too many
        requests needed it, see :class:`InflightLimit`) and ``local-error`` (tierproxy's own
        bug) say nothing about the origin: they have their own counters and never count
        against its breaker (nor, in the callers, against the key's backoff).
        """
        if outcome in ("busy", "shed", "local-error", "skipped"):
            # Whatever the breaker let through as its probe did not reach the origin: the
            # next request probes instead (else a half-open breaker waits out a cooldown).
            self.breaker.probing = False
        if outcome == "busy":
            self.metrics.origin_busy.inc()
            self._lookups["skipped"].inc()
            return
        if outcome == "shed":
            self._lookups["skipped"].inc()
            return
        if outcome == "local-error":
            self.metrics.local_errors.labels("origin-fetch").inc()
            self._lookups["error"].inc()
            return
        self._outcomes["timeout" if outcome == "skipped" else outcome].inc()
        self._lookups[_ORIGIN_LOOKUP[outcome]].inc()
        if outcome == "ok":
            self.breaker.success()
        elif outcome != "skipped":  # a spent deadline says nothing about the origin
            self.breaker.failure()

    async def _ask(
        self,
        req: ProxyRequest,
        method: str,
        headers: CIMultiDict[str],
        body: bytes | None,
        budget: float,
    ) -> OriginResponse:
        """One request to the origin, retried when its connection failed before any response
        byte (:class:`~tierproxy.origin.OriginUnanswered`) and ``method`` may be repeated: at
        most ``retries`` times, after a jittered pause, and only while the origin budget and
        the request deadline leave time for it. Never after a timeout (the budget is spent),
        once response bytes arrived, or after a 5xx (that is an answer)."""
        loop = asyncio.get_running_loop()
        ends = min(loop.time() + budget, req.deadline)
        retries = self.retries if method in _RETRYABLE else 0
        for attempt in range(retries + 1):
            try:
                response = await self.origin.fetch(
                    method,
                    req.key.target,
                    headers,
                    body,
                    budget,
                    self.max_entry_bytes,
                    deadline=req.deadline,
                )
            except OriginUnanswered as exc:
                if attempt:
                    self._retries["failed"].inc()
                if attempt == retries:
                    raise
                pause = full_jitter(attempt, RETRY_BASE, RETRY_CAP)
                budget = ends - loop.time() - pause
                if budget < RETRY_MIN_TIME:
                    self._retries["skipped"].inc()
                    raise
                log.info(
                    "origin connection failed before an answer for %r (%s): retrying in %.3fs",
                    req.key.material[:200],
                    exc,
                    pause,
                )
                await asyncio.sleep(pause)
                continue
            if attempt:
                self._retries["ok"].inc()
            return response
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _key_outcome(self, req: ProxyRequest, failed: bool) -> None:
        """What the origin did for this key feeds its backoff (tierproxy.backoff)."""
        if failed:
            self.backoff.failure(req.key.material)
        else:
            self.backoff.success(req.key.material)

    async def fetch(self, req: ProxyRequest, stale: Entry | None) -> Outcome:
        """Ask the origin for ``req``'s key (a HEAD fills the cache too: the GET it stands
        for); validate ``stale`` when it is given. Whether the answer is stored is decided
        here (``Stored.keep``, ``Unstorable.invalidates``); nothing is written."""
        loop = asyncio.get_running_loop()
        budget = min(self.origin_timeout, req.deadline - loop.time())
        if budget <= 0:
            self._count("skipped")
            return OriginFailed("origin-timeout")
        if not self.inflight.enter():
            self._shed("miss" if stale is None else "stale")
            return OriginFailed("shed")
        try:
            return await self._fetch(req, stale, budget)
        finally:
            self.inflight.leave()

    def _shed(self, fwd: str) -> None:
        self._count("shed")
        self.metrics.shed.labels(fwd).inc()

    async def _fetch(self, req: ProxyRequest, stale: Entry | None, budget: float) -> Outcome:
        headers = upstream_headers(
            req.headers, req.peer, req.scheme, self.unkeyed_denylist, cacheable=True
        )
        if req.request_id:
            headers["X-Request-ID"] = req.request_id
        if stale is not None:
            # RFC 9111 §4.3.1: validate the stored response.
            if stale.etag:
                headers["If-None-Match"] = stale.etag
            if stale.last_modified:
                headers["If-Modified-Since"] = stale.last_modified
        started = time.perf_counter()
        try:
            response = await self._ask(req, "GET", headers, None, budget)
        except OriginTimeout:
            self._count("timeout")
            self._key_outcome(req, failed=True)
            req.timings["origin"] = time.perf_counter() - started
            return OriginFailed("origin-timeout")
        except OriginError as exc:
            self._count("error")
            self._key_outcome(req, failed=True)
            req.timings["origin"] = time.perf_counter() - started
            log.info("origin error for %r: %s", req.key.material[:200], exc)
            return OriginFailed("origin-error")
        except OriginBusy:
            self._count("busy")
            req.timings["origin"] = time.perf_counter() - started
            return OriginFailed("origin-busy")
        except Exception:  # tierproxy's own error, not the origin's: no breaker, no sharing
            self._count("local-error")
            req.timings["origin"] = time.perf_counter() - started
            log.exception("local error while fetching %r from the origin", req.key.material[:200])
            return OriginFailed("local-error")
        elapsed = time.perf_counter() - started
        req.timings["origin"] = elapsed
        self.metrics.origin_fetch_seconds.observe(elapsed)
        self._latency.observe(elapsed)
        self.near_timeout.observe(elapsed, budget)
        if response.status >= 500:
            self._count("5xx")
            self._key_outcome(req, failed=True)
            if stale is not None or response.body is None:
                # A stale copy in hand beats the error when it may stand in (RFC 5861 §4).
                return OriginFailed("origin-5xx", response)
            # With nothing stored, a 5xx that carries explicit freshness is stored like any
            # other status (RFC 9111 §3); one that does not is relayed.
            stored = self._store(req, response)
            return stored if isinstance(stored, Stored) else OriginFailed("origin-5xx", response)
        self._count("ok")
        self._key_outcome(req, failed=False)

        if response.status == 304 and stale is not None:
            refreshed = policy.freshen(
                stale,
                response.headers,
                req.headers,
                response.request_time,
                response.response_time,
                self.policy,
            )
            if refreshed is None:
                # Still a valid answer for this client, just not storable any more.
                return Stored(stale, revalidated=True, keep=False)
            return Stored(refreshed, revalidated=True)

        stored = self._store(req, response)
        if isinstance(stored, Unstorable) and stale is not None and response.body is not None:
            return Unstorable(response, stored.reason, invalidates=True)
        return stored

    def _store(self, req: ProxyRequest, response: OriginResponse) -> Stored | Unstorable:
        """The origin's full answer as an entry to store, or why it may not be stored."""
        if response.status == 206:
            # The fetch asked for no range: a 206 is never stored as the complete response
            # (RFC 9111 §3.3-3.4), whatever its freshness.
            return Unstorable(response, "partial-content")
        if response.body is None:
            return Unstorable(response, "too-large")
        decision = policy.decide_storage(
            "GET",
            req.headers,
            response.status,
            response.headers,
            response.request_time,
            response.response_time,
            self.policy,
        )
        if not decision.storable:
            return Unstorable(response, decision.reason)
        vary = variants.vary_values(response.headers, req.headers)
        if vary:
            # Chosen by a field whose value the origin did not see from the client: its
            # answer may not be this client's (RFC 9111 §4.1 keys on what the origin saw).
            if any(name in self._rewritten for name, _ in vary):
                return Unstorable(response, "vary-rewritten")
            if variants.too_long(vary):  # kept in the URL's index, read on every lookup
                return Unstorable(response, "vary-too-long")
        entry = Entry(
            # A variant's record has a key of its own (its URL's and its variant's id).
            key=variants.record_material(req.key.material, vary) if vary else req.key.material,
            status=response.status,
            headers=policy.storable_headers(response.headers, decision.strip),
            body=response.body,
            stored_at=decision.stored_at,
            fresh_until=decision.fresh_until,
            stale_until=decision.stale_until,
            swr_until=decision.swr_until,
            expires_at=decision.expires_at,
            etag=response.headers.get("ETag"),
            last_modified=response.headers.get("Last-Modified"),
            vary=vary,
            tags=policy.parse_tags(response.headers.get("Surrogate-Key")),
        )
        own = policy.storable_headers(response.headers) if decision.strip else None
        return Stored(entry, revalidated=False, own_headers=own)

    async def forward(self, req: ProxyRequest) -> Relayed | Failed:
        """A request the cache does not answer: send it on, its answer to be streamed back."""
        loop = asyncio.get_running_loop()
        budget = min(self.origin_timeout, req.deadline - loop.time())
        headers = upstream_headers(
            req.headers, req.peer, req.scheme, self.unkeyed_denylist, cacheable=False
        )
        if req.request_id:
            headers["X-Request-ID"] = req.request_id
        fwd = "method" if req.method not in ("GET", "HEAD") else "bypass"
        if budget > 0 and not self.inflight.enter():
            self._shed(fwd)
            return Failed(503, "shed", fwd)
        try:
            return await self._forward(req, headers, fwd, budget)
        finally:
            if budget > 0:
                self.inflight.leave()

    async def _forward(
        self, req: ProxyRequest, headers: CIMultiDict[str], fwd: str, budget: float
    ) -> Relayed | Failed:
        started = time.perf_counter()
        try:
            if budget <= 0:
                raise OriginTimeout("deadline spent")
            response = await self._ask(req, req.method, headers, req.body, budget)
        except OriginTimeout:
            self._count("timeout")
            return Failed(504, "origin-timeout", fwd)
        except OriginError:
            self._count("error")
            return Failed(502, "origin-error", fwd)
        except OriginBusy:
            self._count("busy")
            return Failed(503, "origin-busy", fwd)
        except Exception:  # tierproxy's own error, not the origin's
            self._count("local-error")
            log.exception("local error while forwarding %s %r", req.method, req.key.material[:200])
            return Failed(500, "local-error", fwd)
        finally:
            req.timings["origin"] = time.perf_counter() - started
        self._count("5xx" if response.status >= 500 else "ok")
        self._latency.observe(req.timings["origin"])
        self.near_timeout.observe(req.timings["origin"], budget)
        return Relayed(response, fwd)
