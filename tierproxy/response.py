"""Response writing: the one place a request's final state becomes what the client gets.

:func:`respond` turns a final state (:data:`tierproxy.states.Final`) into the full path's
response; :func:`fresh_hit_head` gives the hit path (:mod:`tierproxy.hits`) the same head as
bytes. Both take ``X-Cache`` and tierproxy's ``Cache-Status`` members (one per tier the
request reached) from :func:`tierproxy.states.labels` (the only place those strings are
built), put an upstream cache's ``Cache-Status`` members first (RFC 9211 §2: listed from the
origin towards the user agent) and compute ``Age`` (RFC 9111 §5.1) from the proxy's clock (``ProxyState.clock``).

Stored bodies go out as slices of the one stored copy (:class:`SharedBodyResponse`), heads
with non-UTF-8 bytes byte-exact, bodies too large to store are streamed through under three
bounds (:func:`_stream`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, assert_never

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from multidict import CIMultiDict

from . import policy
from .aiohttp_internals import (
    BODY_SLICE_BYTES,
    ExactHead,
    ExactHeadResponse,
    ExactHeadStreamResponse,
    rfc822_formatted_time,
)
from .conditionals import NOT_MODIFIED_HEADERS, client_not_modified
from .entry import HAS_CONTENT_TYPE, HAS_DATE, HAS_SERVER, OWN_HEADERS, has_raw_bytes
from .origin import OriginError, OriginResponse, OriginTimeout
from .ranges import Full, Partial, content_range, decide, multipart, part_overhead
from .state import INFO
from .states import Failed, Fetched, Final, FreshHit, Relayed, StaleHit, Trace, labels

if TYPE_CHECKING:
    from .entry import Entry
    from .state import ProxyState

__all__ = [
    "REFUSED",
    "SharedBodyResponse",
    "cache_status",
    "cached_body_response",
    "fresh_hit_head",
    "plain",
    "respond",
]

log = logging.getLogger("tierproxy.server")

#: ``(X-Cache, Cache-Status)`` of a request answered before it reached the cache (CONNECT, a
#: bad target, a refused body, PURGE): no tier handled it, so no Cache-Status member.
REFUSED = ("BYPASS", "")

# Response headers never passed from the origin to the client on a relayed response.
_RESPONSE_DROP = ("content-length", "surrogate-key", "surrogate-control")

# Failed.reason -> the plain-text body's words.
_FAILED_TEXT = {
    "origin-timeout": "origin timed out",
    "origin-error": "origin refused the connection or sent a broken response",
    "origin-busy": "origin connection pool is busy; retry shortly",
    "shed": "too many requests waiting for the origin; retry shortly",
    "local-error": "internal error in the proxy (logged)",
}


def cache_status(upstream: str, ours: str) -> str:
    """RFC 9211 §2: members are listed from the origin towards the user agent, so an
    upstream cache's members come first and tierproxy's last ("" when there are none)."""
    return f"{upstream}, {ours}" if upstream and ours else upstream or ours


def plain(status: int, text: str, labels: tuple[str, str] = REFUSED) -> web.Response:
    """A short plain-text answer with tierproxy's ``(X-Cache, Cache-Status)``."""
    response = web.Response(status=status, text=text + "\n", headers={"X-Cache": labels[0]})
    if labels[1]:
        response.headers["Cache-Status"] = labels[1]
    return response


# ---- the hit path's head ------------------------------------------------------------------

_SERVER_LINE = b"Server: " + SERVER_SOFTWARE.encode("latin-1") + b"\r\n"
_OCTET_STREAM_LINE = b"Content-Type: application/octet-stream\r\n"
# After the stored headers: what the full path adds to a hit, in the order aiohttp writes it;
# the request id goes between the two parts.
_HIT_HEAD_TO_ID = b"%sAge: %d\r\nX-Cache: %s\r\nCache-Status: %s%s\r\nX-Request-ID: "
_HIT_HEAD_FROM_ID = b"\r\nContent-Length: %d\r\n%s\r\n"
# labels(FreshHit(tier, entry, tiers), now), encoded, by (the lookup's trace - or the tier
# alone when only it was asked: an L1 hit - and whole seconds of freshness left): what those
# labels depend on. Building them costs about as much as the rest of an L1 hit, so they are
# built once per distinct value (bounded: cleared when full).
_FRESH_LABELS: dict[tuple[str | Trace, int], tuple[str, bytes, bytes]] = {}
_FRESH_LABELS_MAX = 4096


