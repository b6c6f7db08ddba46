"""The proxy's HTTP/1.1 listener: aiohttp's connection handler, hardened for untrusted clients.

aiohttp parses requests with its C parser (llhttp): conflicting framing (Content-Length with
Transfer-Encoding, duplicate Content-Length, an obfuscated Transfer-Encoding, bad chunk framing)
is already refused with 400 and the connection closed. What a proxy facing every client needs
on top, and aiohttp 3.14 does not do:

* A header read timeout (slowloris). A request head must be complete
  ``TIERPROXY_HEADER_TIMEOUT`` seconds after its first byte (for a connection's first request:
  after the connection opened); otherwise 408 and the connection is closed. aiohttp only bounds
  idle keep-alive time, and bytes of an unfinished head do not count as activity for it - but
  its timer is never shortened by a client trickling a head either, so without this a
  connection could be held for ``keepalive_timeout`` per request.
* The right status for over-long input: 414 for the request-target, 431 for a header line or
  too many header lines (aiohttp answers 400 to all three). Logged at debug, not as an error
  with a traceback, so a client cannot flood the log.
* A framing error in a request body that arrives after the handler began reading that body
  fails the read at once (aiohttp drops the body stream without telling its reader, which
  then waits until the client goes away); the proxy answers 400.
* A send timeout (slow read). A client that accepts no bytes for ``TIERPROXY_SEND_TIMEOUT``
  seconds while its response waits to be written is disconnected. Without it, a client that
  asks for a streamed response and never reads holds one pooled origin connection for as long
  as it likes; ``TIERPROXY_ORIGIN_MAX_CONNECTIONS`` such clients stop every cache miss.

* Bounded memory per slow reader: a hit's large body goes out as slices of the stored bytes
  while the transport is under its high-water mark, the rest as the client drains
  (:meth:`ProxyRequestHandler._write_answer`), never as a copy per connection.
* Bounded file descriptors: at most ``TIERPROXY_MAX_CLIENT_CONNECTIONS`` open connections
  (:class:`ConnectionCap`; by default what RLIMIT_NOFILE leaves after a reserve for the
  origin and Redis pools, SQLite, the admin port and the process, :func:`client_connection_cap`);
  at the cap the oldest idle keep-alive connections are closed first, and a new connection is
  refused with 503 only when none is idle. The admin port has its own small cap.

The limits themselves are aiohttp's (:func:`handler_args`), so any runner - including a plain
``web.AppRunner`` - refuses the same requests; only :class:`ProxyRunner` adds the header timeout
and the exact statuses. This relies on ``RequestHandler`` internals of aiohttp 3.14.4 and later
(``_waiter``, ``_request_count``, ``_messages``, ``_current_request``, ``_buffer_paused``, ...;
see ``_INTERNALS``; 3.14.0-3.14.3 lack ``_buffer_paused``). Without them the proxy refuses to
start (:func:`missing_internals`, checked by ``tierproxy serve`` and by :class:`ProxyRunner`)
unless ``TIERPROXY_ALLOW_UNHARDENED=on`` lets it run on aiohttp's own handler, with a warning.
CI runs the listener tests on the oldest and the newest aiohttp the pin admits.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler

try:  # aiohttp internals this module reads; see internals_available()
    from aiohttp.web_protocol import _ErrInfo
except ImportError:  # pragma: no cover - another aiohttp version
    _ErrInfo = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from aiohttp.web_request import BaseRequest

    from .config import Settings

__all__ = ["ADMIN_MAX_CONNECTIONS", "CappedRunner", "ConnectionCap", "ProxyRequestHandler",
           "ProxyRunner", "UnhardenedListener", "client_connection_cap", "handler_args",
           "internals_available", "listen_backlog", "missing_internals", "unhardened_message"]

log = logging.getLogger("tierproxy.listener")

_INTERNALS = ("_waiter", "_request_count", "_messages", "_current_request", "_loop", "_parser",
              "_buffer_paused", "_keepalive", "_keepalive_handle", "_keepalive_timeout",
              "_next_keepalive_close_time", "_manager", "_force_close", "_close")

_INTERNAL_METHODS = ("_process_keepalive",)  # overridden: must still be what aiohttp calls

# Bodies up to this size go out in one write with their head (one copy, one syscall).
_JOIN_BODY_BYTES = 16 * 1024
# Larger ones as slices of a memoryview of the stored (immutable, shared) bytes, written only
# while the transport is under its high-water mark, so a client that reads slowly holds about
# that much, not a copy of the body: Python 3.11's transport.writelines joins its buffers, and
# what a transport cannot send at once it copies into its own buffer (asyncio) or keeps.
BODY_SLICE_BYTES = 64 * 1024


class HitAnswerer(Protocol):
    """Answers a parsed request (see :mod:`tierproxy.hits`): with the response's head and body
    at once; or with an awaitable that gives them, or else an object for the full path
    (:meth:`ProxyRequestHandler.take_handover`); or declines (None)."""

    def answer(
        self, message: RawRequestMessage, remote: str | None
    ) -> tuple[bytes, bytes] | Awaitable[tuple[bytes, bytes] | object] | None: ...


class UnhardenedListener(RuntimeError):
    """This aiohttp lacks what the hardened listener needs, and running without was not allowed."""


def missing_internals() -> list[str]:
    """The aiohttp internals the hardened handler reads that this aiohttp lacks (none: [])."""
    slots: set[str] = set()
    for cls in RequestHandler.__mro__:
        slots.update(getattr(cls, "__slots__", ()))
    missing = [f"RequestHandler.{name}" for name in _INTERNALS if name not in slots]
    missing += [f"RequestHandler.{name}()" for name in _INTERNAL_METHODS
                if not callable(getattr(RequestHandler, name, None))]
    if _ErrInfo is None:
        missing.append("web_protocol._ErrInfo")
    return missing


def internals_available() -> bool:
    """Whether this aiohttp has the ``RequestHandler`` internals the hardened handler reads."""
    return not missing_internals()


def unhardened_message(missing: list[str]) -> str:
    """One line for the operator: what is missing, what it costs, what to do."""
    return (f"aiohttp {aiohttp.__version__} lacks internals the hardened listener needs "
            f"({', '.join(missing)}): without them there are no request-head/send timeouts; "
            "install the aiohttp version tierproxy pins (>=3.14.4,<3.15), or set "
            "TIERPROXY_ALLOW_UNHARDENED=on to run without these protections")


def handler_args(settings: Settings) -> dict[str, Any]:
    """aiohttp ``RequestHandler`` arguments for the proxy listener."""
    return {
        # aiohttp checks the request-target alone against max_line_size ...
        "max_line_size": settings.max_url_bytes,
        # ... and a header's name and its value against max_field_size (3.14 counts the two
        # together only for the first header line; a head is bounded by max_headers x this).
        "max_field_size": settings.max_header_bytes,
        "max_headers": settings.max_headers,
        # Idle keep-alive bound; aiohttp's default (3630 s) would let idle connections pile up.
        "keepalive_timeout": settings.keepalive_timeout,
        # A proxy forwards a request body as the client encoded it (Content-Encoding and all);
        # decompressing would also let a small gzip body expand past TIERPROXY_MAX_BODY_BYTES.
        "auto_decompress": False,
    }


def _client_error_status(exc: HttpProcessingError, max_line_size: int, max_field_size: int) -> int:
    """414 / 431 for over-long input, else 400 (aiohttp reports every parse error as 400)."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == max_line_size and limit != max_field_size:
            return 414
        if limit == max_field_size and limit != max_line_size:
            return 431
        # Equal limits (an unusual configuration): aiohttp's C parser hands over the
        # request-target as a bytearray and a header name or value as bytes.
        return 414 if isinstance(exc.args[0], bytearray) else 431
    if "Too many headers" in exc.message:
        return 431
    return 400


