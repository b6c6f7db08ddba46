"""The proxy's request handler: parse, key, then read through the cache or pass through.

It does no caching logic of its own: the request target is normalised into its cache key
(:mod:`tierproxy.keys`); ``PURGE`` goes to :mod:`tierproxy.purge_handler`; a cacheable request is
answered by the orchestrator (``ReadThrough.get``), any other passed through
(``ReadThrough.forward``) with its body read here under its limits; the final state is
written by :func:`tierproxy.response.respond`. A request the hit path already looked up
arrives with its :class:`~tierproxy.hits.Handover` (``request[HANDOVER]``) and resumes from
that lookup. Every request gets one access-log line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError

from . import policy
from .hits import HANDOVER, Handover
from .keys import BadTarget, TargetTooLong
from .logs import request_id
from .purge_handler import purge
from .response import plain, respond
from .state import INFO, STATE, ProxyState, RequestInfo
from .states import Final, ProxyRequest, Relayed

__all__ = ["handle", "unrouted_targets"]


async def handle(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    handover = request.get(HANDOVER)
    access_log = state.access_log
    if handover is None:
        info = RequestInfo(request_id(request.headers.get("X-Request-ID")))
        started = time.perf_counter() if access_log.enabled else 0.0
    else:
        info = RequestInfo(handover.req.request_id, handover.req.timings)
        started = handover.started
    request[INFO] = info
    state.inflight += 1
    try:
        if handover is None:
            response = await _handle(request, state)
        else:
            response = await _resume(request, state, handover)
    finally:
        state.inflight -= 1
    if not response.prepared:  # a streamed response got it in respond(), before its headers went
        response.headers["X-Request-ID"] = info.rid
    if access_log.enabled:
        access_log.emit(
            request.method,
            request.raw_path,
            response.status,
            response.headers.get("X-Cache", "-"),
            response.body_length if response.prepared else response.content_length,
            time.perf_counter() - started,
            info.timings,
            info.rid,
            request.remote,
        )
    return response


@web.middleware
async def unrouted_targets(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    # aiohttp's router finds no route for an absolute-form target with an empty path
    # (``GET http://host:port HTTP/1.1``); RFC 9110 §4.2.3 makes that path "/". Such requests
    # still reach the proxy handler, which keys (and pins the upstream) as for any other.
    if request.match_info.http_exception is not None:
        return await handle(request)
    return await handler(request)


async def _resume(
    request: web.Request, state: ProxyState, handover: Handover
) -> web.StreamResponse:
    """A plain GET the hit path looked up and could not answer: go on from its lookup."""
    req = handover.req
    req.scheme = "https" if request.secure else "http"  # the hit path cannot tell
    final = await state.readthrough.get(req, handover.found)
    return await respond(request, state, final)


async def _handle(request: web.Request, state: ProxyState) -> web.StreamResponse:
    method = request.method
    if method == "CONNECT":
        return plain(405, "405 CONNECT is not supported: this is a reverse proxy")
    try:
        key = state.keys.for_target(request.raw_path)
    except BadTarget as exc:
        if isinstance(exc, TargetTooLong):
            return plain(414, "414 request target too long")
        return plain(400, f"400 bad request target: {exc}")
    if method == "PURGE":
        return await purge(request, state, key)

    info = request[INFO]
    req = ProxyRequest(
        method=method,
        key=key,
        headers=request.headers,
        peer=request.remote,
        scheme="https" if request.secure else "http",
        deadline=asyncio.get_running_loop().time() + state.settings.request_deadline,
        timings=info.timings,
        request_id=info.rid,
    )
    has_body = request.body_exists
    if policy.bypass_reason(method, request.headers, has_body) is None:
        final = await _range_through(state, req, await state.readthrough.get(req))
    else:
        if has_body:
            refused = await _read_body(request, state, req)
            if refused is not None:
                return refused
        final = await state.readthrough.forward(req)
    return await respond(request, state, final)


async def _range_through(state: ProxyState, req: ProxyRequest, final: Final) -> Final:
    """A ``Range`` request whose whole answer is too large to store (so it would be streamed
    whole): the fetched answer is dropped and the client's ``Range`` goes to the origin, whose
    ``206`` is relayed (never stored). Anything else is answered from the entry (response.py)."""
    if (
        isinstance(final, Relayed)
        and final.detail == "too-large"
        and final.response.status == 200
        and "Range" in req.headers
    ):
        final.response.release()
        passed = await state.readthrough.forward(req)
        return (
            Relayed(passed.response, final.fwd, final.detail)
            if isinstance(passed, Relayed)
            else passed
        )
    return final


async def _read_body(
    request: web.Request, state: ProxyState, req: ProxyRequest
) -> web.Response | None:
    """Read the body to forward into ``req.body``; or return the response refusing it.

    The body is forwarded re-framed (the origin client sets Content-Length), so no framing
    the client chose ever reaches the origin; aiohttp's parser already refused conflicting
    framing with 400.
    """
    settings = state.settings
    transfer_encoding = request.headers.get("Transfer-Encoding")
    if transfer_encoding is not None:
        if request.version < HttpVersion11:
            # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message means faulty framing.
            return _refuse_body(400, "400 Transfer-Encoding in an HTTP/1.0 request")
        if transfer_encoding.strip().lower() != "chunked":
            # Only chunked is decoded here; another coding (e.g. "gzip, chunked") would reach
            # the origin still applied but no longer declared (RFC 9112 §6.1: 501).
            return _refuse_body(501, "501 transfer coding not supported: only chunked")
    length = request.content_length
    if length is not None and length > settings.max_body_bytes:
        return _refuse_body(413, "413 request body too large")  # refused before reading it
    try:
        async with asyncio.timeout(settings.body_timeout):
            req.body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _refuse_body(413, "413 request body too large")
    except TimeoutError:
        return _refuse_body(408, "408 request body not received in time")
    except (HttpProcessingError, web.RequestPayloadError):
        return _refuse_body(400, "400 malformed request body")
    return None


def _refuse_body(status: int, text: str) -> web.Response:
    response = plain(status, text)
    response.force_close()  # the rest of the body is unread: don't reuse the connection
    return response