def fresh_hit_head(
    tier: str, entry: Entry, now: float, rid: str, tiers: Trace = ()
) -> tuple[bytes, str] | None:
    """The head of the full path's response for the final state ``FreshHit(tier, entry,
    tiers)`` at ``now``, as bytes, and its ``X-Cache``: the entry's stored head
    (``Entry.wire_head``; None when a stored line is unsafe to write), then ``Age``,
    ``X-Cache``, ``Cache-Status``, ``X-Request-ID`` and the lines aiohttp adds to a
    ``web.Response``.

    All of it but the request id depends only on the entry, the whole seconds since it was
    stored (``Age``) and of freshness left (the labels' ``ttl``), the trace, and the
    ``Date`` when one is added: the entry keeps the last head built (``Entry.hit_memo``)
    with what it was built from, and a hit that finds the same values splices its id in."""
    head = entry.wire_head
    if head is None:
        return None
    since = int(now - entry.stored_at)  # Entry.age before it is clamped at 0
    left = math.floor(entry.fresh_until - now)
    trace = tiers or tier
    flags = entry.head_flags
    date = None if flags & HAS_DATE else rfc822_formatted_time()
    memo = entry.hit_memo
    if (
        memo is not None
        and memo[0] == since
        and memo[1] == left
        and memo[2] == trace
        and memo[3] == date
    ):
        return memo[4] + rid.encode() + memo[5], memo[6]
    encoded = _FRESH_LABELS.get((trace, left))
    if encoded is None:
        x_cache, member = labels(FreshHit(tier, entry, tiers), now)
        if len(_FRESH_LABELS) >= _FRESH_LABELS_MAX:
            _FRESH_LABELS.clear()
        encoded = _FRESH_LABELS[(trace, left)] = (x_cache, x_cache.encode(), member.encode())
    body = entry.body
    # The lines aiohttp adds after ours when the stored headers lack them.
    tail = b""
    if body and not flags & HAS_CONTENT_TYPE:
        tail = _OCTET_STREAM_LINE
    if date is not None:
        tail += b"Date: " + date.encode() + b"\r\n"
    if not flags & HAS_SERVER:
        tail += _SERVER_LINE
    to_id = _HIT_HEAD_TO_ID % (
        head,
        max(0, since),
        encoded[1],
        entry.upstream_cache_status,
        encoded[2],
    )
    from_id = _HIT_HEAD_FROM_ID % (len(body), tail)
    object.__setattr__(entry, "hit_memo", (since, left, trace, date, to_id, from_id, encoded[0]))
    return to_id + rid.encode() + from_id, encoded[0]


# ---- the full path ------------------------------------------------------------------------


async def respond(request: web.Request, state: ProxyState, final: Final) -> web.StreamResponse:
    """The response for ``final``; counted in ``tierproxy_responses_total``."""
    now = state.clock.wall()
    x_cache, member = labels(final, now)
    match final:
        case FreshHit(_, entry) | StaleHit(_, entry, _) | Fetched(entry, _, _, _):
            return _stored(request, state, entry, now, x_cache, member)
        case Relayed(response, fwd, _):
            return await _relayed(request, state, response, fwd, x_cache, member)
        case Failed(status, reason, _):
            state.metrics.response(x_cache, status)
            failed = plain(
                status, f"{status} {_FAILED_TEXT.get(reason, reason)}", (x_cache, member)
            )
            if status == 503:
                failed.headers["Retry-After"] = "1"  # RFC 9110 §10.2.3
            return failed
        case _:
            assert_never(final)


def _stored(
    request: web.Request, state: ProxyState, entry: Entry, now: float, x_cache: str, member: str
) -> web.StreamResponse:
    # The same head as the hit path writes (fresh_hit_head): the stored fields but
    # tierproxy's own, then Age, X-Cache, Cache-Status (upstream members first) and
    # X-Request-ID (set by the handler).
    body: bytes | memoryview | None
    if client_not_modified(request.headers, entry):  # RFC 9110 §13.2.2: before Range
        headers = CIMultiDict(
            (name, value) for name, value in entry.headers if name.lower() in NOT_MODIFIED_HEADERS
        )
        status = 304
        body = None
    else:
        headers = CIMultiDict(
            (name, value) for name, value in entry.headers if name.lower() not in OWN_HEADERS
        )
        status = entry.status
        body = entry.body
        if status == 200 and "Range" in request.headers:
            status, body, headers = _ranged(
                request, body, entry.etag, entry.last_modified, headers, now
            )
    headers["Age"] = str(entry.age(now))
    headers["X-Cache"] = x_cache
    upstream = entry.upstream_cache_status[:-2].decode("utf-8", "surrogateescape")
    if status_value := cache_status(upstream, member):
        headers["Cache-Status"] = status_value
    response = _cached_response(request, status, body, headers, entry.raw_bytes)
    state.metrics.response(x_cache, status)
    return response


