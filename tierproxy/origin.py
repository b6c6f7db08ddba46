"""The origin client: one pooled aiohttp session, every fetch under a deadline.

The upstream URL is always ``TIERPROXY_ORIGIN`` + the normalised key material: no client
byte chooses the host. Redirects are passed back, never followed; bodies are forwarded as the
origin encoded them (no decompression).

A connection's bytes are never attributed to the wrong response: a pooled connection that
received bytes no request asked for (or holds unread bytes or an EOF) is closed, not reused,
and a body delimited by the connection's close is complete only at a clean close
(:class:`_OriginProtocol`). Waiting for a free pooled connection is bounded by its own
timeout and is not origin time (:class:`_OriginConnector`, :class:`OriginBusy`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# The connector hooks that keep origin connections clean touch aiohttp internals: they live
# with every other such piece of code in tierproxy.aiohttp_internals.
from .aiohttp_internals import (
    _FETCH_CLOCK,
    ConnectorUnavailable,
    OriginBusy,
    _FetchClock,
    _OriginConnector,
    connector_internals_available,
    without_builtin_retry,
)
from .clock import SYSTEM, Clock
from .policy import end_to_end

__all__ = [
    "ConnectorUnavailable",
    "OriginBusy",
    "OriginClient",
    "OriginError",
    "OriginResponse",
    "OriginTimeout",
    "OriginUnanswered",
    "connector_internals_available",
    "rewritten_fields",
    "upstream_headers",
]

log = logging.getLogger("tierproxy.origin")

_CONDITIONALS = (
    "if-none-match",
    "if-modified-since",
    "if-match",
    "if-unmodified-since",
    "if-range",
    "range",
)
_ALWAYS_DROP = (
    "host",
    "content-length",
    "expect",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-real-ip",
)


# Request fields the proxy sets on every fetch (replacing any the client sent): the origin
# answers the proxy's value, never the client's.
_ALWAYS_SET = ("via", "x-request-id")


def rewritten_fields(denylist: frozenset[str]) -> frozenset[str]:
    """The request fields whose value the origin sees is not the client's on a fetch that
    fills the cache: dropped (``denylist`` included) or set by the proxy. A response that
    varies on one of them cannot be stored as a variant chosen by the client's value."""
    return frozenset((*_ALWAYS_DROP, *_CONDITIONALS, *_ALWAYS_SET, *denylist))


class OriginTimeout(Exception):
    """The origin did not answer (headers and body) within the budget."""


class OriginError(Exception):
    """The origin refused the connection or sent a broken response."""


class OriginUnanswered(OriginError):
    """The connection to the origin failed before any byte of a response arrived: refused,
    reset, or closed (e.g. a pooled connection the origin had closed). A request that may
    be repeated (RFC 9110 §9.2.2) may be retried (tierproxy.upstream)."""


