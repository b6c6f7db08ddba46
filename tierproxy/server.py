"""The proxy listener: one aiohttp app whose cleanup_ctx owns every resource.

The handler parses the request into a :class:`~tierproxy.readthrough.ProxyRequest`, asks the
orchestrator for a result, and writes it; it does no caching logic of its own.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from . import policy, states
from .background import BackgroundTasks
from .clock import SYSTEM, Clock
from .config import Settings
from .entry import FORBIDDEN_IN_HEADER, OWN_HEADERS, has_raw_bytes, wire
from .hits import Handover, HitPath, SharedBodyResponse, cached_body_response
from .invalidation import Invalidation, PurgeOrder
from .keys import BadTarget, CacheKey, KeySpace, TargetTooLong, normalise_target
from .listener import BODY_SLICE_BYTES, ProxyRunner, client_connection_cap, handler_args
from .logs import AccessLog, dropped_lines, request_id
from .metrics import BREAKER_STATES, Metrics
from .origin import OriginClient, OriginError, OriginResponse, OriginTimeout
from .readthrough import ProxyRequest, ReadThrough
from .states import Failed, Fetched, Final, FreshHit, Relayed, StaleHit
from .tiers import make_tiers
from .tiers.base import Breaker, GuardedTier

__all__ = ["STATE", "ProxyState", "build_app", "make_runner"]

log = logging.getLogger("tierproxy.server")

# Response headers never passed from the origin to the client on a forwarded response.
_RESPONSE_DROP = ("content-length", "surrogate-key", "surrogate-control")


def _write_exact_head(response: web.StreamResponse, request: web.BaseRequest) -> None:
    """Write ``response``'s status line and headers as aiohttp would, but byte-exact: header
    str from aiohttp's parser go back to the bytes they came from (surrogateescape). A field
    with CR, LF or another control character is refused, as aiohttp refuses it."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("Cannot write to closing transport")
    version = request.version
    lines = [f"HTTP/{version.major}.{version.minor} {response.status} {response.reason}"]
    for name, value in response.headers.items():
        if FORBIDDEN_IN_HEADER.search(name) or FORBIDDEN_IN_HEADER.search(value):
            raise ValueError("Forbidden control character detected in headers")
        lines.append(f"{name}: {value}")
    transport.write(wire("\r\n".join(lines) + "\r\n\r\n"))