def _ranged(
    request: web.Request,
    body: bytes,
    etag: str | None,
    last_modified: str | None,
    headers: CIMultiDict[str],
    now: float,
) -> tuple[int, bytes | memoryview, CIMultiDict[str]]:
    """A GET/HEAD with ``Range`` on a complete ``200`` held in memory (stored, or fetched
    whole and not storable) (RFC 9110 §14): ``206`` with the range (``multipart/byteranges``
    for several), ``416``, or the whole ``200`` (:func:`tierproxy.ranges.decide`).
    ``headers`` are the response's, without tierproxy's own."""
    values = request.headers.getall("Range")
    boundary = secrets.token_hex(12)
    content_type = headers.get("Content-Type")
    decision = decide(
        values[0] if len(values) == 1 else None,  # Range is a singleton: twice, ignored
        request.headers.get("If-Range"),
        len(body),
        etag=etag,
        last_modified=last_modified,
        date=headers.get("Date"),
        part_overhead=part_overhead(boundary, content_type),
        now=now,
    )
    if isinstance(decision, Full):
        return 200, body, headers
    length = len(body)
    if not isinstance(decision, Partial):  # unsatisfiable: no body, only the validators
        refused = CIMultiDict(
            (name, value) for name, value in headers.items() if name.lower() in NOT_MODIFIED_HEADERS
        )
        refused["Content-Range"] = f"bytes */{length}"
        return 416, b"", refused
    if len(decision.ranges) == 1:
        first, last = decision.ranges[0]
        headers["Content-Range"] = content_range(first, last, length)
        if last - first + 1 > BODY_SLICE_BYTES and request.method != "HEAD":
            return 206, memoryview(body)[first : last + 1], headers  # no copy per client
        return 206, body[first : last + 1], headers
    if sum(last - first + 1 for first, last in decision.ranges) > BODY_SLICE_BYTES:
        # A multipart body is built per request, a copy; the whole body is a view of the one
        # stored copy (RFC 9110 §14.2 lets a server ignore Range): bounded memory per client.
        return 200, body, headers
    headers.popall("Content-Type", None)
    headers["Content-Type"] = f"multipart/byteranges; boundary={boundary}"
    return 206, multipart(body, decision.ranges, content_type, boundary), headers


async def _relayed(
    request: web.Request,
    state: ProxyState,
    origin_response: OriginResponse,
    fwd: str,
    x_cache: str,
    member: str,
) -> web.StreamResponse:
    headers = CIMultiDict(policy.end_to_end(origin_response.headers, _RESPONSE_DROP))
    # tierproxy's own fields replace the origin's; its Cache-Status member follows an
    # upstream's members (RFC 9211 §2).
    upstream = ", ".join(v.strip() for v in headers.popall("Cache-Status", ()) if v.strip())
    status = origin_response.status
    body: bytes | memoryview = origin_response.body or b""
    if (
        status == 200
        and origin_response.body is not None
        and fwd in ("miss", "stale")  # the fetch that fills the cache asked for no range
        and "Range" in request.headers
    ):
        status, body, headers = _ranged(
            request,
            origin_response.body,
            headers.get("ETag"),
            headers.get("Last-Modified"),
            headers,
            state.clock.wall(),
        )
    headers["X-Cache"] = x_cache
    if status_value := cache_status(upstream, member):
        headers["Cache-Status"] = status_value
    headers["X-Request-ID"] = request[INFO].rid
    state.metrics.response(x_cache, status)
    if origin_response.body is not None or origin_response.stream is None:
        if has_raw_bytes(headers.items()):
            return ExactHeadResponse(request, status=status, body=bytes(body), headers=headers)
        return web.Response(status=status, body=bytes(body), headers=headers)
    return await _stream(request, state, origin_response, headers)


class SharedBodyResponse(web.StreamResponse):
    """A stored body the full path answers, written as slices of the stored bytes.

    ``web.Response(body=...)`` writes the head and the whole body at once (aiohttp joins them
    on Python 3.11: a copy per connection, kept as long as the client takes to read it). This
    writes slices of a memoryview of the entry's immutable bytes, each once the transport is
    back under its high-water mark (aiohttp's writer drains), so a slow client holds about
    that much. The head is what ``web.Response`` would send for the same body.
    """

    def __init__(
        self, *, status: int, body: bytes | memoryview, headers: Mapping[str, str]
    ) -> None:
        super().__init__(status=status, headers=headers)
        self._shared_body: bytes | memoryview | None = body
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
                await self.write(view[offset : offset + BODY_SLICE_BYTES])
        await super().write_eof(data)


class _ExactHeadSharedBodyResponse(ExactHead, SharedBodyResponse):
    """A large stored body sent in slices, head byte-exact."""


def cached_body_response(
    method: str, status: int, body: bytes | memoryview, headers: Mapping[str, str]
) -> web.StreamResponse:
    """The full path's response carrying a stored body (or a view of a range of it): small
    ones (and HEAD) in one write, larger ones as :class:`SharedBodyResponse`."""
    if method == "HEAD" or len(body) <= BODY_SLICE_BYTES:
        return web.Response(status=status, body=bytes(body), headers=headers)
    return SharedBodyResponse(status=status, body=body, headers=headers)