def _unanswered(exc: BaseException) -> bool:
    """Whether ``exc``, raised before aiohttp returned a response on a connection that got no
    byte of an answer (_FetchClock.answered, checked first), is a connection failure: aiohttp
    3.14 reports one as ClientConnectorError (connect refused or failed),
    ServerDisconnectedError (closed before a response head; its ``message`` is the partial
    head when bytes of one were parsed, a plain string when none were) or ClientOSError /
    OSError (reset while sending or waiting). Only a GET or HEAD is ever retried."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return isinstance(exc.message, str)
    return isinstance(exc, OSError)  # ClientOSError and ClientConnectorError are OSErrors


# What the origin or the connection to it can cause: aiohttp reports a refused or reset
# connection, a malformed or cut-short response as ClientError (ClientOSError,
# ClientPayloadError, ClientResponseError, ServerDisconnectedError); a socket error that
# escapes it is an OSError. Anything else raised during a fetch (e.g. a ValueError from a
# header built here) is tierproxy's own error and must not count against the origin.
_ORIGIN_FAULTS = (aiohttp.ClientError, OSError)


@dataclass(slots=True)
class OriginResponse:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes | None  # the whole body when it fit in the buffer limit, else None
    stream: aiohttp.ClientResponse | None  # still open, for bodies streamed through
    prefix: bytes  # bytes of a streamed body already read while deciding to stream
    request_time: float  # wall clock, for RFC 9111 §4.2.3 age
    response_time: float

    def release(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def upstream_headers(
    request_headers: CIMultiDictProxy[str],
    peer: str | None,
    scheme: str,
    denylist: frozenset[str],
    cacheable: bool,
) -> CIMultiDict[str]:
    """Request headers for the origin: end-to-end only, unkeyed risky ones dropped."""
    drop: list[str] = [*_ALWAYS_DROP, *denylist]
    if cacheable:
        # A fetch that fills the cache must get the full representation, not the client's
        # partial or conditional one; client validators are answered from the entry instead.
        drop.extend(_CONDITIONALS)
    headers: CIMultiDict[str] = CIMultiDict(end_to_end(request_headers, drop))
    # A client's own X-Forwarded-For is kept (and appended to) only when the operator allows
    # it (TIERPROXY_FORWARD_HEADERS, e.g. behind a trusted load balancer).
    forwarded_for = (
        None if "x-forwarded-for" in denylist else request_headers.get("X-Forwarded-For")
    )
    if peer:
        headers["X-Forwarded-For"] = f"{forwarded_for}, {peer}" if forwarded_for else peer
    headers["X-Forwarded-Proto"] = scheme
    headers.add("Via", "1.1 tierproxy")
    return headers


class OriginClient:
    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int,
        read_timeout: float,
        queue_timeout: float = 0.5,
        discarded: Callable[[str], None] | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        self.base_url = base_url
        # request_time / response_time (RFC 9111 §4.2.3) are wall-clock readings of it.
        self.clock = clock
        self.read_timeout = read_timeout
        self.queue_timeout = queue_timeout
        self._session: aiohttp.ClientSession | None = None
        self._max_connections = max_connections
        self._discarded = discarded

    async def open(self) -> None:
        if not connector_internals_available():
            raise ConnectorUnavailable(
                f"aiohttp {aiohttp.__version__} lacks the connector internals tierproxy uses to "
                "keep origin connections clean; install the aiohttp version tierproxy pins "
                "(>=3.14.4,<3.15)"
            )
        connector = _OriginConnector(
            limit=self._max_connections, ttl_dns_cache=60, discarded=self._discarded
        )
        session = aiohttp.ClientSession(
            connector=connector,
            # Bytes as the origin sent them (aiohttp decompresses by default, and a proxy must
            # store and forward the origin's encoding); no cookies kept between clients.
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            # Budgets come from asyncio.timeout per fetch; the session adds none of its own.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=None, sock_read=None),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
            raise_for_status=False,
        )
        # Retries are tierproxy's (tierproxy.upstream): aiohttp's own resend is turned off.
        self._session = without_builtin_retry(session)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | None,
        budget: float,
        buffer_limit: int,
        *,
        deadline: float | None = None,
    ) -> OriginResponse:
        """Send the request; read the body too when it fits in ``buffer_limit`` bytes.

        Headers, and a body that is buffered, come within ``budget`` seconds of origin time
        or :class:`OriginTimeout` is raised. Waiting for a free pooled connection is not
        origin time: it is bounded by ``queue_timeout`` (:class:`OriginBusy`) and stops the
        budget's clock. ``deadline`` (loop time), the request's, bounds both. A larger body
        is left open for streaming.

        Only what comes from the origin or the connection to it is an :class:`OriginError`
        (:class:`OriginUnanswered` when it failed before any response byte); any other
        exception is a local error and propagates as it is.
        """
        session = self._session
        if session is None:
            raise OriginError("origin client is closed")
        url = URL(self.base_url + target, encoded=True)
        request_time = self.clock.wall()
        response: aiohttp.ClientResponse | None = None
        loop = asyncio.get_running_loop()
        clock_token: contextvars.Token[_FetchClock | None] | None = None
        fetch_clock: _FetchClock | None = None
        try:
            async with asyncio.timeout(budget) as timeout:
                fetch_clock = _FetchClock(
                    timeout, loop.time(), budget, self.queue_timeout, deadline
                )
                clock_token = _FETCH_CLOCK.set(fetch_clock)
                try:
                    response = await session.request(
                        method,
                        url,
                        headers=headers,
                        data=body,
                        allow_redirects=False,
                        # absolute URL from TIERPROXY_ORIGIN only; no proxy from the environment
                        proxy=None,
                    )
                finally:
                    _FETCH_CLOCK.reset(clock_token)
                response_time = self.clock.wall()
                length = response.content_length
                if method == "HEAD" or response.status in (204, 304) or response.status < 200:
                    await response.read()
                    return self._buffered(response, b"", request_time, response_time)
                if length is not None and length > buffer_limit:
                    return OriginResponse(
                        response.status,
                        response.headers,
                        None,
                        response,
                        b"",
                        request_time,
                        response_time,
                    )
                if length is not None:
                    data = await response.read()
                    return self._buffered(response, data, request_time, response_time)
                # No length: read up to the limit; past it, stream the rest through. A body
                # ends only at a clean close (see _OriginProtocol.connection_lost).
                prefix = bytearray()
                while True:
                    chunk = await response.content.readany()
                    if not chunk:
                        return self._buffered(response, bytes(prefix), request_time, response_time)
                    prefix += chunk
                    if len(prefix) > buffer_limit:
                        return OriginResponse(
                            response.status,
                            response.headers,
                            None,
                            response,
                            bytes(prefix),
                            request_time,
                            response_time,
                        )
        except BaseException as exc:  # cancellation included: close, then re-raise below
            if response is not None:
                response.close()
            if isinstance(exc, TimeoutError):
                raise OriginTimeout(f"no complete answer within {budget:.3f}s") from None
            answered = fetch_clock is not None and fetch_clock.answered
            if response is None and not answered and _unanswered(exc):
                raise OriginUnanswered(f"{type(exc).__name__}: {exc}") from None
            if isinstance(exc, _ORIGIN_FAULTS):
                raise OriginError(f"{type(exc).__name__}: {exc}") from None
            raise  # OriginBusy, CancelledError, or a local error (a bug: not the origin's)

    @staticmethod
    def _buffered(
        response: aiohttp.ClientResponse, data: bytes, request_time: float, response_time: float
    ) -> OriginResponse:
        response.release()
        return OriginResponse(
            response.status, response.headers, data, None, b"", request_time, response_time
        )

    async def read_chunk(self, response: aiohttp.ClientResponse) -> bytes:
        """One chunk of a streamed body, within the origin timeout (an idle bound)."""
        try:
            async with asyncio.timeout(self.read_timeout):
                return await response.content.readany()
        except TimeoutError:
            raise OriginTimeout("origin stalled mid-body") from None
        except _ORIGIN_FAULTS as exc:
            raise OriginError(f"{type(exc).__name__}: {exc}") from None
