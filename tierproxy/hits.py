"""The hit path: fresh cache hits answered by the connection handler, as stored bytes.

A cache hit need not pay for what aiohttp builds around every request (a ``Request``, a task,
the router and middleware, a ``Response`` whose headers are merged and serialised anew).
:class:`HitPath` answers plain GETs from
:meth:`tierproxy.aiohttp_internals.ProxyRequestHandler.data_received` with the response bytes: the
entry's status line and stored headers, encoded once per entry (``Entry.wire_head``), plus
the few header lines that change per request; the handler writes them to the transport.

* A fresh **L1** copy is answered synchronously, inside ``data_received``.
* Otherwise, with L2/L3 configured, the lookup goes on with :meth:`ReadThrough.lookup_soon
  <tierproxy.readthrough.ReadThrough.lookup_soon>` (the same tiers, budgets and backfills as
  the full path) with no task and no coroutine: callbacks on the tier's reply (the pipelined
  Redis reply, the L3 reader thread's answer), each tier's timeouts on one timer
  (:class:`~tierproxy.tiers.base.LookupDeadlines`). The handler gets a pending answer
  (:class:`_HitLookup`) and answers a fresh **L2/L3** copy the same way when it comes.
  Anything else - a miss, a stale copy - is handed over to the full path with the lookup's
  outcome (:class:`Handover`), so the tiers are never asked twice and the request keeps its
  deadline and request id. The hand-over reaches the full path's request under
  :data:`HANDOVER` (a typed ``web.RequestKey``), put there by the server's request factory
  for that very message (see :mod:`tierproxy.aiohttp_internals`). With
  ``TIERPROXY_HEDGE=on`` (two tiers asked at once) the lookup is awaited in a task instead.

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
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.http_parser import RawRequestMessage

from .keys import BadTarget, CacheKey
from .logs import request_id
from .response import fresh_hit_head
from .states import FreshHit, Lookup, ProxyRequest, Trace

if TYPE_CHECKING:
    from .aiohttp_internals import PendingAnswer
    from .entry import Entry
    from .readthrough import ReadThrough, TierWalk
    from .state import ProxyState
    from .tiers.base import GuardedTier

__all__ = ["HANDOVER", "Answer", "Handover", "HitPath"]

log = logging.getLogger("tierproxy.hits")

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

# The same names as the parser hands them over (RFC 9110 §5.1: field names are
# case-insensitive; aiohttp's parser accepts only tokens, so ASCII lower-casing is exact), and
# the two header lines a plain hit does read: one pass over the request's raw header lines
# costs a fifth of a case-insensitive lookup per name.
_FULL_PATH_RAW = frozenset(name.lower().encode("ascii") for name in _FULL_PATH_HEADERS)
_CONTENT_LENGTH = b"content-length"
_REQUEST_ID = b"x-request-id"
_READ_RAW = frozenset({_CONTENT_LENGTH, _REQUEST_ID})

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
    ) -> Answer | PendingAnswer[Handover] | None:
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
        supplied_id = False
        for raw_name, _ in message.raw_headers:
            name = raw_name.lower()
            if name in _READ_RAW:
                if name == _REQUEST_ID:
                    supplied_id = True
                else:
                    length = headers.get("Content-Length")
                    if length is not None and length != "0":
                        return None  # a body (a "fat GET") is the full path's to refuse
            elif name in _FULL_PATH_RAW:
                return None
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
                    request_id(headers.get("X-Request-ID") if supplied_id else None),
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

    def _look_further(
        self, message: RawRequestMessage, key: CacheKey, started: float, remote: str | None
    ) -> PendingAnswer[Handover]:
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
        if state.settings.hedge:
            # Hedged lookups run two tiers at once: awaited, in a task of their own.
            return _Awaited(
                loop.create_task(self._look_further_hedged(req, message.path, started, remote))
            )
        return _HitLookup(self, state, self._readthrough, req, message.path, started, remote, loop)

    async def _look_further_hedged(
        self, req: ProxyRequest, path: str, started: float, remote: str | None
    ) -> Answer | Handover:
        state = self._state
        state.inflight += 1
        try:
            found = await self._readthrough.lookup(req, self._loop)
        finally:
            state.inflight -= 1
        return self.looked_up(req, path, started, remote, found)

    def looked_up(
        self, req: ProxyRequest, path: str, started: float, remote: str | None, found: Lookup
    ) -> Answer | Handover:
        """What a lookup that went past L1 ends in: the answer of a fresh hit, else the
        request handed over to the full path with what the tiers held."""
        hit = found.found
        if isinstance(hit, FreshHit) and _answerable(hit.entry):
            answer = self._respond(
                hit.tier,
                hit.entry,
                self._clock.wall(),
                req.request_id,
                path,
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


Listener = Callable[["Answer | Handover | None"], object]


class _HitLookup:
    """A hit-path request whose lookup goes past L1, with no task (a
    :class:`~tierproxy.aiohttp_internals.PendingAnswer`): the tiers walked by
    :meth:`ReadThrough.lookup_soon <tierproxy.readthrough.ReadThrough.lookup_soon>`, the
    outcome (:meth:`HitPath.looked_up`) given straight to the connection handler's callback.
    Cancelled (the client gone), the walk is abandoned. Counted in ``ProxyState.inflight``
    while it runs, as a full-path request is."""

    __slots__ = (
        "_hits",
        "_listener",
        "_loop",
        "_outcome",
        "_path",
        "_remote",
        "_req",
        "_started",
        "_state",
        "_walk",
    )

    def __init__(
        self,
        hits: HitPath,
        state: ProxyState,
        readthrough: ReadThrough,
        req: ProxyRequest,
        path: str,
        started: float,
        remote: str | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._hits = hits
        self._state = state
        self._req = req
        self._path = path
        self._started = started
        self._remote = remote
        self._loop = loop
        self._listener: Listener | None = None
        # The outcome, when it came before the listener did (every tier answered at once).
        self._outcome: tuple[Answer | Handover | None] | None = None
        state.inflight += 1
        self._walk: TierWalk | None = None
        walk = readthrough.lookup_soon(req, loop, self._found)
        if not walk.over:
            self._walk = walk

    def then(self, callback: Listener) -> None:
        outcome = self._outcome
        if outcome is not None:
            # Over before the handler listened (every tier answered at once): on the next
            # step, not from inside the handler's own call (it would answer the requests
            # queued behind this one by recursion).
            self._outcome = None
            self._loop.call_soon(callback, outcome[0])
        else:
            self._listener = callback

    def cancel(self) -> None:
        walk = self._walk
        self._listener = None
        if walk is not None:
            self._walk = None
            self._state.inflight -= 1
            walk.cancel()

    def _found(self, found: Lookup | Exception) -> None:
        self._walk = None
        self._state.inflight -= 1
        outcome: Answer | Handover | None = None
        if not isinstance(found, Exception):  # (the walk failed: logged, the full path goes)
            try:
                outcome = self._hits.looked_up(
                    self._req, self._path, self._started, self._remote, found
                )
            except Exception:  # the full path answers it, and reports what is wrong
                log.exception("hit path lookup failed; the request takes the full path")
        listener = self._listener
        if listener is None:
            self._outcome = (outcome,)
        else:
            self._listener = None
            listener(outcome)


class _Awaited:
    """A lookup awaited in a task (hedged), as a
    :class:`~tierproxy.aiohttp_internals.PendingAnswer`."""

    __slots__ = ("_task",)

    def __init__(self, task: asyncio.Task[Answer | Handover]) -> None:
        self._task = task

    def then(self, callback: Listener) -> None:
        def over(task: asyncio.Task[Answer | Handover]) -> None:
            if task.cancelled():
                return
            failure = task.exception()
            if failure is not None:
                log.error(
                    "hit path lookup failed; the request takes the full path", exc_info=failure
                )
                callback(None)
            else:
                callback(task.result())

        self._task.add_done_callback(over)

    def cancel(self) -> None:
        self._task.cancel()