# -- file descriptors: the client connection cap ---------------------------------------------

# The admin listener's own connection cap (health checks and scrapes need few), and its
# listen backlog. Both come out of the descriptor reserve, so the admin port always answers.
ADMIN_MAX_CONNECTIONS = 32
ADMIN_BACKLOG = 16
# Descriptors of the process itself: stdio, both listening sockets, the event loop's epoll,
# self-pipe and signal fds, log handlers, resolver sockets, /proc reads, imports.
_PROCESS_FDS = 64
# SQLite: the reader and writer connections with their -wal/-shm/journal files, a file being
# moved aside after corruption.
_SQLITE_FDS = 8
# Redis beyond its pool: the pipelined reader, the pub/sub connection, sentinel/cluster lookups.
_REDIS_EXTRA_FDS = 10
_MIN_CLIENT_CONNECTIONS = 16
# At the cap with nothing idle, new connections are refused without looking again this long.
_RESCAN_INTERVAL = 0.05

_REFUSED_BODY = b"503 too many client connections: retry later\n"
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (len(_REFUSED_BODY), _REFUSED_BODY))


def listen_backlog(nofile: int) -> int:
    """The proxy port's listen backlog for a descriptor limit.

    The event loop accepts up to this many connections at one wake-up before any is admitted
    (each a descriptor), so it is part of the reserve: small limits get a small backlog.
    """
    return max(16, min(1024, nofile // 16))


def client_connection_cap(settings: Settings, nofile: int | None = None) -> int:
    """``TIERPROXY_MAX_CLIENT_CONNECTIONS``, or what ``nofile`` (default: the soft
    RLIMIT_NOFILE) leaves after the reserve; ValueError (one line) if the limit cannot hold it.
    """
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY:  # (-1) some systems allow an unlimited soft limit
        nofile = 1 << 20
    reserve = (
        settings.origin_max_connections
        + (settings.redis_max_connections + _REDIS_EXTRA_FDS if settings.redis_url else 0)
        + (_SQLITE_FDS if settings.sqlite_path else 0)
        + ADMIN_MAX_CONNECTIONS + ADMIN_BACKLOG
        + _PROCESS_FDS
        + listen_backlog(nofile)
    )
    available = nofile - reserve
    what = (f"RLIMIT_NOFILE={nofile} leaves {available} descriptors for client connections "
            f"after {reserve} reserved (TIERPROXY_ORIGIN_MAX_CONNECTIONS, "
            "TIERPROXY_REDIS_MAX_CONNECTIONS, SQLite, the admin port, the process)")
    configured = settings.max_client_connections
    if configured is not None:
        if configured > available:
            raise ValueError(f"TIERPROXY_MAX_CLIENT_CONNECTIONS={configured} is more than "
                             f"{what}: lower it, or raise the hard descriptor limit")
        return configured
    if available < _MIN_CLIENT_CONNECTIONS:
        raise ValueError(f"{what}: raise the hard descriptor limit (ulimit -Hn), or lower "
                         "the pools")
    return available


class ConnectionCap:
    """At most ``limit`` open connections on one listener; oldest idle ones closed first.

    Checked as each connection is made: over the limit, the connections idle longest
    (waiting for their next request, nothing in progress) are closed until the count is a
    sixteenth under the limit, so the scan runs at most once per limit/16 new connections.
    With nothing idle to close, the new connection gets a 503 and is closed (RFC 9110
    §15.6.4, Retry-After). Each episode at the cap is logged once (``log``); it ends when
    the count falls to half the limit. ``shed(action)`` counts each closed or refused
    connection, ``episode()`` each episode.
    """

    __slots__ = ("_at_cap", "_episode", "_fruitless_scan_at", "_low_water", "_name", "_open",
                 "_shed", "limit")

    def __init__(
        self,
        limit: int,
        name: str,
        *,
        shed: Callable[[str], None] | None = None,
        episode: Callable[[], None] | None = None,
    ) -> None:
        self.limit = limit
        self._name = name
        self._low_water = limit - max(1, limit // 16)
        self._open: dict[RequestHandler, asyncio.Transport] = {}
        self._at_cap = False
        self._fruitless_scan_at = -1.0  # loop time of the last scan that found nothing idle
        self._shed = shed
        self._episode = episode

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        self._open[handler] = transport
        if len(self._open) <= self.limit:
            return
        if not self._at_cap:
            self._at_cap = True
            log.warning("%s: client connections at the cap (%d): closing the oldest idle "
                        "keep-alive connections first, refusing new ones with 503 while "
                        "none is idle; counted in tierproxy_client_connections_shed_total "
                        "(one line per episode; TIERPROXY_MAX_CLIENT_CONNECTIONS, "
                        "RLIMIT_NOFILE)", self._name, self.limit)
            if self._episode is not None:
                self._episode()
        now = asyncio.get_running_loop().time()
        idle: list[tuple[float, int, RequestHandler]] = []
        if now - self._fruitless_scan_at >= _RESCAN_INTERVAL:
            # O(open connections): a flood of new ones while none is idle must not pay it
            # per connection, so after a scan that found nothing, the next waits a little.
            idle = sorted(
                (since, id(h), h) for h in self._open
                if h is not handler and (since := _idle_since(h)) is not None
            )
            if not idle:
                self._fruitless_scan_at = now
        excess = len(self._open) - self._low_water
        for _, _, oldest in idle[:excess]:
            # Gone from the count now: its descriptor is released as the loop closes it.
            del self._open[oldest]
            oldest.force_close()
            if self._shed is not None:
                self._shed("idle-closed")
        if len(self._open) > self.limit:
            del self._open[handler]
            if not transport.is_closing():
                transport.write(_REFUSED)
                transport.close()
            if self._shed is not None:
                self._shed("refused")

    def release(self, handler: RequestHandler) -> None:
        self._open.pop(handler, None)
        if self._at_cap and len(self._open) <= self.limit // 2:
            self._at_cap = False  # the episode is over; the next one is logged again


def _idle_since(handler: RequestHandler) -> float | None:
    """When ``handler`` became idle (a keep-alive deadline orders them), or None if busy.

    Idle as aiohttp's keep-alive check has it: start() waits for a request (``_waiter``),
    and nothing is queued or in the hit path's hands.
    """
    waiter = handler._waiter
    if (waiter is None or waiter.done() or handler._messages or handler._force_close
            or handler.writing_paused):
        # (writing paused: the last response is still being sent - closing it now would only
        # wait for the client, outside the cap's count; the send timeout deals with it)
        return None
    if isinstance(handler, ProxyRequestHandler) and handler._lookup is not None:
        return None
    return handler._next_keepalive_close_time


class _CappedServer(web.Server):
    """aiohttp's low-level server whose open connections a :class:`ConnectionCap` bounds."""

    def __init__(self, handler: Any, *, cap: ConnectionCap | None, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._cap = cap

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if self._cap is not None:
            self._cap.admit(handler, transport)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        if self._cap is not None:
            self._cap.release(handler)


class CappedRunner(web.AppRunner):
    """``web.AppRunner`` whose connections a :class:`ConnectionCap` bounds (the admin port)."""

    __slots__ = ("_cap",)

    def __init__(self, app: web.Application, *, cap: ConnectionCap, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._cap = cap

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        handler_kwargs = getattr(server, "_kwargs", None)
        if not isinstance(handler_kwargs, dict) or missing_internals():
            return server  # tierproxy serve refused to start already, unless allowed
        return _CappedServer(
            server.request_handler, cap=self._cap, request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation, loop=asyncio.get_running_loop(),
            **handler_kwargs,
        )


class ProxyRequestHandler(RequestHandler):
    """One client connection. See the module docstring for what it adds to aiohttp's."""

    __slots__ = ("_handover", "_head_timeout", "_head_timer", "_hits", "_lookup", "_remote",
                 "_send_timeout", "_send_timer", "_writable")

    def __init__(
        self,
        manager: web.Server,
        *,
        head_timeout: float,
        send_timeout: float,
        hits: HitAnswerer | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timeout = send_timeout
        self._send_timer: asyncio.TimerHandle | None = None
        self._hits = hits
        self._remote: str | None = None
        # The hit path's work in flight - a lookup, or the rest of a large body waiting for
        # the client to drain - one at a time: responses keep the requests' order. And what
        # a lookup left for the full path.
        self._lookup: asyncio.Task[None] | None = None
        self._handover: tuple[RawRequestMessage, object] | None = None
        self._writable: asyncio.Future[None] | None = None  # set when writing resumes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # A client that connects and sends nothing is cut off like one that trickles a head.
        self._start_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        if self._lookup is not None:
            self._lookup.cancel()  # its client is gone
            self._lookup = None
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().connection_lost(exc)

    # asyncio flow control: the transport calls these when its write buffer goes over its
    # high-water mark (the client is not reading fast enough) and back under the low one.
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self._loop.call_later(
                self._send_timeout, self._send_timed_out, self.transport
            )

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        writable = self._writable
        if writable is not None:
            self._writable = None
            if not writable.done():
                writable.set_result(None)

    def _send_timed_out(self, transport: asyncio.Transport | None) -> None:
        self._send_timer = None
        if transport is None or (self.transport is transport and not self.writing_paused):
            return
        # Still stalled - or closed by force_close() meanwhile (which forgets the transport)
        # while the close waits for the client to read what is buffered: abort it either way.
        log.debug("closing a connection from %s: it accepted no response bytes for %.1fs",
                  self.peername, self._send_timeout)
        # The writer blocked on this client fails; whatever it streamed from the origin is
        # released with it.
        transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self._waiter is None and self._request_count:
            # A request is being handled: these bytes are its body (or pipelined requests).
            super().data_received(data)
            self._fail_body_read_on_framing_error()
            return
        # Between requests (or before the first): these bytes belong to a request head.
        before = self._request_count
        waiter = self._waiter
        if self._hits is not None and waiter is not None and (
            not self._messages or self._lookup is not None
        ):
            # start() waits for the next request, and no request is queued (or the hit path
            # is looking one up): parse without waking start(), answer what the hit path can,
            # and wake start() only for what is left once no lookup is in flight.
            self._waiter = None
            try:
                super().data_received(data)
            finally:
                self._waiter = waiter
            if self._lookup is None and self._messages:
                self._answer_hits(self._hits)
                self._wake_for_full_path()
        else:
            super().data_received(data)
        if self._request_count != before:
            self._stop_head_timer()  # a head arrived (or failed to parse: aiohttp answers 400)
        elif self._head_timer is None and data and self._lookup is None:
            # (aiohttp feeds b"" to resume parsing; while a lookup is in flight the bytes are
            # pipelined behind a request in progress, as in the first branch: idle-bounded)
            self._start_head_timer()

    def _answer_hits(self, hits: HitAnswerer) -> None:
        """Answer queued requests in order while the hit path can; stop at the first it can't.

        Runs only while start() is idle, so no response of the full path is in flight and the
        order of responses on the connection is the order of the requests.
        """
        transport = self.transport
        messages = self._messages
        while messages:
            if (
                transport is None
                or transport.is_closing()
                or self.writing_paused  # the client is not reading: start() waits for it
                or self._buffer_paused
                or self._force_close
                or self._close
            ):
                return
            message, payload = messages[0]
            if payload is not EMPTY_PAYLOAD or not isinstance(message, RawRequestMessage):
                return
            try:
                answer = hits.answer(message, self.remote)
            except Exception:  # the full path answers it, and reports what is wrong
                log.exception("hit path failed; the request takes the full path")
                return
            if answer is None:
                return
            messages.popleft()
            if not isinstance(answer, tuple):
                # A lookup to await. The message is out of the queue meanwhile, so start()
                # is not woken for what follows it (and the idle timer leaves the connection
                # alone: _process_keepalive).
                self._lookup = self._loop.create_task(self._finish_lookup(message, payload, answer))
                return
            rest = self._write_answer(answer)
            if rest is not None:
                # The client is not taking the body as fast: the rest goes as it drains, and
                # what follows waits for it, as behind a lookup.
                self._lookup = self._loop.create_task(self._finish_body(rest))
                return

    async def _finish_lookup(
        self,
        message: RawRequestMessage,
        payload: Any,
        pending: Awaitable[tuple[bytes, bytes] | object],
    ) -> None:
        try:
            outcome = await pending
        except asyncio.CancelledError:
            raise  # the connection is gone (connection_lost cancels this task)
        except Exception:
            log.exception("hit path lookup failed; the request takes the full path")
            outcome = None
        transport = self.transport
        if isinstance(outcome, tuple):
            if transport is not None and not transport.is_closing():
                rest = self._write_answer(outcome)
                if rest is not None:
                    await self._send_rest(rest)  # still this connection's work in flight
        else:
            # Back to the head of the queue for start(), with what the lookup found.
            self._handover = (message, outcome) if outcome is not None else None
            self._messages.appendleft((message, payload))
        self._lookup = None
        if self._hits is not None and self._messages and self._messages[0][0] is not message:
            self._answer_hits(self._hits)
        self._after_hit_path_work()

    async def _finish_body(self, rest: memoryview) -> None:
        await self._send_rest(rest)
        self._lookup = None
        if self._hits is not None and self._messages:
            self._answer_hits(self._hits)
        self._after_hit_path_work()

    def _after_hit_path_work(self) -> None:
        self._wake_for_full_path()
        if self._close and self._lookup is None and not self._messages:
            super().close()  # closing was asked for while the work ran (see close())

    def _write_answer(self, answer: tuple[bytes, bytes]) -> memoryview | None:
        """Write a hit-path answer; return what of its body waits for the client to drain."""
        if self._parser is not None:
            self._parser.message_consumed()
        self._manager.requests_count += 1  # type: ignore[union-attr]
        head, body = answer
        transport = self.transport
        assert transport is not None
        if len(body) <= _JOIN_BODY_BYTES:
            transport.write(head + body)
        else:
            transport.write(head + body[:BODY_SLICE_BYTES])
            view = memoryview(body)
            size = len(view)
            offset = BODY_SLICE_BYTES
            # Bounded by the body's slices; stops once the transport is over its high-water
            # mark (it calls pause_writing from inside write) or closing.
            while offset < size and not self.writing_paused and not transport.is_closing():
                transport.write(view[offset:offset + BODY_SLICE_BYTES])
                offset += BODY_SLICE_BYTES
            if offset < size:
                return view[offset:]
        self._response_sent()
        return None

    async def _send_rest(self, rest: memoryview) -> None:
        """The rest of a hit's body, a slice at a time as the client drains it.

        The send timeout still applies: a client taking nothing for TIERPROXY_SEND_TIMEOUT
        while writing is paused is aborted (_send_timed_out), which cancels this task.
        """
        loop = self._loop
        for offset in range(0, len(rest), BODY_SLICE_BYTES):
            if self.writing_paused:
                writable = self._writable
                if writable is None:
                    writable = self._writable = loop.create_future()
                await writable
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            transport.write(rest[offset:offset + BODY_SLICE_BYTES])
        self._response_sent()

    def _response_sent(self) -> None:
        # What start() does after a response: keep-alive from now on, idle-bounded.
        self._keepalive = True
        close_time = self._loop.time() + self._keepalive_timeout
        self._next_keepalive_close_time = close_time
        if self._keepalive_handle is None:
            self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)

    def _wake_for_full_path(self) -> None:
        """Let start() take the queued requests, unless a hit-path lookup still holds one."""
        waiter = self._waiter
        if self._lookup is None and self._messages and waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take_handover(self, headers: object) -> object | None:
        """What the hit path's lookup left for the request whose parsed headers are
        ``headers`` (``request.headers``: the parser's object for that one message), if any
        (:class:`tierproxy.hits.Handover`)."""
        handover = self._handover
        if handover is None or handover[0].headers is not headers:
            return None
        self._handover = None
        return handover[1]

    def _process_keepalive(self) -> None:
        if self._lookup is not None:
            # Not idle: a request is being looked up. Check again a keep-alive period later
            # (answering it sets the next deadline, as start() does after a response).
            close_time = self._loop.time() + self._keepalive_timeout
            self._next_keepalive_close_time = close_time
            self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)
            return
        super()._process_keepalive()

    def close(self) -> None:
        # aiohttp closes a connection whose start() waits for a request at once; one whose
        # request the hit path is looking up is not idle: it closes when the lookup ends.
        if self._lookup is not None:
            self._close = True
            return
        super().close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        # A lookup in flight is a request in progress: let it finish (answered, or handed to
        # start(), which aiohttp's shutdown then waits for) before the connection is closed.
        lookup = self._lookup
        if lookup is not None:
            await asyncio.wait({lookup}, timeout=timeout)
        await super().shutdown(timeout)

    @property
    def remote(self) -> str | None:
        """The client's address, as ``request.remote`` gives it."""
        if self._remote is None:
            peername = self.peername
            if isinstance(peername, (list, tuple)):
                self._remote = str(peername[0])
            elif peername is not None:
                self._remote = str(peername)
        return self._remote

    def _fail_body_read_on_framing_error(self) -> None:
        request = self._current_request
        if request is None or not self._messages:
            return
        message = self._messages[-1][0]
        if isinstance(message, _ErrInfo) and not request.content.is_eof():
            # The parser failed inside this request's body; its reader would wait forever.
            request.content.set_exception(message.exc)

    def _start_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(
            self._head_timeout, self._head_timed_out, self._request_count
        )

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self, request_count: int) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or self._request_count != request_count:
            return  # gone, or a head arrived after all
        log.debug("closing a connection from %s: no complete request head within %.1fs",
                  self.peername, self._head_timeout)
        # No response is in flight (no request since the timer started), so a minimal 408
        # can go straight to the transport before it closes (RFC 9110 §15.5.9).
        body = b"408 request head not received in time\n"
        transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, ConnectionResetError) and request.writer.output_size > 0:
            # The client went away (or was cut off by the send timeout) mid-response: routine,
            # not an error worth a traceback per connection.
            log.debug("client %s gone mid-response: %s", request.remote, exc)
            raise ConnectionError("client connection lost mid-response")
        if status != 400 or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        # A malformed request is the client's error, not ours: no traceback in the log.
        status = _client_error_status(exc, self.max_line_size, self.max_field_size)
        reason = exc.message.split("\n", 1)[0].rstrip(":")[:200] if status == 400 else ""
        log.debug("refused a malformed request from %s with %d: %s",
                  request.remote, status, exc.message[:300])
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot answer the parse error")
        phrase = HTTPStatus(status).phrase
        text = f"{status} {phrase}: {reason}\n" if reason else f"{status} {phrase}\n"
        response = web.Response(status=status, text=text)
        response.force_close()  # the framing of whatever follows is unknown
        return response


class _ProxyServer(_CappedServer):
    """aiohttp's low-level server, making :class:`ProxyRequestHandler` connections."""

    def __init__(
        self,
        handler: Any,
        *,
        request_factory: Any,
        handler_cancellation: bool,
        loop: asyncio.AbstractEventLoop,
        head_timeout: float,
        send_timeout: float,
        hits: HitAnswerer | None,
        cap: ConnectionCap | None,
        **handler_kwargs: Any,
    ) -> None:
        super().__init__(handler, cap=cap, request_factory=request_factory,
                         handler_cancellation=handler_cancellation, loop=loop, **handler_kwargs)
        self._proxy_loop = loop
        self._proxy_handler_kwargs = handler_kwargs
        self._head_timeout = head_timeout
        self._send_timeout = send_timeout
        self._hits = hits

    def __call__(self) -> RequestHandler:
        return ProxyRequestHandler(self, loop=self._proxy_loop, head_timeout=self._head_timeout,
                                   send_timeout=self._send_timeout, hits=self._hits,
                                   **self._proxy_handler_kwargs)


class ProxyRunner(web.AppRunner):
    """``web.AppRunner`` whose connections are :class:`ProxyRequestHandler` s.

    ``header_timeout`` and ``send_timeout`` are ``TIERPROXY_HEADER_TIMEOUT`` and
    ``TIERPROXY_SEND_TIMEOUT``; ``cap`` bounds the open connections
    (``TIERPROXY_MAX_CLIENT_CONNECTIONS``); every other limit comes from the app's
    ``handler_args`` (:func:`handler_args`). ``hits``, when given, answers what it can of each request on the
    connection itself (:mod:`tierproxy.hits`); the app handles the rest.
    """

    __slots__ = ("_allow_unhardened", "_cap", "_header_timeout", "_hits", "_send_timeout")

    def __init__(
        self,
        app: web.Application,
        *,
        header_timeout: float,
        send_timeout: float,
        hits: HitAnswerer | None = None,
        allow_unhardened: bool = False,
        cap: ConnectionCap | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout
        self._send_timeout = send_timeout
        self._hits = hits
        self._allow_unhardened = allow_unhardened
        self._cap = cap

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # runs on_startup, merges the app's handler_args
        handler_kwargs = getattr(server, "_kwargs", None)  # the RequestHandler arguments
        missing = missing_internals()
        if not isinstance(handler_kwargs, dict):
            missing.append("Server._kwargs")
        if missing:
            message = unhardened_message(missing)
            if not self._allow_unhardened:
                raise UnhardenedListener(message)
            # Still safe from smuggling (aiohttp's limits and framing checks apply), but a
            # client may hold a connection as long as it likes: said at every start.
            log.warning("TIERPROXY_ALLOW_UNHARDENED=on: serving unhardened: %s", message)
            return server
        assert isinstance(handler_kwargs, dict)
        return _ProxyServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=asyncio.get_running_loop(),
            head_timeout=self._header_timeout,
            send_timeout=self._send_timeout,
            hits=self._hits,
            cap=self._cap,
            **handler_kwargs,
        )
