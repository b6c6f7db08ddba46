"""The hit path: fresh cache hits answered by the connection handler, as stored bytes.

A cache hit need not pay for what aiohttp builds around every request (a ``Request``, a task,
the router and middleware, a ``Response`` whose headers are merged and serialised anew).
:class:`HitPath` answers plain GETs from
:meth:`tierproxy.aiohttp_internals.ProxyRequestHandler.data_received` with the response bytes: the
entry's status line and stored headers, encoded once per entry (``Entry.wire_head``), plus
the few header lines that change per request; the handler writes them to the transport.

* A fresh **L1** copy is answered synchronously, inside ``data_received``.
* Otherwise, with L2/L3 configured, the handler awaits :meth:`ReadThrough.lookup
  <tierproxy.readthrough.ReadThrough.lookup>` (the same tiers, budgets and backfills as the
  full path) and answers a fresh **L2/L3** copy the same way. Anything else - a miss, a stale
  copy - is handed over to the full path with the lookup's outcome (:class:`Handover`), so
  the tiers are never asked twice and the request keeps its deadline and request id. The
  hand-over reaches the full path's request under :data:`HANDOVER` (a typed
  ``web.RequestKey``), put there by the server's request factory for that very message
  (see :mod:`tierproxy.aiohttp_internals`).

Anything the hit path is not sure of goes the full way from the start: another method, a
request with a body, ``Connection: close``, HTTP/1.0, a conditional or ``Cache-Control``
request header, a stored status aiohttp frames specially, the proxy not ready. The response
is the one the full path sends for the same hit, byte for byte but the request id
(tests/integration/test_hit_path.py holds the two side by side), and it is counted and logged
the same way (tier lookups and latency, ``tierproxy_responses_total``, one access-log line),
and also in ``tierproxy_hit_path_responses_total``. Its head is built by
:func:`tierproxy.response.fresh_hit_head` from the final state ``FreshHit`` - the same labels
as the full path's - and wall time is the proxy's clock (``ProxyState.clock``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.http_parser import RawRequestMessage

from .keys import BadTarget, CacheKey
from .logs import request_id
from .response import fresh_hit_head
from .states import FreshHit, Lookup, ProxyRequest, Trace

if TYPE_CHECKING:
    from .entry import Entry
    from .state import ProxyState
    from .tiers.base import GuardedTier

__all__ = ["HANDOVER", "Answer", "Handover", "HitPath"]

Answer = tuple[bytes, bytes]  # response head, body

# Request headers that change what a hit answers (RFC 9110 §13 conditionals, §14 ranges,
# RFC 9111 §5.2.1 request directives): such requests take the full path, which knows what to
# do with them (tierproxy.conditionals, tierproxy.ranges); a plain hit never looks further.
_FULL_PATH_HEADERS = (
    "Cache-Control",
    "If-None-Match",
    "If-Modified-Since",
    "If-Match",
    "If-Unmodified-Since",
    "If-Range",
    "Range",
    "Expect",
)

# Statuses aiohttp frames specially (no body, no Content-Length): left to aiohttp.
_SPECIAL_STATUS = frozenset({204, 304})

_NO_TIMINGS: dict[str, float] = {}


class Handover:
    """A request the hit path looked up but cannot answer: the full path takes it from here."""

    __slots__ = ("found", "req", "started")

    def __init__(self, req: ProxyRequest, found: Lookup, started: float) -> None:
        self.req = req  # its key, deadline, request id and tier timings so far
        self.found = found  # what the tiers held (ReadThrough.get resumes from it)
        self.started = started  # perf_counter at the request's arrival, for the access log


#: Where the full path's request carries the hit path's hand-over, if it has one.
HANDOVER = web.RequestKey("tierproxy_handover", Handover)


class HitPath:
    """Answers fresh cache hits for :class:`tierproxy.aiohttp_internals.ProxyRequestHandler`."""

    __slots__ = (
        "_access_log",
        "_clock",
        "_keys",
        "_l1",
        "_l1_name",
        "_looks_further",
        "_loop",
        "_metrics",
        "_readthrough",
        "_state",
    )

    def __init__(self, state: ProxyState, l1: GuardedTier | None) -> None:
        self._state = state
        self._keys = state.keys
        self._l1 = l1
        self._clock = state.clock
        self._metrics = state.metrics
        self._access_log = state.access_log
        self._readthrough = state.readthrough
        self._looks_further = any(not tier.synchronous for tier in state.tiers)
        self._l1_name = l1.name if l1 is not None else "l1"
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def handover_key(self) -> web.RequestKey[Handover]:
        return HANDOVER

    def answer(
        self, message: RawRequestMessage, remote: str | None
    ) -> Answer | Coroutine[Any, Any, Answer | Handover] | None:
        """The response for ``message`` (a fresh L1 hit), or a lookup to await (L2/L3, see the
        module docstring), or None: take the full path."""
        if (
            message.method != "GET"
            or message.version != HttpVersion11
            or message.should_close
            or message.upgrade
            or message.chunked
            or not self._state.ready
        ):
            return None
        headers = message.headers
        for name in _FULL_PATH_HEADERS:
            if name in headers:
                return None
        length = headers.get("Content-Length")
        if length is not None and length != "0":
            return None  # a body (a "fat GET") is the full path's to refuse
        try:
            key = self._keys.for_target(message.path)
        except BadTarget:
            return None
        started = time.perf_counter()
        l1 = self._l1
        if l1 is not None:
            now = self._clock.wall()
            entry = l1.peek_fresh(key, headers, now)
            if entry is not None:
                if not _answerable(entry):
                    return None
                looked_up = time.perf_counter() - started
                answer = self._respond(
                    self._l1_name,
                    entry,
                    now,
                    request_id(headers.get("X-Request-ID")),
                    message.path,
                    started,
                    _NO_TIMINGS,
                    remote,
                )
                if answer is not None:
                    l1.count_hit(looked_up)
                return answer
        if not self._looks_further:
            return None
        return self._look_further(message, key, started, remote)

    async def _look_further(
        self, message: RawRequestMessage, key: CacheKey, started: float, remote: str | None
    ) -> Answer | Handover:
        state = self._state
        loop = self._loop
        if loop is None:  # the loop this proxy serves on, for good (tierproxy.deadlines)
            loop = self._loop = asyncio.get_running_loop()
        req = ProxyRequest(
            method="GET",
            key=key,
            headers=message.headers,
            peer=remote,
            scheme="http",
            deadline=loop.time() + state.settings.request_deadline,
            request_id=request_id(message.headers.get("X-Request-ID")),
        )
        state.inflight += 1
        try:
            found = await self._readthrough.lookup(req, loop)
        finally:
            state.inflight -= 1
        hit = found.found
        if isinstance(hit, FreshHit) and _answerable(hit.entry):
            answer = self._respond(
                hit.tier,
                hit.entry,
                self._clock.wall(),
                req.request_id,
                message.path,
                started,
                req.timings,
                remote,
                hit.tiers,
            )
            if answer is not None:
                return answer
        return Handover(req, found, started)

    def _respond(
        self,
        tier: str,
        entry: Entry,
        now: float,
        rid: str,
        path: str,
        started: float,
        timings: dict[str, float],
        remote: str | None,
        tiers: Trace = (),
    ) -> Answer | None:
        labelled = fresh_hit_head(tier, entry, now, rid, tiers)
        if labelled is None:
            return None
        head, x_cache = labelled
        body = entry.body
        metrics = self._metrics
        metrics.response(x_cache, entry.status)
        metrics.hit_path_responses.inc()
        access_log = self._access_log
        if access_log.enabled:
            access_log.emit(
                "GET",
                path,
                entry.status,
                x_cache,
                len(body),
                time.perf_counter() - started,
                timings,
                rid,
                remote,
            )
        return head, body


def _answerable(entry: Entry) -> bool:
    # 1xx/204/304 are framed specially by aiohttp (no body, no Content-Length): left to it.
    return entry.status >= 200 and entry.status not in _SPECIAL_STATUS