class _ExactHead(web.StreamResponse):
    """A response whose head is written by :func:`_write_exact_head` (the body, framing and
    everything else stay aiohttp's). Used only when a header holds non-UTF-8 bytes."""

    def __init__(self, request: web.BaseRequest, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._exact_request = request

    async def _write_headers(self) -> None:  # aiohttp's hook: called once by prepare()
        _write_exact_head(self, self._exact_request)


class _ExactHeadResponse(_ExactHead, web.Response):
    """A whole body in one write, head byte-exact."""


class _ExactHeadStreamResponse(_ExactHead):
    """A streamed body, head byte-exact."""


class _ExactHeadSharedBodyResponse(_ExactHead, SharedBodyResponse):
    """A large stored body sent in slices, head byte-exact."""


def _cached_response(request: web.BaseRequest, status: int, body: bytes | None,
                     headers: CIMultiDict[str], exact_head: bool) -> web.StreamResponse:
    """The full path's response for a stored entry: a large body as slices of the stored
    bytes (:class:`~tierproxy.hits.SharedBodyResponse`: never a copy per slow client), and a
    head with non-UTF-8 bytes written byte-exact (:func:`_write_exact_head`)."""
    if not exact_head:
        if body is None:
            return web.Response(status=status, headers=headers)
        return cached_body_response(request.method, status, body, headers)
    if body is None or request.method == "HEAD" or len(body) <= BODY_SLICE_BYTES:
        return _ExactHeadResponse(request, status=status, body=body, headers=headers)
    return _ExactHeadSharedBodyResponse(request, status=status, body=body, headers=headers)


def _cache_status(upstream: str, ours: str) -> str:
    """RFC 9211 §2: members are listed from the origin towards the user agent, so an
    upstream cache's members come first and tierproxy's last."""
    return f"{upstream}, {ours}" if upstream else ours


@dataclass(slots=True)
class ProxyState:
    settings: Settings
    metrics: Metrics
    tiers: list[GuardedTier]
    origin: OriginClient
    background: BackgroundTasks
    readthrough: ReadThrough
    access_log: AccessLog
    invalidation: Invalidation
    keys: KeySpace  # request target -> CacheKey in this origin's namespace
    ready: bool = False
    inflight: int = 0
    notes: list[str] = field(default_factory=list)
    clock: Clock = SYSTEM  # freshness, ages and stale windows (tierproxy.clock)

    def tier(self, name: str) -> GuardedTier | None:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        return None


STATE = web.AppKey("tierproxy_state", ProxyState)


class _RequestInfo:
    """What the access log needs from deeper down: the request id and the tier timings."""

    __slots__ = ("rid", "timings")

    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.timings: dict[str, float] = {}


_INFO = web.RequestKey("tierproxy_request_info", _RequestInfo)


def _breaker_open(breaker: Breaker) -> Callable[[], float]:
    return lambda: float(breaker.is_open)


def _breaker_in(breaker: Breaker, breaker_state: str) -> Callable[[], float]:
    return lambda: float(breaker.state() == breaker_state)


def _health_is(breaker: Breaker, tier_state: str) -> Callable[[], float]:
    return lambda: float(breaker.health() == tier_state)


def _state_is(tier: GuardedTier, tier_state: str) -> Callable[[], float]:
    return lambda: float(tier.state() == tier_state)


def _register_gauges(state: ProxyState) -> None:
    """Gauges read their value at scrape time: nothing on the request path updates them."""
    m = state.metrics
    m.inflight.set_function(lambda: state.inflight)
    m.background_tasks.set_function(lambda: state.background.pending)
    m.request_deadline.set(state.settings.request_deadline)
    m.log_dropped.set_function(lambda: float(dropped_lines()))
    # A tier's writes have their own breaker ("<tier>-writes"): a full disk stops writes only.
    breakers = [(tier.name, tier.breaker) for tier in state.tiers]
    breakers += [(f"{tier.name}-writes", tier.write_breaker) for tier in state.tiers]
    breakers.append(("origin", state.readthrough.origin_breaker))
    for name, breaker in breakers:
        m.breaker_open.labels(name).set_function(_breaker_open(breaker))
        for breaker_state in BREAKER_STATES:
            m.breaker_state.labels(name, breaker_state).set_function(
                _breaker_in(breaker, breaker_state)
            )
    for tier in state.tiers:
        for tier_state in ("up", "degraded", "breaker-open", "unavailable"):
            m.tier_state.labels(tier.name, tier_state).set_function(_state_is(tier, tier_state))
    for tier_state in ("up", "degraded", "breaker-open"):
        m.tier_state.labels("origin", tier_state).set_function(
            _health_is(state.readthrough.origin_breaker, tier_state)
        )
    for tier in state.tiers:
        m.tier_timeout.labels(tier.name).set(tier.read_timeout)
        tier.watch(m)
    m.tier_timeout.labels("origin").set(state.settings.origin_timeout)


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """Open every resource before serving; on the way out drain, then close (in that order)."""
    state = app[STATE]
    settings = state.settings
    opened: list[GuardedTier] = []
    try:
        await state.origin.open()
        for tier in state.tiers:
            await tier.open()
            opened.append(tier)
    except BaseException:
        for tier in opened:
            await tier.close()
        await state.origin.close()
        raise
    if settings.redis_url is None:
        log.info("L2 off: TIERPROXY_REDIS_URL is unset")
    else:
        l2 = state.tier("l2")
        assert l2 is not None
        state.invalidation.start()  # the replicas' purge channel
        try:
            await l2.ping(max(1.0, settings.l2_timeout))
            log.info("L2 Redis reachable")
            # Subscribing clears L1 (it may have missed purges): do it before serving.
            if not await state.invalidation.wait_subscribed(max(1.0, settings.l2_write_timeout)):
                log.warning("not yet subscribed to the replicas' purge channel; L1 will be "
                            "cleared when it is")
        except Exception as exc:  # start anyway: L2 is a cache, its breaker handles it
            log.warning("L2 Redis not reachable at start-up (%r); serving without it until it is",
                        exc)
    if settings.sqlite_path is None:
        log.info("L3 off: TIERPROXY_SQLITE_PATH=off")
    if settings.l1_max_bytes == 0:
        log.info("L1 off: TIERPROXY_L1_MAX_BYTES=0")
    state.access_log.start()  # decided once: the hot path checks one attribute
    state.ready = True
    try:
        yield
    finally:
        state.ready = False
        # Its purges write to L1/L3: stop listening before the tiers close.
        await state.invalidation.stop()
        # Backfills write to the tiers: let them finish (bounded) before the tiers close.
        await state.background.drain(settings.shutdown_timeout)
        for tier in state.tiers:
            try:
                await tier.close()
            except Exception as exc:
                log.warning("closing %s: %r", tier.name, exc)
        await state.origin.close()


def build_app(
    settings: Settings, metrics: Metrics | None = None, *, clock: Clock = SYSTEM
) -> web.Application:
    """The proxy listener's app. Nothing is opened until the app starts. ``clock`` is what
    freshness, stale windows and breaker cool-downs read (tests advance one)."""
    metrics = metrics or Metrics()
    keys = KeySpace(settings.origin)
    tiers = make_tiers(settings, metrics, keys, clock=clock)
    discarded = metrics.origin_connections_discarded
    origin = OriginClient(
        settings.origin,
        max_connections=settings.origin_max_connections,
        read_timeout=settings.origin_timeout,
        queue_timeout=settings.origin_queue_timeout,
        discarded=lambda reason: discarded.labels(reason).inc(),
        clock=clock,
    )
    background = BackgroundTasks(settings.backfill_max_tasks, metrics)
    readthrough = ReadThrough(settings, tiers, origin, background, metrics, clock=clock)
    state = ProxyState(
        settings, metrics, tiers, origin, background, readthrough,
        AccessLog(settings.access_log),
        Invalidation(settings, tiers, readthrough, metrics, keys, clock=clock),
        keys, clock=clock,
    )
    _register_gauges(state)

    app = web.Application(
        client_max_size=max(1, settings.max_body_bytes), middlewares=[_unrouted_targets],
        # Request limits every runner applies; tierproxy.listener.ProxyRunner (what
        # `tierproxy serve` runs) adds the header read timeout and answers 414/431.
        handler_args=handler_args(settings),
    )
    app[STATE] = state
    app.cleanup_ctx.append(_resources)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def make_runner(
    app: web.Application, *, client_connections: int | None = None, **kwargs: Any
) -> ProxyRunner:
    """The runner ``tierproxy serve`` uses for ``app`` (see :func:`build_app`).

    Its connections are hardened (:mod:`tierproxy.listener`) and answer fresh L1 hits
    themselves (:mod:`tierproxy.hits`), at most ``client_connections`` at once (default:
    :func:`~tierproxy.listener.client_connection_cap` of the current descriptor limit);
    ``kwargs`` go to ``web.AppRunner``.
    """
    state = app[STATE]
    return ProxyRunner(
        app,
        header_timeout=state.settings.header_timeout,
        send_timeout=state.settings.send_timeout,
        hits=HitPath(state, state.tier("l1")) if state.tiers else None,
        allow_unhardened=state.settings.allow_unhardened,
        # Client connections bounded below the descriptor limit (TIERPROXY_MAX_CLIENT_CONNECTIONS).
        cap=state.metrics.connection_cap(
            client_connections or client_connection_cap(state.settings), "proxy"
        ),
        **kwargs,
    )


@web.middleware
async def _unrouted_targets(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    # aiohttp's router finds no route for an absolute-form target with an empty path
    # (``GET http://host:port HTTP/1.1``); RFC 9110 §4.2.3 makes that path "/". Such requests
    # still reach the proxy handler, which keys (and pins the upstream) as for any other.
    if request.match_info.http_exception is not None:
        return await handle(request)
    return await handler(request)


def _plain(status: int, text: str, x_cache: str = "BYPASS", cache_status: str = "tierproxy; fwd=bypass") -> web.Response:
    return web.Response(
        status=status, text=text + "\n",
        headers={"X-Cache": x_cache, "Cache-Status": cache_status},
    )


async def handle(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    handover = _handover(request)
    if handover is None:
        info = _RequestInfo(request_id(request.headers.get("X-Request-ID")))
    else:
        info = _RequestInfo(handover.req.request_id)
        info.timings = handover.req.timings
    request[_INFO] = info
    access_log = state.access_log
    if handover is not None:
        started = handover.started
    else:
        started = time.perf_counter() if access_log.enabled else 0.0
    state.inflight += 1
    try:
        if handover is None:
            response = await _handle(request, state)
        else:
            response = await _resume(request, state, handover)
    finally:
        state.inflight -= 1
    if not response.prepared:  # a streamed response got it in _respond, before its headers went
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


def _handover(request: web.Request) -> Handover | None:
    """The hit path's lookup for this request, if the connection's hit path made one
    (tierproxy.hits): the request keeps its id, deadline and tier timings."""
    take_handover = getattr(request.protocol, "take_handover", None)
    handover = take_handover(request.headers) if take_handover is not None else None
    return handover if isinstance(handover, Handover) else None


async def _resume(request: web.Request, state: ProxyState, handover: Handover) -> web.StreamResponse:
    """A plain GET the hit path looked up and could not answer: go on from its lookup."""
    req = handover.req
    req.scheme = "https" if request.secure else "http"  # the hit path cannot tell
    result = await state.readthrough.get(req, handover.found)
    return await _respond(request, state, result)


async def _handle(request: web.Request, state: ProxyState) -> web.StreamResponse:
    method = request.method
    if method == "CONNECT":
        return _plain(405, "405 CONNECT is not supported: this is a reverse proxy")
    try:
        material = normalise_target(request.raw_path)
    except BadTarget as exc:
        if isinstance(exc, TargetTooLong):
            return _plain(414, "414 request target too long")
        return _plain(400, f"400 bad request target: {exc}")
    key = state.keys.key(material)
    if method == "PURGE":
        return await _purge(request, state, key)

    loop = asyncio.get_running_loop()
    info = request[_INFO]
    req = ProxyRequest(
        method=method,
        key=key,
        headers=request.headers,
        peer=request.remote,
        scheme="https" if request.secure else "http",
        deadline=loop.time() + state.settings.request_deadline,
        timings=info.timings,
        request_id=info.rid,
    )
    has_body = request.body_exists
    if policy.bypass_reason(method, request.headers, has_body) is None:
        result = await state.readthrough.get(req)
    else:
        if has_body:
            refused = await _read_body(request, state, req)
            if refused is not None:
                return refused
        result = await state.readthrough.forward(req)
    return await _respond(request, state, result)


async def _read_body(request: web.Request, state: ProxyState, req: ProxyRequest) -> web.Response | None:
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
    response = _plain(status, text)
    response.force_close()  # the rest of the body is unread: don't reuse the connection
    return response


async def _respond(request: web.Request, state: ProxyState, result: Final) -> web.StreamResponse:
    now = state.clock.wall()
    x_cache, cache_status = states.labels(result, now)
    if isinstance(result, (FreshHit, StaleHit, Fetched)):
        entry = result.entry
        # The same head as the hit path writes (tierproxy.hits): the stored fields but
        # tierproxy's own, then Age, X-Cache, Cache-Status (upstream members first) and
        # X-Request-ID (set by handle()).
        if policy.client_not_modified(request.headers, entry):
            headers = CIMultiDict(
                (name, value) for name, value in entry.headers
                if name.lower() in policy.NOT_MODIFIED_HEADERS or name.lower() == "last-modified"
            )
            status = 304
            body = None
        else:
            headers = CIMultiDict(
                (name, value) for name, value in entry.headers if name.lower() not in OWN_HEADERS
            )
            status = entry.status
            body = entry.body
        headers["Age"] = str(entry.age(now))
        headers["X-Cache"] = x_cache
        upstream = entry.upstream_cache_status[:-2].decode("utf-8", "surrogateescape")
        headers["Cache-Status"] = _cache_status(upstream, cache_status)
        response = _cached_response(request, status, body, headers, entry.raw_bytes)
        state.metrics.response(x_cache, status)
        return response

    if isinstance(result, Failed):
        state.metrics.response(x_cache, result.status)
        text = {
            "origin-timeout": f"{result.status} origin timed out",
            "origin-error": f"{result.status} origin refused the connection or sent a broken response",
            "origin-busy": f"{result.status} origin connection pool is busy; retry shortly",
            "local-error": f"{result.status} internal error in the proxy (logged)",
        }.get(result.reason, f"{result.status} {result.reason}")
        failed = _plain(result.status, text, x_cache, cache_status)
        if result.status == 503:
            failed.headers["Retry-After"] = "1"  # RFC 9110 §10.2.3
        return failed

    assert isinstance(result, Relayed)
    origin_response = result.response
    headers = CIMultiDict(policy.end_to_end(origin_response.headers, _RESPONSE_DROP))
    # tierproxy's own fields replace the origin's; its Cache-Status member follows an
    # upstream's members (RFC 9211 §2).
    upstream = ", ".join(v.strip() for v in headers.popall("Cache-Status", ()) if v.strip())
    headers["X-Cache"] = x_cache
    headers["Cache-Status"] = _cache_status(upstream, cache_status)
    headers["X-Request-ID"] = request[_INFO].rid
    state.metrics.response(x_cache, origin_response.status)
    if origin_response.body is not None or origin_response.stream is None:
        if has_raw_bytes(headers.items()):
            return _ExactHeadResponse(request, status=origin_response.status,
                                      body=origin_response.body or b"", headers=headers)
        return web.Response(status=origin_response.status, body=origin_response.body or b"",
                            headers=headers)
    return await _stream(request, state, origin_response, headers)


class _ClientStalled(Exception):
    """The client took no response bytes for TIERPROXY_SEND_TIMEOUT."""


async def _send(response: web.StreamResponse, data: bytes, send_timeout: float) -> None:
    """Write ``data``; a client that does not take it within ``send_timeout`` is stalled.

    aiohttp waits for the transport to drain (without a bound) when its buffer is full; the
    hardened listener also cuts such a client off (tierproxy.listener), but this bound holds
    under any runner, so a stalled client never holds an origin connection longer.
    """
    try:
        async with asyncio.timeout(send_timeout):
            await response.write(data)
    except TimeoutError:
        raise _ClientStalled() from None


async def _stream(request: web.Request, state: ProxyState, origin_response: OriginResponse,
                  headers: CIMultiDict[str]) -> web.StreamResponse:
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
    response = (_ExactHeadStreamResponse(request, status=origin_response.status, headers=headers)
                if has_raw_bytes(headers.items())
                else web.StreamResponse(status=origin_response.status, headers=headers))
    length = upstream.content_length
    if length is not None:
        # Keep the origin's framing so the client can tell a truncated body from a whole one.
        response.content_length = length
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
        log.info("client %s took no bytes for %.1fs of a streamed %s; cut off",
                 request.remote, settings.send_timeout, request.path[:200])
    except TimeoutError:
        cut = "stream-timeout"
        log.warning("streamed body of %s not sent within TIERPROXY_STREAM_TIMEOUT=%.1fs; cut off",
                    request.path[:200], settings.stream_timeout)
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


def purge_authorized(request: web.Request, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time: the comparison must not
    reveal how much of the token was right. Shared by PURGE and the admin ``POST /purge``."""
    supplied = request.headers.get("Authorization", "")
    return hmac.compare_digest(supplied.encode("utf-8", "surrogateescape"),
                               f"Bearer {token}".encode())


async def _purge(request: web.Request, state: ProxyState, key: CacheKey) -> web.Response:
    """``PURGE <path>``: the key (the one entry per URL, whatever its Vary variant) from every
    tier and every replica's local tiers. ``Soft-Purge: 1`` marks it stale instead of deleting
    it. With replicas, 200 once each live one applied it or was fenced (see
    tierproxy.invalidation); 503 when that or a tier could not be confirmed."""
    token = state.settings.purge_token
    if token is None:
        return _plain(405, "405 PURGE is disabled: set TIERPROXY_PURGE_TOKEN to enable it")
    if not purge_authorized(request, token):
        state.metrics.purge_requests.labels("proxy", "unauthorized").inc()
        return _plain(401, "401 unauthorized")
    soft = request.headers.get("Soft-Purge", "0").strip() == "1"
    outcome = await state.invalidation.purge(
        PurgeOrder((key.material,), (), soft, state.clock.wall()), "proxy"
    )
    body = {"key": key.material, **outcome.body}
    return web.Response(status=200 if outcome.ok else 503, text=json.dumps(body),
                        content_type="application/json",
                        headers={"X-Cache": "BYPASS", "Cache-Status": "tierproxy; fwd=bypass"})
