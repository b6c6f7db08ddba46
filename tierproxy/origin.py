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
import functools
import logging
import select
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.helpers import set_exception
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .clock import SYSTEM, Clock
from .policy import end_to_end

__all__ = [
    "ConnectorUnavailable",
    "OriginBusy",
    "OriginClient",
    "OriginError",
    "OriginResponse",
    "OriginTimeout",
    "connector_internals_available",
    "upstream_headers",
]

log = logging.getLogger("tierproxy.origin")

_CONDITIONALS = ("if-none-match", "if-modified-since", "if-match", "if-unmodified-since",
                 "if-range", "range")
_ALWAYS_DROP = ("host", "content-length", "expect", "x-forwarded-for", "x-forwarded-proto",
                "x-real-ip")


class OriginTimeout(Exception):
    """The origin did not answer (headers and body) within the budget."""


class OriginError(Exception):
    """The origin refused the connection or sent a broken response."""


# What the origin or the connection to it can cause: aiohttp reports a refused or reset
# connection, a malformed or cut-short response as ClientError (ClientOSError,
# ClientPayloadError, ClientResponseError, ServerDisconnectedError); a socket error that
# escapes it is an OSError. Anything else raised during a fetch (e.g. a ValueError from a
# header built here) is tierproxy's own error and must not count against the origin.
_ORIGIN_FAULTS = (aiohttp.ClientError, OSError)


class ConnectorUnavailable(RuntimeError):
    """This aiohttp lacks the client connector hooks that keep origin connections clean;
    start-up stops with this message (there is no running without them)."""


class OriginBusy(Exception):
    """No origin connection came free within ``TIERPROXY_ORIGIN_QUEUE_TIMEOUT``.

    Not a failure of the origin (it was never asked), so never counted against its breaker.
    Deliberately not a TimeoutError: aiohttp would turn that into a connection timeout.
    """


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


# -- connections: a pooled connection is reused only when nothing unread is on it ----------

# The connector internals the two classes below hook into (aiohttp 3.14); checked at open().
_CONNECTOR_INTERNALS = ("_get", "_release", "_wait_for_available_connection", "_factory")


def connector_internals_available() -> bool:
    """Whether this aiohttp has the connector hooks that keep pooled connections clean."""
    connector = aiohttp.TCPConnector
    return (all(callable(getattr(connector, name, None)) for name in _CONNECTOR_INTERNALS[:3])
            and callable(getattr(ResponseHandler, "data_received", None)))


def _input_pending(transport: asyncio.BaseTransport) -> bool:
    """Whether the kernel holds bytes (or an EOF, or an error) the loop has not read yet."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))  # POLLHUP/POLLERR are reported whatever is asked
    except (OSError, ValueError):
        return True  # a socket that cannot be polled is not one to reuse


class _OriginProtocol(ResponseHandler):
    """aiohttp's client protocol, with the two integrity rules it lacks (aiohttp 3.14).

    * Bytes that arrive on an idle pooled connection belong to no request. aiohttp parses
      them and keeps the result for the next request sent on that connection, which then
      takes the stray response as its own (RFC 9112 §9.3: a response matches the oldest
      outstanding request; with none outstanding, the connection is not usable). Such a
      connection is closed when the bytes arrive, and one about to be reused is first
      checked for bytes or an EOF the loop has not read yet.
    * A close-delimited body (RFC 9112 §6.3 item 8: no Content-Length, not chunked) is
      complete only at a clean close. aiohttp completes it on any connection loss, a TCP
      reset included; here a loss with an error fails the body instead.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 discarded: Callable[[str], None] | None = None) -> None:
        super().__init__(loop)
        self.idle = False  # in the pool, no request outstanding
        self._discarded = discarded

    def discard(self, reason: str, detail: str, level: int = logging.WARNING) -> None:
        log.log(level, "origin connection discarded: %s", detail)
        if self._discarded is not None:
            self._discarded(reason)
        self.force_close()
        transport = self.transport
        if transport is not None:
            transport.close()

    def data_received(self, data: bytes) -> None:
        if self.idle and data:
            self.discard("unsolicited-bytes",
                         f"{len(data)} unsolicited bytes on an idle connection")
            return
        super().data_received(data)

    def is_connected(self) -> bool:
        if not super().is_connected():
            return False
        if not self.idle:
            return True
        if self.should_close or self._buffer:
            # Bytes that came after the last response, in the same read as its end.
            self.discard("unsolicited-bytes", "a response no request asked for, left unread")
            return False
        if self.transport is not None and _input_pending(self.transport):
            # Often just the origin closing an idle connection (a FIN the loop has not read
            # yet): normal, so not a warning; the connection is not reused either way.
            self.discard("unread-before-reuse", "unread bytes or EOF on an idle connection",
                         logging.INFO)
            return False
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        payload = self._payload
        if exc is not None and payload is not None and not payload.is_eof():
            set_exception(
                payload,
                aiohttp.ClientPayloadError(f"origin connection lost mid-body: {exc!r}"),
                exc,
            )
        super().connection_lost(exc)


@dataclass(slots=True)
class _FetchClock:
    """The running fetch's origin budget, so queueing for a connection can stop its clock."""

    timeout: asyncio.Timeout
    started: float  # loop time the fetch began
    budget: float  # origin seconds allowed
    queue_timeout: float
    hard_deadline: float | None  # the request's deadline (loop time), never exceeded


