"""The hit path: fresh cache hits answered by the connection handler, as stored bytes.

A cache hit need not pay for what aiohttp builds around every request (a ``Request``, a task,
the router and middleware, a ``Response`` whose headers are merged and serialised anew).
:class:`HitPath` answers plain GETs from
:meth:`tierproxy.listener.ProxyRequestHandler.data_received` with the response bytes: the
entry's status line and stored headers, encoded once per entry (``Entry.wire_head``), plus
the few header lines that change per request; the handler writes them to the transport.

* A fresh **L1** copy is answered synchronously, inside ``data_received``.
* Otherwise, with L2/L3 configured, the handler awaits :meth:`ReadThrough.lookup
  <tierproxy.readthrough.ReadThrough.lookup>` (the same tiers, budgets and backfills as the
  full path) and answers a fresh **L2/L3** copy the same way. Anything else - a miss, a stale
  copy - is handed over to the full path with the lookup's outcome (:class:`Handover`), so
  the tiers are never asked twice and the request keeps its deadline and request id.

Anything the hit path is not sure of goes the full way from the start: another method, a
request with a body, ``Connection: close``, HTTP/1.0, a conditional or ``Cache-Control``
request header, a stored status aiohttp frames specially, the proxy not ready. The response
is the one the full path sends for the same hit, byte for byte but the request id
(tests/integration/test_hit_path.py holds the two side by side), and it is counted and logged
the same way (tier lookups and latency, ``tierproxy_responses_total``, one access-log line),
and also in ``tierproxy_hit_path_responses_total``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_parser import RawRequestMessage

from .entry import HAS_CONTENT_TYPE, HAS_DATE, HAS_SERVER
from .keys import BadTarget, CacheKey, normalise_target
from .listener import BODY_SLICE_BYTES
from .logs import request_id
from .readthrough import Lookup, ProxyRequest
from .states import FreshHit, labels

if TYPE_CHECKING:
    from .entry import Entry
    from .server import ProxyState
    from .tiers.base import GuardedTier

__all__ = ["Answer", "Handover", "HitPath", "SharedBodyResponse", "cached_body_response"]

Answer = tuple[bytes, bytes]  # response head, body

# Request headers that change what a hit answers (RFC 9110 §13 conditionals, RFC 9111 §5.2.1
# request directives): such requests take the full path, which knows what to do with them.
_FULL_PATH_HEADERS = ("Cache-Control", "If-None-Match", "If-Modified-Since", "If-Match",
                      "If-Unmodified-Since", "If-Range", "Range", "Expect")

# Statuses aiohttp frames specially (no body, no Content-Length): left to aiohttp.
_SPECIAL_STATUS = frozenset({204, 304})

_SERVER_LINE = b"Server: " + SERVER_SOFTWARE.encode("latin-1") + b"\r\n"
_OCTET_STREAM_LINE = b"Content-Type: application/octet-stream\r\n"
_NO_TIMINGS: dict[str, float] = {}
# After the stored headers: what the full path adds to a hit, in the order aiohttp writes it.
_HIT_HEAD = (
    b"%sAge: %d\r\nX-Cache: %s\r\nCache-Status: %s%s\r\n"
    b"X-Request-ID: %s\r\nContent-Length: %d\r\n%s\r\n"
)


class Handover:
    """A request the hit path looked up but cannot answer: the full path takes it from here."""

    __slots__ = ("found", "req", "started")

    def __init__(self, req: ProxyRequest, found: Lookup, started: float) -> None:
        self.req = req  # its key, deadline, request id and tier timings so far
        self.found = found  # what the tiers held (ReadThrough.get resumes from it)
        self.started = started  # perf_counter at the request's arrival, for the access log


class HitPath:
    """Answers fresh cache hits for :class:`tierproxy.listener.ProxyRequestHandler`."""

    __slots__ = ("_access_log", "_keys", "_l1", "_l1_label", "_l1_status", "_looks_further",
                 "_metrics", "_readthrough", "_state")

    def __init__(self, state: ProxyState, l1: GuardedTier | None) -> None:
        self._state = state
        self._keys = state.keys
        self._l1 = l1
        self._metrics = state.metrics
        self._access_log = state.access_log
        self._readthrough = state.readthrough
        self._looks_further = any(not tier.synchronous for tier in state.tiers)
        name = l1.name if l1 is not None else "l1"
        self._l1_label = f"HIT-{name.upper()}"
        self._l1_status = f"; detail={name}"  # what follows "ttl=<n>" in Cache-Status

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
            key = self._keys.key(normalise_target(message.path))
        except BadTarget:
            return None
        started = time.perf_counter()
        l1 = self._l1
        if l1 is not None:
            now = self._state.clock.wall()
            entry = l1.peek_fresh(key, headers, now)
            if entry is not None:
                if not _answerable(entry):
                    return None
                looked_up = time.perf_counter() - started
                cache_status = f"tierproxy; hit; ttl={math.floor(entry.fresh_until - now)}"
                answer = self._respond(entry, self._l1_label, cache_status + self._l1_status,
                                       request_id(headers.get("X-Request-ID")), message.path,
                                       started, _NO_TIMINGS, remote)
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
        req = ProxyRequest(
            method="GET", key=key, headers=message.headers, peer=remote, scheme="http",
            deadline=asyncio.get_running_loop().time() + state.settings.request_deadline,
            request_id=request_id(message.headers.get("X-Request-ID")),
        )
        state.inflight += 1
        try:
            found = await self._readthrough.lookup(req)
        finally:
            state.inflight -= 1
        hit = found.found
        if isinstance(hit, FreshHit) and _answerable(hit.entry):
            x_cache, cache_status = labels(hit, self._state.clock.wall())
            answer = self._respond(hit.entry, x_cache, cache_status, req.request_id,
                                   message.path, started, req.timings, remote)
            if answer is not None:
                return answer
        return Handover(req, found, started)

    def _respond(
        self,
        entry: Entry,
        x_cache: str,
        cache_status: str,
        rid: str,
        path: str,
        started: float,
        timings: dict[str, float],
        remote: str | None,
    ) -> Answer | None:
        head = entry.wire_head
        if head is None:
            return None
        body = entry.body
        flags = entry.head_flags
        # The lines aiohttp adds after ours when the stored headers lack them.
        tail = b""
        if body and not flags & HAS_CONTENT_TYPE:
            tail = _OCTET_STREAM_LINE
        if not flags & HAS_DATE:
            tail += b"Date: " + rfc822_formatted_time().encode() + b"\r\n"
        if not flags & HAS_SERVER:
            tail += _SERVER_LINE
        response_head = _HIT_HEAD % (
            head, entry.age(self._state.clock.wall()), x_cache.encode(), entry.upstream_cache_status,
            cache_status.encode(), rid.encode(), len(body), tail,
        )
        metrics = self._metrics
        metrics.response(x_cache, entry.status)
        metrics.hit_path_responses.inc()
        access_log = self._access_log
        if access_log.enabled:
            access_log.emit("GET", path, entry.status, x_cache, len(body),
                            time.perf_counter() - started, timings, rid, remote)
        return response_head, body


def _answerable(entry: Entry) -> bool:
    # 1xx/204/304 are framed specially by aiohttp (no body, no Content-Length): left to it.
    return entry.status >= 200 and entry.status not in _SPECIAL_STATUS


class SharedBodyResponse(web.StreamResponse):
    """A stored body the full path answers, written as slices of the stored bytes.

    ``web.Response(body=...)`` writes the head and the whole body at once (aiohttp joins them
    on Python 3.11: a copy per connection, kept as long as the client takes to read it). This
    writes slices of a memoryview of the entry's immutable bytes, each once the transport is
    back under its high-water mark (aiohttp's writer drains), so a slow client holds about
    that much. The head is what ``web.Response`` would send for the same body.
    """

    def __init__(self, *, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        super().__init__(status=status, headers=headers)
        self._shared_body: bytes | None = body
        self._body_size = len(body)

    @property
    def content_length(self) -> int:
        return self._body_size

    @content_length.setter
    def content_length(self, value: int | None) -> None:
        raise AttributeError("a stored body's Content-Length is its length")

    async def prepare(self, request: web.BaseRequest) -> Any:
        if not self.prepared:
            # What web.Response adds when it starts, in the order it adds them.
            headers = self.headers
            headers["Content-Length"] = str(self._body_size)
            if "Content-Type" not in headers:
                headers["Content-Type"] = "application/octet-stream"
        return await super().prepare(request)

    async def write_eof(self, data: bytes = b"") -> None:
        body, self._shared_body = self._shared_body, None
        if body is not None:
            view = memoryview(body)
            for offset in range(0, len(view), BODY_SLICE_BYTES):  # bounded by the body
                await self.write(view[offset:offset + BODY_SLICE_BYTES])
        await super().write_eof(data)


def cached_body_response(
    method: str, status: int, body: bytes, headers: Mapping[str, str]
) -> web.StreamResponse:
    """The full path's response carrying a stored body: small ones (and HEAD) in one write,
    larger ones as :class:`SharedBodyResponse`."""
    if method == "HEAD" or len(body) <= BODY_SLICE_BYTES:
        return web.Response(status=status, body=body, headers=headers)
    return SharedBodyResponse(status=status, body=body, headers=headers)