def _cached_response(
    request: web.BaseRequest,
    status: int,
    body: bytes | memoryview | None,
    headers: CIMultiDict[str],
    exact_head: bool,
) -> web.StreamResponse:
    """The full path's response for a stored entry: a large body as slices of the stored
    bytes (never a copy per slow client), and a head with non-UTF-8 bytes written byte-exact
    (:class:`tierproxy.aiohttp_internals.ExactHead`)."""
    if not exact_head:
        if body is None:
            return web.Response(status=status, headers=headers)
        return cached_body_response(request.method, status, body, headers)
    if body is None or request.method == "HEAD" or len(body) <= BODY_SLICE_BYTES:
        whole = None if body is None else bytes(body)
        return ExactHeadResponse(request, status=status, body=whole, headers=headers)
    return _ExactHeadSharedBodyResponse(request, status=status, body=body, headers=headers)


# ---- bodies streamed through --------------------------------------------------------------


class _ClientStalled(Exception):
    """The client took no response bytes for TIERPROXY_SEND_TIMEOUT."""


async def _send(response: web.StreamResponse, data: bytes, send_timeout: float) -> None:
    """Write ``data``; a client that does not take it within ``send_timeout`` is stalled.

    aiohttp waits for the transport to drain (without a bound) when its buffer is full; the
    hardened listener also cuts such a client off (tierproxy.aiohttp_internals), but this
    bound holds under any runner, so a stalled client never holds an origin connection longer.
    """
    try:
        async with asyncio.timeout(send_timeout):
            await response.write(data)
    except TimeoutError:
        raise _ClientStalled() from None


async def _stream(
    request: web.Request,
    state: ProxyState,
    origin_response: OriginResponse,
    headers: CIMultiDict[str],
) -> web.StreamResponse:
    """Copy a large or unbounded body chunk by chunk; never hold all of it.

    Bounded three ways, so that no client holds an origin connection for long: each read
    from the origin by the origin timeout (an idle bound), each write to the client by
    TIERPROXY_SEND_TIMEOUT, the whole body by TIERPROXY_STREAM_TIMEOUT. A body that cannot
    be sent whole ends with the client connection cut (its headers are gone; a clean end
    would pass a short body off as complete).
    """
    assert origin_response.stream is not None
    settings = state.settings
    upstream = origin_response.stream
    response = (
        ExactHeadStreamResponse(request, status=origin_response.status, headers=headers)
        if has_raw_bytes(headers.items())
        else web.StreamResponse(status=origin_response.status, headers=headers)
    )
    length = upstream.content_length
    if length is not None:
        # Keep the origin's framing so the client can tell a truncated body from a whole one.
        response.content_length = length
    elif request.version < HttpVersion11:
        # No chunked coding in HTTP/1.0: the body ends when the connection closes (RFC 9112
        # §6.3), so it must close. aiohttp 3.14 leaves out the keep-alive header then but
        # keeps the connection open: the client would wait out the keep-alive timeout, and
        # a request sent after the body would be answered as if it were part of it.
        response.force_close()
    cut: str | None = None
    try:
        async with asyncio.timeout(settings.stream_timeout):
            await response.prepare(request)
            if request.method == "HEAD":
                return response
            if origin_response.prefix:
                await _send(response, origin_response.prefix, settings.send_timeout)
            for _ in range(1 << 40):  # bounded by the body, each read by the origin timeout
                chunk = await state.origin.read_chunk(upstream)
                if not chunk:
                    break
                await _send(response, chunk, settings.send_timeout)
            await response.write_eof()
    except (OriginError, OriginTimeout) as exc:
        cut = "origin-timeout" if isinstance(exc, OriginTimeout) else "origin-error"
        log.warning("origin body broke off for %s: %s", request.path[:200], exc)
    except _ClientStalled:
        cut = "client-stalled"
        log.info(
            "client %s took no bytes for %.1fs of a streamed %s; cut off",
            request.remote,
            settings.send_timeout,
            request.path[:200],
        )
    except TimeoutError:
        cut = "stream-timeout"
        log.warning(
            "streamed body of %s not sent within TIERPROXY_STREAM_TIMEOUT=%.1fs; cut off",
            request.path[:200],
            settings.stream_timeout,
        )
    except ConnectionError:
        cut = "client-gone"
    except Exception:  # tierproxy's own error: logged, and the body is not passed off as whole
        cut = "local-error"
        log.exception("local error while streaming %s", request.path[:200])
    finally:
        origin_response.release()
    if cut is not None:
        state.metrics.streams_cut.labels(cut).inc()
        # Headers are gone; the only honest signal left is to cut the connection.
        if request.transport is not None:
            request.transport.abort()
    return response