_FETCH_CLOCK: contextvars.ContextVar[_FetchClock | None] = contextvars.ContextVar(
    "tierproxy_origin_fetch_clock", default=None
)


class _OriginConnector(aiohttp.TCPConnector):
    """A TCPConnector whose pooled connections are checked before reuse (_OriginProtocol)
    and whose wait for a free connection is bounded on its own, outside the origin budget."""

    def __init__(self, *, discarded: Callable[[str], None] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(getattr(self, "_factory", None), functools.partial):
            # Replacing an attribute aiohttp no longer uses would silently drop both checks.
            raise ConnectorUnavailable(
                f"aiohttp {aiohttp.__version__} builds client connections without the "
                "TCPConnector._factory tierproxy hooks into; install the aiohttp version "
                "tierproxy pins (>=3.14.4,<3.15)"
            )
        self._factory = cast(
            "functools.partial[ResponseHandler]",
            functools.partial(_OriginProtocol, loop=self._loop, discarded=discarded),
        )

    async def _get(self, key: Any, traces: list[Any]) -> aiohttp.connector.Connection | None:
        # No traces are configured, so the parent does not await: nothing runs between its
        # is_connected() check and the connection leaving the idle state here.
        connection = await super()._get(key, traces)
        if connection is not None and isinstance(connection.protocol, _OriginProtocol):
            connection.protocol.idle = False
        return connection

    def _release(self, key: Any, protocol: ResponseHandler, *, should_close: bool = False) -> None:
        super()._release(key, protocol, should_close=should_close)
        if isinstance(protocol, _OriginProtocol) and protocol.transport is not None:
            protocol.idle = True  # pooled (a closed one has no transport)

    async def _wait_for_available_connection(self, key: Any, traces: list[Any]) -> None:
        clock = _FETCH_CLOCK.get()
        if clock is None:
            await super()._wait_for_available_connection(key, traces)
            return
        loop = self._loop
        queued_at = loop.time()
        # Waiting for a free connection is not origin time: stop the origin clock meanwhile.
        clock.timeout.reschedule(None)
        wait = clock.queue_timeout
        if clock.hard_deadline is not None:
            wait = min(wait, clock.hard_deadline - queued_at)
        try:
            async with asyncio.timeout(max(0.0, wait)):
                await super()._wait_for_available_connection(key, traces)
        except TimeoutError:
            # The origin clock stays stopped: this propagates at once (aiohttp awaits nothing
            # on the way out), and a clock restarted in the past could turn it into a timeout.
            raise OriginBusy(f"no free origin connection within {wait:.3f}s") from None
        # A connection is free: the origin clock goes on with what was left of the budget.
        when = loop.time() + max(0.0, clock.budget - (queued_at - clock.started))
        if clock.hard_deadline is not None:
            when = min(when, clock.hard_deadline)
        clock.timeout.reschedule(when)


class OriginClient:
    def __init__(self, base_url: str, *, max_connections: int, read_timeout: float,
                 queue_timeout: float = 0.5,
                 discarded: Callable[[str], None] | None = None,
                 clock: Clock = SYSTEM) -> None:
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
        connector = _OriginConnector(limit=self._max_connections, ttl_dns_cache=60,
                                     discarded=self._discarded)
        self._session = aiohttp.ClientSession(
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

        Only what comes from the origin or the connection to it is an :class:`OriginError`;
        any other exception is a local error and propagates as it is.
        """
        session = self._session
        if session is None:
            raise OriginError("origin client is closed")
        url = URL(self.base_url + target, encoded=True)
        request_time = self.clock.wall()
        response: aiohttp.ClientResponse | None = None
        loop = asyncio.get_running_loop()
        clock_token: contextvars.Token[_FetchClock | None] | None = None
        try:
            async with asyncio.timeout(budget) as timeout:
                clock_token = _FETCH_CLOCK.set(
                    _FetchClock(timeout, loop.time(), budget, self.queue_timeout, deadline)
                )
                try:
                    response = await session.request(
                        method, url, headers=headers, data=body, allow_redirects=False,
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
                    return OriginResponse(response.status, response.headers, None, response, b"",
                                          request_time, response_time)
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
                        return OriginResponse(response.status, response.headers, None, response,
                                              bytes(prefix), request_time, response_time)
        except BaseException as exc:  # cancellation included: close, then re-raise below
            if response is not None:
                response.close()
            if isinstance(exc, TimeoutError):
                raise OriginTimeout(f"no complete answer within {budget:.3f}s") from None
            if isinstance(exc, _ORIGIN_FAULTS):
                raise OriginError(f"{type(exc).__name__}: {exc}") from None
            raise  # OriginBusy, CancelledError, or a local error (a bug: not the origin's)

    @staticmethod
    def _buffered(
        response: aiohttp.ClientResponse, data: bytes, request_time: float, response_time: float
    ) -> OriginResponse:
        response.release()
        return OriginResponse(response.status, response.headers, data, None, b"",
                              request_time, response_time)

    async def read_chunk(self, response: aiohttp.ClientResponse) -> bytes:
        """One chunk of a streamed body, within the origin timeout (an idle bound)."""
        try:
            async with asyncio.timeout(self.read_timeout):
                return await response.content.readany()
        except TimeoutError:
            raise OriginTimeout("origin stalled mid-body") from None
        except _ORIGIN_FAULTS as exc:
            raise OriginError(f"{type(exc).__name__}: {exc}") from None
