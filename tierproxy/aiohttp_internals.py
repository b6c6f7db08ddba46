"""Every piece of tierproxy that touches aiohttp's private names: nothing else does.

aiohttp 3.14 lacks a few things a proxy facing untrusted clients and a possibly misbehaving
origin needs, and offers no public hook for them. What is here, and what it adds:

**Server side** - :class:`ProxyRequestHandler`, aiohttp's connection handler (``RequestHandler``)
with:

* A request-head timeout (slowloris): a head must be complete ``TIERPROXY_HEADER_TIMEOUT``
  seconds after its first byte (for a connection's first request: after the connection
  opened), else 408 and close. aiohttp's only bound on a head is its keep-alive timer (armed
  when the connection opens and after each response; when it fires while ``start()`` waits for
  a request, a head still arriving included, the connection is closed), and it falls short:
  the connection is dropped without an answer (no 408, RFC 9110 §15.5.9); the one setting,
  ``keepalive_timeout``, is also the idle keep-alive time (``TIERPROXY_KEEPALIVE_TIMEOUT``,
  75 s by default), so a head could not be bounded tighter than idle connections are kept;
  and it is not restarted for a request head (a head gets whatever is left of the idle
  period that began when the connection opened or the last response ended, not a bound from
  its own first byte). That timer still runs: a head begun just before the idle deadline is
  cut there, silently, as aiohttp does (the idle-close race of RFC 9112 §9.5).
* The right status for over-long input: 414 for the request-target, 431 for a header line or
  too many lines (aiohttp answers 400 to all three), logged at debug (a client cannot flood
  the log with tracebacks).
* A framing error in a request body that arrives after the handler began reading it fails the
  read at once (aiohttp drops the body stream without telling its reader, which then waits
  until the client goes away); the proxy answers 400.
* A send timeout: a client that accepts no bytes for ``TIERPROXY_SEND_TIMEOUT`` while its
  response waits to be written is disconnected (else a client that never reads a streamed
  response holds a pooled origin connection as long as it likes).
* The hit path (:mod:`tierproxy.hits`): plain GETs answered from the connection handler with
  stored bytes, no ``Request``, task or ``Response`` (why tierproxy's L1 hits beat a bare
  aiohttp handler); a large body as slices of the stored bytes while the transport is under
  its high-water mark, the rest as the client drains.
* Bounded file descriptors (:class:`ConnectionCap`, through :class:`CappedServer`): the oldest
  idle keep-alive connections are closed first at the cap; with none idle a new connection
  gets 503.

A response whose stored header bytes are not UTF-8 is written byte-exact
(:class:`ExactHeadResponse` and friends: aiohttp's header writer would re-encode them).

**Client side** - :class:`_OriginConnector` / :class:`_OriginProtocol` keep pooled origin
connections clean (bytes no request asked for, a close-delimited body cut by a reset) and
bound the wait for a free pooled connection on its own clock (:class:`_FetchClock`, used by
:meth:`tierproxy.origin.OriginClient.fetch`), which also records whether any byte of an
answer arrived (a failed fetch is retried only if none did). aiohttp's own resend of a
failed request is turned off (:func:`without_builtin_retry`).

:data:`PRIVATE_NAMES` is the exact list of private names read, written, overridden, called or
imported here, each with why no public mechanism does the job. :func:`missing_internals` and
:func:`connector_internals_available` check that list against the running aiohttp at start-up
(``tierproxy serve`` refuses to start without them; for the listener's connection handler
only, ``TIERPROXY_ALLOW_UNHARDENED=on`` lets it run on aiohttp's own, :func:`unhardened_message`
says what is lost then), and tests/unit/test_aiohttp_internals.py checks it on every aiohttp
version CI runs, with the signature of every method overridden or called (:data:`SIGNATURES`).

Public mechanisms used instead of internals: the limits are aiohttp's own ``handler_args``
(``max_line_size``, ``max_field_size``, ``max_headers``, ``keepalive_timeout``,
``auto_decompress``: :func:`tierproxy.listener.handler_args`); the connection handler is built
with those public ``RequestHandler`` keyword arguments (not by reading ``Server._kwargs``), with
``debug=False`` always (aiohttp passes ``debug`` from the event loop's debug mode, and in it a
handler exception's 500 carries the traceback to the client: a proxy facing untrusted clients
never sends one); ``web.Server.requests_count`` (public; aiohttp's gunicorn worker's
``max_requests`` reads it) counts hit-path answers too; the hit path's hand-over reaches the
full path through a ``web.Server`` ``request_factory`` (below); the loop and keep-alive
timeout the handler needs are the ones it was given, not read back.

Public mechanisms considered and why they fall short (per name: :data:`PRIVATE_NAMES`):
``keepalive_timeout`` closes a connection whose head is still arriving only silently and on
the idle keep-alive deadline (above); ``read_bufsize`` bounds how much is buffered, not how
long it takes; ``max_line_size``/``max_field_size``/``max_headers`` are applied (aiohttp answers 400 to all
three, :meth:`ProxyRequestHandler.handle_error` turns them into 414/431); ``handler_args`` and
``web.AppRunner``'s keyword arguments only reach ``RequestHandler``'s constructor, never choose
its class; the client's ``TraceConfig`` signals are awaited inside the connector (a window
between the reuse check and the hand-out) and cannot refuse a connection or bound a wait;
``limit``/``limit_per_host`` bound the pool, not the wait for it; ``ClientTimeout(connect=)``
bounds the wait together with the TCP connect and fails as a slow origin would. The client
connection cap needs the server's ``connection_made``/``connection_lost`` (public names,
overridden: :data:`OVERRIDDEN_PUBLIC`).

**The hand-over** (a request the hit path looked up but cannot answer): the connection handler
keeps the lookup's outcome together with the parsed message it belongs to; the server's
``request_factory`` - a public ``web.Server`` argument, called by aiohttp with that very message
object when it builds the ``Request`` - takes it (matched on the message's identity) and stores
it on the request under the hit path's typed ``web.RequestKey`` (:attr:`HitAnswerer.handover_key`).
The handler reads ``request.get(key)``: typed, explicit, no attribute probing on the protocol,
and no guess from header objects. Chosen over a typed attribute on the protocol read by the
handler: that would still need the handler to know the connection's class and to match the
request to the stored hand-over itself, while the factory is handed the exact message.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import importlib
import inspect
import logging
import select
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, cast

import aiohttp
import aiohttp.connector
import aiohttp.helpers
from aiohttp import web
from aiohttp.client_proto import ResponseHandler  # PRIVATE_NAMES (not exported)
from aiohttp.helpers import rfc822_formatted_time, set_exception  # PRIVATE_NAMES
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong  # LineTooLong: PRIVATE_NAMES
from aiohttp.http_parser import HttpRequestParser, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler

from .entry import FORBIDDEN_IN_HEADER, wire

try:  # a module-private class this module reads; see PRIVATE_NAMES
    from aiohttp.web_protocol import _ErrInfo
except ImportError:  # pragma: no cover - another aiohttp version
    _ErrInfo = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from aiohttp.abc import AbstractStreamWriter
    from aiohttp.streams import StreamReader
    from aiohttp.web_request import BaseRequest

__all__ = [
    "BODY_SLICE_BYTES",
    "PRIVATE_NAMES",
    "CappedRunner",
    "ConnectionCap",
    "ConnectorUnavailable",
    "ExactHead",
    "ExactHeadResponse",
    "ExactHeadStreamResponse",
    "HitAnswerer",
    "OriginBusy",
    "Private",
    "ProxyRequestHandler",
    "ProxyRunner",
    "UnhardenedListener",
    "connector_internals_available",
    "internals_available",
    "missing_internals",
    "missing_serving_internals",
    "rfc822_formatted_time",
    "unhardened_message",
    "without_builtin_retry",
]

log = logging.getLogger("tierproxy.listener")
origin_log = logging.getLogger("tierproxy.origin")

Kind = Literal["read", "write", "override", "call", "import", "layout"]
#: ``listener``: the proxy's connection handler (``TIERPROXY_ALLOW_UNHARDENED=on`` runs without);
#: ``serving``: every response and runner (no opt-out); ``origin``: the origin connections (no
#: opt-out).
Side = Literal["listener", "serving", "origin"]


@dataclass(frozen=True, slots=True)
class Private:
    """One private aiohttp name this module depends on.

    ``owner``: the class (or module) holding it; ``kind``: what is done with it (``read``,
    ``write`` - read too -, ``override``: a method redefined in a subclass, ``call``,
    ``layout``: the undocumented layout of a value aiohttp hands over,
    ``import``: a name the module does not export - not in its ``__all__`` - imported, or
    read as ``module.name``); ``side``: ``listener`` (the proxy's connection handler;
    ``TIERPROXY_ALLOW_UNHARDENED=on`` runs without), ``serving`` (every response and runner; no
    opt-out) or ``origin`` (the origin connections; no opt-out); ``attribute``: an instance
    attribute (a ``__slots__`` entry, or set by ``__init__``) rather than a class attribute;
    ``why``: why no public mechanism does it.
    """

    owner: str
    name: str
    kind: Kind
    side: Side
    attribute: bool
    why: str

    @property
    def label(self) -> str:
        if self.kind == "import":
            return f"aiohttp.{self.owner}.{self.name}"
        return f"{self.owner}.{self.name}" + ("" if self.attribute else "()")


_RH = "RequestHandler"
_NOT_PUBLIC_STATE = (
    "RequestHandler exposes no public view of its request queue or keep-alive "
    "state; handler_args only sets limits, and keepalive_timeout closes a connection "
    "whose head trickles only silently, at the idle deadline, and never one whose "
    "response is not being read"
)

PRIVATE_NAMES: tuple[Private, ...] = (
    # -- the connection handler (server side) --------------------------------------------
    Private(
        _RH,
        "_waiter",
        "write",
        "listener",
        True,
        "start()'s wait for the next request: cleared while the hit path parses so start() "
        "is not woken for a request the hit path answers, set to wake it for the rest; "
        "also 'idle' for the connection cap. " + _NOT_PUBLIC_STATE,
    ),
    Private(
        _RH,
        "_messages",
        "write",
        "listener",
        True,
        "the parsed-request queue start() takes from: the hit path pops what it answers "
        "and puts a hand-over back at the head, in order. No public queue or hook exists "
        "between the parser and start()",
    ),
    Private(
        _RH,
        "_request_count",
        "read",
        "listener",
        True,
        "whether data_received parsed a new head (stops the head timer) or body bytes; "
        "no public counter or parser callback exists",
    ),
    Private(
        _RH,
        "_request_in_progress",
        "read",
        "listener",
        True,
        "whether the full path's request handler (its response writing included) is still "
        "running once start() has taken a request: a request arriving after it ended, before "
        "start() resumed, is between requests and the hit path's to answer. No public flag or "
        "hook tells when a response is done (on_response_prepare fires before the body)",
    ),
    Private(
        _RH,
        "_current_request",
        "read",
        "listener",
        True,
        "the request whose body a late framing error must fail; aiohttp drops the body "
        "stream without telling its reader and offers no error hook",
    ),
    Private(
        _RH,
        "_parser",
        "read",
        "listener",
        True,
        "message_consumed() after the hit path takes a message, as start() does: else the "
        "parser's pipelining window stays full (no public way to consume a message)",
    ),
    Private(
        _RH,
        "_buffer_paused",
        "read",
        "listener",
        True,
        "reading paused for a full pipelining queue: the hit path leaves such a queue to "
        "start(), which resumes reading as it drains (no public flag; absent before "
        "3.14.4)",
    ),
    Private(
        _RH,
        "_max_msg_queue_size",
        "read",
        "listener",
        True,
        "how many parsed requests may wait before reading pauses: requests the hit path "
        "holds back from start() count against it as aiohttp's own queue does (no public "
        "limit is exposed; absent before 3.14.4)",
    ),
    Private(
        _RH,
        "_pause_reading_for_buffer",
        "call",
        "listener",
        False,
        "pause reading as aiohttp does for a full pipelining queue, so start() resumes it "
        "as it drains the queue (_buffer_paused set with it); there is no public pause that "
        "aiohttp's own resume would undo (absent before 3.14.4)",
    ),
    Private(
        _RH,
        "_keepalive",
        "write",
        "listener",
        True,
        "after a hit-path response the connection is keep-alive, as start() sets it after "
        "a response; no public setter",
    ),
    Private(
        _RH,
        "_keepalive_handle",
        "write",
        "listener",
        True,
        "the idle timer start() arms after a response: armed the same way after a "
        "hit-path response (keepalive_timeout is honoured through it)",
    ),
    Private(
        _RH,
        "_next_keepalive_close_time",
        "write",
        "listener",
        True,
        "the idle deadline start() sets after a response (and what the connection cap "
        "orders idle connections by); no public reading or setting",
    ),
    Private(
        _RH,
        "_force_close",
        "read",
        "listener",
        True,
        "a connection being closed takes no hit-path answer and is not 'idle' for the "
        "cap; no public flag",
    ),
    Private(
        _RH,
        "_task_handler",
        "read",
        "listener",
        True,
        "start()'s task, to learn when it ends: it closes the transport itself after a "
        "response that closes the connection, and that close must be bounded like the "
        "others (no public hook or done signal for the connection's end of serving)",
    ),
    Private(
        _RH,
        "_close",
        "write",
        "listener",
        True,
        "close() asked while a hit-path lookup is in flight: recorded, honoured when it "
        "ends (aiohttp's close() would drop a request it does not know is in progress)",
    ),
    Private(
        _RH,
        "_process_keepalive",
        "override",
        "listener",
        False,
        "the idle check must not close a connection whose request the hit path is "
        "looking up (aiohttp thinks it idle); no public hook or predicate",
    ),
    Private(
        "web_protocol",
        "_ErrInfo",
        "import",
        "listener",
        False,
        "how a parse error is queued (its status and exception): needed to fail a body "
        "read on a late framing error; not exported",
    ),
    Private(
        "_ErrInfo",
        "exc",
        "read",
        "listener",
        True,
        "the parse error a queued _ErrInfo carries: what the body read that a late framing "
        "error ends is failed with (no public error hook)",
    ),
    Private(
        "http_exceptions",
        "LineTooLong",
        "import",
        "listener",
        False,
        "the parse error for an over-long request-target or header line, told apart from "
        "other 400s to answer 414/431; http_exceptions exports only HttpProcessingError",
    ),
    Private(
        "LineTooLong",
        "args",
        "layout",
        "listener",
        True,
        "(line, limit, actual_size): args[1] is the limit that was exceeded (max_line_size: "
        "the request-target, 414; max_field_size: a header, 431); with both limits equal, "
        "aiohttp's C parser hands over the request-target as a bytearray and a header as "
        "bytes. No attribute or subclass tells the two apart",
    ),
    Private(
        "StreamResponse",
        "_write_headers",
        "override",
        "serving",
        False,
        "writes the status line and headers: overridden only for a head holding non-UTF-8 "
        "bytes, which aiohttp's writer would re-encode (there is no raw-headers option)",
    ),
    Private(
        "AppRunner",
        "_make_server",
        "override",
        "serving",
        False,
        "where AppRunner starts the app and builds its web.Server; AppRunner takes no "
        "server class or protocol factory, and the proxy needs its own web.Server (the "
        "connection cap, ProxyRequestHandler connections, the hand-over request_factory). "
        "The server is then built from public arguments only",
    ),
    # -- the origin connections (client side) -------------------------------------------
    Private(
        "TCPConnector",
        "_factory",
        "write",
        "origin",
        True,
        "the protocol factory of new connections: the only way to make them "
        "_OriginProtocol; TCPConnector takes no protocol class",
    ),
    Private(
        "BaseConnector",
        "_get",
        "override",
        "origin",
        False,
        "takes a pooled connection after its is_connected() check: marks it busy with no "
        "await in between. A TraceConfig on_connection_reuseconn signal is awaited at "
        "that point (a window for stray bytes) and cannot refuse the connection",
    ),
    Private(
        "BaseConnector",
        "_release",
        "override",
        "origin",
        False,
        "a connection returned to the pool becomes idle (stray bytes on it then discard "
        "it); no public signal for a release",
    ),
    Private(
        "BaseConnector",
        "_wait_for_available_connection",
        "override",
        "origin",
        False,
        "the wait for a free pooled connection: stops the origin budget's clock and bounds "
        "the wait on its own (TIERPROXY_ORIGIN_QUEUE_TIMEOUT, OriginBusy). "
        "ClientTimeout(connect=) bounds the wait and the TCP connect together and raises "
        "the same error as a slow origin; the queued_start/end trace signals can neither "
        "bound nor fail the wait",
    ),
    Private(
        "ResponseHandler",
        "_buffer",
        "read",
        "origin",
        True,
        "parsed responses no request took (a stray response in the same read as the last "
        "one's end): checked before reuse; no public view",
    ),
    Private(
        "ResponseHandler",
        "_payload",
        "read",
        "origin",
        True,
        "the body being read when the connection is lost: failed on a reset (aiohttp "
        "completes a close-delimited body on any loss); no public hook",
    ),
    Private(
        "client_proto",
        "ResponseHandler",
        "import",
        "origin",
        False,
        "aiohttp's client connection protocol, subclassed by _OriginProtocol (the only "
        "place bytes on a pooled connection are seen); not exported",
    ),
    Private(
        "helpers",
        "set_exception",
        "import",
        "origin",
        False,
        "fails a body being read with the connection's error as its cause, as aiohttp's "
        "own protocol does; helpers exports no such function",
    ),
    Private(
        "connector",
        "Connection",
        "import",
        "origin",
        False,
        "the type BaseConnector._get returns (read as aiohttp.connector.Connection in the "
        "override's annotation); not in connector's __all__ nor aiohttp's",
    ),
    # -- every response (server side; no opt-out) ----------------------------------------
    Private(
        "helpers",
        "rfc822_formatted_time",
        "import",
        "serving",
        False,
        "the Date field aiohttp writes, cached per second (tierproxy.response adds it to a "
        "hit's head as aiohttp would); helpers does not export it, and formatting a date per "
        "hit would cost the hit path",
    ),
    Private(
        "ClientSession",
        "_retry_connection",
        "write",
        "origin",
        True,
        "turned off: aiohttp resends an 'idempotent' request (PUT and DELETE included) "
        "once, at once, when its connection failed - even after bytes of a response head "
        "arrived - with no pause, deadline or count. tierproxy retries itself "
        "(TIERPROXY_ORIGIN_RETRIES, tierproxy.upstream). No ClientSession parameter "
        "turns it off; aiohttp's own test client sets this attribute",
    ),
)

#: The protocol/server methods overridden that are public names but not documented as
#: extension points (their signatures are still checked, like the private ones: SIGNATURES).
OVERRIDDEN_PUBLIC = (
    ("RequestHandler", "data_received"),
    ("RequestHandler", "connection_made"),
    ("RequestHandler", "connection_lost"),
    ("RequestHandler", "pause_writing"),
    ("RequestHandler", "resume_writing"),
    ("RequestHandler", "handle_error"),
    ("RequestHandler", "close"),
    ("RequestHandler", "force_close"),
    ("RequestHandler", "shutdown"),
    ("Server", "connection_made"),
    ("Server", "connection_lost"),
    ("Server", "__call__"),
    ("ResponseHandler", "data_received"),
    ("ResponseHandler", "is_connected"),
    ("ResponseHandler", "connection_lost"),
    ("BaseConnector", "connect"),
)

OWNERS: dict[str, Any] = {
    "RequestHandler": RequestHandler,
    "StreamResponse": web.StreamResponse,
    "AppRunner": web.AppRunner,
    "Server": web.Server,
    "TCPConnector": aiohttp.TCPConnector,
    "BaseConnector": aiohttp.connector.BaseConnector,
    "ResponseHandler": ResponseHandler,
    "ClientSession": aiohttp.ClientSession,
    "_ErrInfo": _ErrInfo,
    "LineTooLong": LineTooLong,
}

#: What tierproxy relies on of each aiohttp method it overrides or calls that aiohttp does not
#: document as an extension point (every ``override``/``call`` in PRIVATE_NAMES, every
#: OVERRIDDEN_PUBLIC entry, and the undocumented functions and methods called): whether it is
#: a coroutine function, and its parameters in order with their kinds (:func:`shape`). An
#: override whose parameters drift from aiohttp's would no longer be given what aiohttp passes,
#: or be awaited wrongly: such a drift counts as the name missing.
SIGNATURES: dict[tuple[str, str], tuple[bool, str]] = {
    ("RequestHandler", "_process_keepalive"): (False, "self"),
    ("StreamResponse", "_write_headers"): (True, "self"),
    ("AppRunner", "_make_server"): (True, "self"),
    ("BaseConnector", "_get"): (True, "self, key, traces"),
    ("BaseConnector", "_release"): (False, "self, key, protocol, *, should_close"),
    ("BaseConnector", "_wait_for_available_connection"): (True, "self, key, traces"),
    ("BaseConnector", "connect"): (True, "self, req, traces, timeout"),
    ("RequestHandler", "data_received"): (False, "self, data"),
    ("RequestHandler", "connection_made"): (False, "self, transport"),
    ("RequestHandler", "connection_lost"): (False, "self, exc"),
    ("RequestHandler", "pause_writing"): (False, "self"),
    ("RequestHandler", "resume_writing"): (False, "self"),
    ("RequestHandler", "handle_error"): (False, "self, request, status, exc, message"),
    ("RequestHandler", "close"): (False, "self"),
    ("RequestHandler", "force_close"): (False, "self"),
    ("RequestHandler", "shutdown"): (True, "self, timeout"),
    ("Server", "connection_made"): (False, "self, handler, transport"),
    ("Server", "connection_lost"): (False, "self, handler, exc"),
    ("Server", "__call__"): (False, "self"),
    ("ResponseHandler", "__init__"): (False, "self, loop"),
    ("ResponseHandler", "data_received"): (False, "self, data"),
    ("ResponseHandler", "is_connected"): (False, "self"),
    ("ResponseHandler", "connection_lost"): (False, "self, exc"),
    ("RequestHandler", "_pause_reading_for_buffer"): (False, "self"),
    # called on RequestHandler._parser (the parser RequestHandler builds), as start() does
    ("HttpRequestParser", "message_consumed"): (False, "self"),
    ("helpers", "set_exception"): (False, "fut, exc, exc_cause"),
    ("helpers", "rfc822_formatted_time"): (False, ""),
}


def _slots(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names.update((slots,) if isinstance(slots, str) else slots)
    return names


def _fully_slotted(cls: type) -> bool:
    return all("__slots__" in klass.__dict__ for klass in cls.__mro__ if klass is not object)


def shape(function: Any) -> str:
    """``function``'s parameters in order, ``*`` before keyword-only ones, ``/`` after
    positional-only ones, ``*args``/``**kwargs`` as such (names matter: aiohttp passes some
    by keyword); "?" when it cannot be read."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return "?"
    out: list[str] = []
    keyword_only = False
    for index, parameter in enumerate(parameters):
        if parameter.kind is parameter.VAR_POSITIONAL:
            out.append(f"*{parameter.name}")
            keyword_only = True
            continue
        if parameter.kind is parameter.VAR_KEYWORD:
            out.append(f"**{parameter.name}")
            continue
        if parameter.kind is parameter.KEYWORD_ONLY and not keyword_only:
            out.append("*")
            keyword_only = True
        out.append(parameter.name)
        following = parameters[index + 1] if index + 1 < len(parameters) else None
        if parameter.kind is parameter.POSITIONAL_ONLY and (
            following is None or following.kind is not parameter.POSITIONAL_ONLY
        ):
            out.append("/")
    return ", ".join(out)


def _parser_class() -> Any:
    """The request parser class ``RequestHandler`` builds (aiohttp's C parser when built)."""
    return HttpRequestParser


def _signature_owner(owner: str) -> Any:
    if owner == "HttpRequestParser":
        return _parser_class()
    if owner == "helpers":
        return aiohttp.helpers
    return OWNERS[owner]


def signature_drift(owner: str, name: str) -> str | None:
    """How ``owner.name`` differs from what :data:`SIGNATURES` records (None: it does not)."""
    is_async, expected = SIGNATURES[(owner, name)]
    function = getattr(_signature_owner(owner), name, None)
    if not callable(function) or getattr(function, "__isabstractmethod__", False):
        return "missing"  # (an abstract one: a base class's placeholder, not aiohttp's work)
    actual = shape(function)
    if actual != expected or inspect.iscoroutinefunction(function) != is_async:
        kind = "async " if inspect.iscoroutinefunction(function) else ""
        return f"is {kind}({actual}), tierproxy expects {'async ' if is_async else ''}({expected})"
    return None


def _line_too_long_layout() -> bool:
    """Whether LineTooLong keeps the line and the exceeded limit at args[0] and args[1]."""
    try:
        exc = LineTooLong(b"x" * 3, 2)
    except Exception:  # noqa: BLE001 - another constructor: the layout is not the expected one
        return False
    return len(exc.args) > 1 and exc.args[0] == b"xxx" and exc.args[1] == 2


def _present(private: Private) -> bool:
    """Whether ``private`` is on this aiohttp: a module name by import; an instance attribute
    of a class slotted all the way down by its slot (others: :func:`_origin_instance_ok`, and
    the test on live instances); a method by its presence and :data:`SIGNATURES`."""
    if private.kind == "import":
        try:
            module = importlib.import_module(f"aiohttp.{private.owner}")
        except ImportError:
            return False
        return hasattr(module, private.name)
    if private.kind == "layout":
        return _line_too_long_layout()
    owner = OWNERS[private.owner]
    if owner is None:
        return False
    if private.attribute:
        return private.name in _slots(owner) if _fully_slotted(owner) else True
    if (private.owner, private.name) in SIGNATURES:
        return signature_drift(private.owner, private.name) is None
    return callable(getattr(owner, private.name, None))


def _missing(side: Side) -> list[str]:
    return [p.label for p in PRIVATE_NAMES if p.side == side and not _present(p)]


def missing_internals() -> list[str]:
    """The private names the hardened connection handler needs that this aiohttp lacks (none:
    []); ``TIERPROXY_ALLOW_UNHARDENED=on`` runs without them (:func:`unhardened_message`)."""
    drifted = [
        f"{owner}.{name}()"
        for owner, name in OVERRIDDEN_PUBLIC
        if owner == "RequestHandler" and signature_drift(owner, name) is not None
    ]
    if signature_drift("HttpRequestParser", "message_consumed") is not None:
        drifted.append("HttpRequestParser.message_consumed()")
    return _missing("listener") + drifted


def missing_serving_internals() -> list[str]:
    """The private names every response and runner needs that this aiohttp lacks (none: []):
    no opt-out (``tierproxy serve`` refuses to start)."""
    drifted = [
        f"{owner}.{name}()"
        for owner, name in OVERRIDDEN_PUBLIC
        if owner == "Server" and signature_drift(owner, name) is not None
    ]
    return _missing("serving") + drifted


def internals_available() -> bool:
    """Whether this aiohttp has the ``RequestHandler`` internals the hardened handler uses."""
    return not missing_internals()


def _origin_instance_ok() -> bool:
    """Whether a ``ResponseHandler`` has the instance attributes listed for it. It is not
    slotted all the way down (no slot lists them), so one is made on a throwaway event loop
    (closed afterwards) and looked at."""
    names = [
        p.name
        for p in PRIVATE_NAMES
        if p.owner == "ResponseHandler" and p.attribute and p.side == "origin"
    ]
    loop = asyncio.new_event_loop()
    try:
        protocol = ResponseHandler(loop)
        return all(hasattr(protocol, name) for name in names)
    except Exception:  # noqa: BLE001 - a constructor that changed: not the hooks tierproxy knows
        return False
    finally:
        loop.close()


def connector_internals_available() -> bool:
    """Whether this aiohttp has the connector hooks that keep pooled connections clean."""
    return (
        not _missing("origin")
        and all(
            signature_drift(owner, name) is None
            for owner, name in OVERRIDDEN_PUBLIC
            if owner == "ResponseHandler"
        )
        and _origin_instance_ok()
    )


def unhardened_message(missing: list[str]) -> str:
    """One line for the operator: what is missing, what it costs, what to do."""
    return (
        f"aiohttp {aiohttp.__version__} lacks internals the hardened listener needs "
        f"({', '.join(missing)}): without them the proxy port runs on aiohttp's own connection "
        "handler, with no request-head or send timeouts, no client connection cap, 400 instead "
        "of 414/431, no hit path (every request takes the full path) and a body read that a "
        "late framing error ends waiting for the client to go; install the aiohttp version "
        "tierproxy pins (>=3.14.4,<3.15), or set TIERPROXY_ALLOW_UNHARDENED=on to run without "
        "these protections"
    )


class UnhardenedListener(RuntimeError):
    """This aiohttp lacks what the hardened listener needs, and running without was not allowed."""


# ============================================================================================
# Writing: sizes, and a head written byte-exact
# ============================================================================================

# Bodies up to this size go out in one write with their head (one copy, one syscall).
_JOIN_BODY_BYTES = 16 * 1024
# Larger ones as slices of a memoryview of the stored (immutable, shared) bytes, written only
# while the transport is under its high-water mark, so a client that reads slowly holds about
# that much, not a copy of the body: Python 3.11's transport.writelines joins its buffers, and
# what a transport cannot send at once it copies into its own buffer (asyncio) or keeps.
BODY_SLICE_BYTES = 64 * 1024


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


class ExactHead(web.StreamResponse):
    """A response whose head is written by :func:`_write_exact_head` (the body, framing and
    everything else stay aiohttp's); the request is its first argument. Used only when a
    header holds non-UTF-8 bytes. A mixin: ``class X(ExactHead, SomeResponse)``."""

    def __init__(self, request: web.BaseRequest, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._exact_request = request

    async def _write_headers(self) -> None:  # PRIVATE_NAMES: called once by prepare()
        _write_exact_head(self, self._exact_request)


class ExactHeadResponse(ExactHead, web.Response):
    """A whole body in one write, head byte-exact."""


class ExactHeadStreamResponse(ExactHead):
    """A streamed body, head byte-exact."""


# ============================================================================================
# File descriptors: the client connection cap
# ============================================================================================

# At the cap with nothing idle, new connections are refused without looking again this long.
_RESCAN_INTERVAL = 0.05

_REFUSED_BODY = b"503 too many client connections: retry later\n"
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
    % (len(_REFUSED_BODY), _REFUSED_BODY)
)


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

    __slots__ = (
        "_at_cap",
        "_episode",
        "_fruitless_scan_at",
        "_low_water",
        "_name",
        "_open",
        "_shed",
        "limit",
    )

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
            log.warning(
                "%s: client connections at the cap (%d): closing the oldest idle "
                "keep-alive connections first, refusing new ones with 503 while "
                "none is idle; counted in tierproxy_client_connections_shed_total "
                "(one line per episode; TIERPROXY_MAX_CLIENT_CONNECTIONS, "
                "RLIMIT_NOFILE)",
                self._name,
                self.limit,
            )
            if self._episode is not None:
                self._episode()
        now = asyncio.get_running_loop().time()
        idle: list[tuple[float, int, RequestHandler]] = []
        if now - self._fruitless_scan_at >= _RESCAN_INTERVAL:
            # O(open connections): a flood of new ones while none is idle must not pay it
            # per connection, so after a scan that found nothing, the next waits a little.
            idle = sorted(
                (since, id(h), h)
                for h in self._open
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
    if (
        waiter is None
        or waiter.done()
        or handler._messages
        or handler._force_close
        or handler.writing_paused
    ):
        # (writing paused: the last response is still being sent - closing it now would only
        # wait for the client, outside the cap's count; the send timeout deals with it)
        return None
    if isinstance(handler, ProxyRequestHandler) and handler._lookup is not None:
        return None
    transport = handler.transport
    if transport is not None and transport.get_write_buffer_size():
        # Still sending (below the high-water mark, so writing is not paused): closing it
        # would wait for the client, and its descriptor would outlive its place in the count.
        return None
    return handler._next_keepalive_close_time


class CappedServer(web.Server):
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


# ============================================================================================
# The connection handler
# ============================================================================================

H = TypeVar("H")
Answer = tuple[bytes, bytes]  # response head, body


H_co = TypeVar("H_co", covariant=True)


class PendingAnswer(Protocol[H_co]):
    """A hit-path answer still being looked up (:meth:`HitAnswerer.answer`)."""

    def then(self, callback: Callable[[Answer | H_co | None], object]) -> None:
        """Call ``callback`` once with the outcome when the lookup is over - the answer, a
        hand-over, or None when it failed (the full path answers then) - directly, not on a
        later loop iteration. Called once, right after ``answer`` returned this."""

    def cancel(self) -> None:
        """The client is gone: stop, and never call the callback."""


class HitAnswerer(Protocol[H]):
    """Answers a parsed request (see :mod:`tierproxy.hits`): with the response's head and body
    at once; or later (:class:`PendingAnswer`) with them, or else with a hand-over ``H`` for
    the full path (stored on its request under :attr:`handover_key`); or declines (None)."""

    @property
    def handover_key(self) -> web.RequestKey[H]: ...

    def answer(
        self, message: RawRequestMessage, remote: str | None
    ) -> Answer | PendingAnswer[H] | None: ...


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


# What is left of a shutdown's timeout after a lookup used it up: aiohttp's
# RequestHandler.shutdown takes a timeout <= 0 as no timeout at all.
_LEAST_SHUTDOWN_WAIT = 0.001


class ProxyRequestHandler(RequestHandler, Generic[H]):
    """One client connection. See the module docstring for what it adds to aiohttp's."""

    __slots__ = (
        "_close_guard",
        "_event_loop",
        "_full_path_writer",
        "_handover",
        "_head_timeout",
        "_head_timer",
        "_held",
        "_hits",
        "_idle_timeout",
        "_lookup",
        "_lookup_over",
        "_proxy_server",
        "_remote",
        "_send_timeout",
        "_send_timer",
        "_writable",
    )

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        head_timeout: float,
        send_timeout: float,
        hits: HitAnswerer[H] | None = None,
        keepalive_timeout: float = 3630,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, keepalive_timeout=keepalive_timeout, **kwargs)
        # The server, kept here (aiohttp's own reference is private and dropped at
        # connection_lost): its public requests_count counts hit-path answers too.
        self._proxy_server = manager
        self._event_loop = loop
        self._idle_timeout = keepalive_timeout
        self._head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timeout = send_timeout
        self._send_timer: asyncio.TimerHandle | None = None
        # Bounds a close that waits for the client to take what is buffered (_guard_close).
        self._close_guard: asyncio.TimerHandle | None = None
        self._hits = hits
        self._remote: str | None = None
        # The hit path's work in flight - a lookup, or the rest of a large body waiting for
        # the client to drain - one at a time: responses keep the requests' order. And what
        # a lookup left for the full path, with the message it is for.
        self._lookup: PendingAnswer[H] | asyncio.Task[None] | None = None
        # Parsed requests kept from start() while that work is in flight and start() is not
        # waiting for a request (see _hide_from_start), in order, ahead of _messages.
        self._held: collections.deque[Any] = collections.deque()
        # Set when the hit path's work in flight is over, for shutdown() waiting on it.
        self._lookup_over: asyncio.Future[None] | None = None
        self._handover: tuple[RawRequestMessage, H] | None = None
        self._writable: asyncio.Future[None] | None = None  # set when writing resumes
        # The writer of the last request start() took (see _full_path_done).
        self._full_path_writer: AbstractStreamWriter | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # A client that connects and sends nothing is cut off like one that trickles a head.
        self._start_head_timer()
        task = self._task_handler
        if task is not None:
            # start() closes the transport itself when it ends (a response that closes the
            # connection): that close is bounded too.
            task.add_done_callback(self._start_ended)

    def _start_ended(self, _: object) -> None:
        transport = self.transport
        if transport is not None and transport.is_closing():
            self._guard_close(transport)

    def force_close(self) -> None:
        # (the keep-alive timer, the head timer, the connection cap, shutdown): aiohttp's
        # close waits for the client to take what is buffered - bounded here.
        transport = self.transport
        super().force_close()
        if transport is not None:
            self._guard_close(transport)

    def _guard_close(self, transport: asyncio.Transport) -> None:
        """Abort ``transport`` if, a send timeout from now, the client took none of what is
        buffered meanwhile (looked at again while it takes some): after a response left
        under the high-water mark, and when the transport is closing and waits for it.

        ``transport.close()`` ends only once the write buffer is empty. The send timeout
        (pause_writing) only runs while that buffer is over the transport's high-water
        mark: a client that reads nothing, once the kernel's buffers are full, can leave
        less than that behind and keep the connection - its descriptor, its place under the
        connection cap - for as long as its TCP stack answers, which is for ever."""
        if self._close_guard is None:
            self._close_guard = self._event_loop.call_later(
                self._send_timeout,
                self._close_stalled,
                transport,
                transport.get_write_buffer_size(),
            )

    def _close_stalled(self, transport: asyncio.Transport, buffered_then: int) -> None:
        self._close_guard = None
        buffered = transport.get_write_buffer_size()
        if buffered == 0 and not transport.is_closing():
            return  # all taken
        if buffered and buffered != buffered_then:
            # The client takes it, slowly (or more was written): another send timeout to go.
            self._close_guard = self._event_loop.call_later(
                self._send_timeout, self._close_stalled, transport, buffered
            )
            return
        log.debug(
            "aborting a connection from %s: it took none of its last %d bytes for %.1fs",
            self.peername,
            buffered,
            self._send_timeout,
        )
        transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        if self._close_guard is not None:
            self._close_guard.cancel()
            self._close_guard = None
        if self._lookup is not None:
            self._lookup.cancel()  # its client is gone
            self._lookup = None
        self._held.clear()
        self._hit_path_work_over()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().connection_lost(exc)

    # asyncio flow control: the transport calls these when its write buffer goes over its
    # high-water mark (the client is not reading fast enough) and back under the low one.
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self._event_loop.call_later(
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
        log.debug(
            "closing a connection from %s: it accepted no response bytes for %.1fs",
            self.peername,
            self._send_timeout,
        )
        # The writer blocked on this client fails; whatever it streamed from the origin is
        # released with it.
        transport.abort()

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if (
            self._head_timer is None
            and waiter is None
            and self._request_count
            and not self._full_path_done()
        ):
            # A request is being handled: these bytes are its body (or pipelined requests).
            super().data_received(data)
            self._fail_body_read_on_framing_error()
            return
        # Between requests (or before the first): these bytes belong to a request head.
        before = self._request_count
        if (
            self._hits is not None
            and (waiter is not None or self._full_path_done() or not before)
            and (not self._messages or self._lookup is not None)
        ):
            # start() waits for the next request - or is about to: the full path's response
            # has gone out and start() resumes on the next loop iteration, or the connection
            # is new and start() has not run yet (no request came: none is in progress;
            # with uvloop a new connection's first bytes often come first) -, and no request
            # is queued (or the hit path is looking one up): parse without waking start(),
            # answer what the hit path can, and wake start() only for what is left once no
            # lookup is in flight.
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
        if self._lookup is not None and self._messages:
            self._hide_from_start()
        if self._request_count != before:
            self._stop_head_timer()  # a head arrived (or failed to parse: aiohttp answers 400)
        elif self._head_timer is None and data and self._lookup is None:
            # (aiohttp feeds b"" to resume parsing; while a lookup is in flight the bytes are
            # pipelined behind a request in progress, as in the first branch: idle-bounded)
            self._start_head_timer()

    def _full_path_done(self) -> bool:
        """Whether the full path's last request is over, its response written, while start()
        has not yet resumed (it does on the next loop iteration; with uvloop, after the
        connections' reads of this one). A request arriving then is between requests: left
        for start(), it would take the full path, and so would every request after it that
        came before start() had resumed - a connection could stay on the full path for good.

        ``_request_in_progress`` is aiohttp's flag for a request handler running, response
        writing included; between start() taking a request and its handler's first step it is
        still False, but that request's writer has written nothing yet."""
        writer = self._full_path_writer
        return writer is not None and not self._request_in_progress and writer.output_size > 0

    def full_path_taking(
        self, message: object, payload: object, writer: AbstractStreamWriter
    ) -> None:
        """start() is taking ``message`` for the full path, its response to go to ``writer``
        (called by the server's request factory). Only a bodiless HTTP/1.1 keep-alive request
        counts:
        after one with a body (which may be left unread, and its connection closed) or one
        that closes the connection, start() alone goes on (RFC 9112 §9.6: no request is
        processed after a response that closes)."""
        keeps_alive = (
            isinstance(message, RawRequestMessage)
            # HTTP/1.1 only: an HTTP/1.0 response of unknown length ends with the connection
            # (aiohttp closes it after the body, RFC 9112 §6.3), whatever the request said.
            and message.version == HttpVersion11
            and not message.should_close
            and not message.upgrade
            and payload is EMPTY_PAYLOAD
        )
        self._full_path_writer = writer if keeps_alive else None

    def _answer_hits(self, hits: HitAnswerer[H]) -> None:
        """Answer queued requests in order while the hit path can; stop at the first it can't.

        Runs only while start() has no request: it waits for one, or has just written the
        full path's last response and not yet resumed. No response of the full path is in
        flight, so the order of responses on the connection is the order of the requests.
        When an answer has to wait (a lookup, a large body), the requests behind it are kept
        from start() until it is over (:meth:`_hide_from_start`).
        """
        transport = self.transport
        messages = self._messages
        remote = self._remote if self._remote is not None else self.remote
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
                answer = hits.answer(message, remote)
            except Exception:  # the full path answers it, and reports what is wrong
                log.exception("hit path failed; the request takes the full path")
                return
            if answer is None:
                return
            messages.popleft()
            if not isinstance(answer, tuple):
                # A lookup in flight. The message is out of the queue meanwhile, so start()
                # is not woken for what follows it (and the idle timer leaves the connection
                # alone: _process_keepalive).
                self._lookup = answer
                answer.then(functools.partial(self._looked_up, message, payload, answer))
                if messages:
                    self._hide_from_start()
                return
            rest = self._write_answer(answer)
            if rest is not None:
                # The client is not taking the body as fast: the rest goes as it drains, and
                # what follows waits for it, as behind a lookup.
                self._lookup = self._event_loop.create_task(self._finish_body(rest))
                if messages:
                    self._hide_from_start()
                return

    def _looked_up(
        self,
        message: RawRequestMessage,
        payload: Any,
        lookup: PendingAnswer[H],
        outcome: Answer | H | None,
    ) -> None:
        """The hit path's lookup of ``message`` is over: its answer written, or the message
        back at the head of the queue for start(), with what the lookup found (None: it
        failed, and the full path answers)."""
        if lookup is not self._lookup:
            return  # the connection is gone (connection_lost cancelled it)
        self._lookup = None
        if self._held:
            self._release_held()
        transport = self.transport
        if isinstance(outcome, tuple):
            if transport is not None and not transport.is_closing():
                rest = self._write_answer(outcome)
                if rest is not None:
                    # Still this connection's work in flight: the rest of the body.
                    self._lookup = self._event_loop.create_task(self._finish_body(rest))
                    if self._messages:
                        self._hide_from_start()
                    return
        else:
            # Back to the head of the queue for start(), with what the lookup found: the
            # request factory hands it to that message's request (take_handover).
            self._handover = (message, outcome) if outcome is not None else None
            self._messages.appendleft((message, payload))
        if self._hits is not None and self._messages and self._messages[0][0] is not message:
            self._answer_hits(self._hits)
        self._after_hit_path_work()

    async def _finish_body(self, rest: memoryview) -> None:
        await self._send_rest(rest)
        self._lookup = None
        if self._held:
            self._release_held()
        if self._hits is not None and self._messages:
            self._answer_hits(self._hits)
        self._after_hit_path_work()

    def _hide_from_start(self) -> None:
        """Keep the queued requests from start() while the hit path's work is in flight and
        start() is not waiting for a request.

        That is the case when a request came right after the full path's last response was
        written, before start() resumed (:meth:`_full_path_done`): start() takes whatever is
        queued when it resumes, without waiting, so a request behind one being looked up
        would be answered first - its response read by the client as the other's. Waiting,
        start() is only woken once the work is over (:meth:`_wake_for_full_path`).

        Held and queued requests, and the one being looked up, count against the parser's
        pipelining window: reading pauses when it is full, and start() resumes it (and feeds
        the parser what it kept) as it drains its queue.

        Called, with that work in flight, when requests were queued: only they change what is
        held or counted."""
        lookup, messages, held = self._lookup, self._messages, self._held
        waiter = self._waiter
        if waiter is None or waiter.done():
            held.extend(messages)
            messages.clear()
        # The parser stops emitting requests once its window is full - and a request being
        # looked up still counts in it until answered (message_consumed); the rest of the
        # read waits in the parser, fed again only when reading resumes. aiohttp pauses for
        # its own queue alone, which is one short then: pause here, counting everything.
        in_window = len(held) + len(messages) + (0 if isinstance(lookup, asyncio.Task) else 1)
        if in_window >= self._max_msg_queue_size and not self._buffer_paused:
            self._pause_reading_for_buffer()

    def _release_held(self) -> None:
        """The requests held from start() back at the head of its queue, in order (the hit
        path's work is over; called when some are held)."""
        self._messages.extendleft(reversed(self._held))
        self._held.clear()

    def _after_hit_path_work(self) -> None:
        if self._lookup is None:
            self._hit_path_work_over()
        self._wake_for_full_path()
        if self._close and self._lookup is None and not self._messages:
            super().close()  # closing was asked for while the work ran (see close())

    def _hit_path_work_over(self) -> None:
        """No hit-path work is in flight any more: a shutdown() waiting for it goes on."""
        over = self._lookup_over
        if over is not None:
            self._lookup_over = None
            if not over.done():
                over.set_result(None)

    def _write_answer(self, answer: Answer) -> memoryview | None:
        """Write a hit-path answer; return what of its body waits for the client to drain."""
        if self._parser is not None:
            self._parser.message_consumed()
        # As start() counts each request it takes (aiohttp's gunicorn worker restarts after
        # max_requests of them): a request the hit path answers is one too.
        self._proxy_server.requests_count += 1
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
                transport.write(view[offset : offset + BODY_SLICE_BYTES])
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
        for offset in range(0, len(rest), BODY_SLICE_BYTES):
            if self.writing_paused:
                writable = self._writable
                if writable is None:
                    writable = self._writable = self._event_loop.create_future()
                await writable
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            transport.write(rest[offset : offset + BODY_SLICE_BYTES])
        self._response_sent()

    def _response_sent(self) -> None:
        transport = self.transport
        if (
            self._close_guard is None
            and transport is not None
            and transport.get_write_buffer_size()
        ):
            # Left under the high-water mark (writing not paused, so no send timer): a client
            # that takes none of it for a send timeout is cut off (_guard_close).
            self._guard_close(transport)
        # What start() does after a response: keep-alive from now on, idle-bounded.
        self._keepalive = True
        loop = self._event_loop
        close_time = loop.time() + self._idle_timeout
        self._next_keepalive_close_time = close_time
        if self._keepalive_handle is None:
            self._keepalive_handle = loop.call_at(close_time, self._process_keepalive)

    def _wake_for_full_path(self) -> None:
        """Let start() take the queued requests, unless a hit-path lookup still holds one."""
        waiter = self._waiter
        if self._lookup is None and self._messages and waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take_handover(self, message: object) -> H | None:
        """What the hit path's lookup left for ``message`` (the parsed request start() is
        building a request for), if any; at most once."""
        handover = self._handover
        if handover is None or handover[0] is not message:
            return None
        self._handover = None
        return handover[1]

    def _process_keepalive(self) -> None:
        if self._lookup is not None:
            # Not idle: a request is being looked up. Check again a keep-alive period later
            # (answering it sets the next deadline, as start() does after a response).
            loop = self._event_loop
            close_time = loop.time() + self._idle_timeout
            self._next_keepalive_close_time = close_time
            self._keepalive_handle = loop.call_at(close_time, self._process_keepalive)
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
        """Finish the request in flight within ``timeout`` (``TIERPROXY_SHUTDOWN_TIMEOUT``) in
        all, then close. A hit-path lookup is a request in progress: it may finish (answered,
        or handed to start()). aiohttp's own shutdown waits the timeout for a running
        handler, then the timeout again after asking it to stop (which a handler that is not
        cancelled on disconnect does not notice), and a lookup's wait came before both: a
        slow lookup handed to a hanging origin held SIGTERM for three timeouts. All of it
        now shares one deadline; at the deadline the handler is cancelled and the
        connection closed."""
        loop = self._event_loop
        deadline = None if timeout is None else loop.time() + timeout
        if self._lookup is not None:
            over = self._lookup_over
            if over is None:
                over = self._lookup_over = loop.create_future()
            await asyncio.wait({over}, timeout=timeout)
        if deadline is None:
            await super().shutdown(None)
            return
        try:
            async with asyncio.timeout_at(deadline):
                # (never 0: aiohttp takes a timeout <= 0 as none at all)
                await super().shutdown(max(_LEAST_SHUTDOWN_WAIT, deadline - loop.time()))
        except TimeoutError:
            task = self._task_handler
            if task is not None:
                task.cancel()
            self.force_close()

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
        self._head_timer = self._event_loop.call_later(
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
        log.debug(
            "closing a connection from %s: no complete request head within %.1fs",
            self.peername,
            self._head_timeout,
        )
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
        # Every response made here closes the connection: nothing after it is answered.
        self._full_path_writer = None
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
        log.debug(
            "refused a malformed request from %s with %d: %s",
            request.remote,
            status,
            exc.message[:300],
        )
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot answer the parse error")
        phrase = HTTPStatus(status).phrase
        text = f"{status} {phrase}: {reason}\n" if reason else f"{status} {phrase}\n"
        response = web.Response(status=status, text=text)
        response.force_close()  # the framing of whatever follows is unknown
        return response


RequestFactory = Callable[
    [
        RawRequestMessage,
        "StreamReader",
        RequestHandler,
        "AbstractStreamWriter",
        "asyncio.Task[None]",
    ],
    web.BaseRequest,
]


class _ProxyServer(CappedServer, Generic[H]):
    """aiohttp's low-level server making :class:`ProxyRequestHandler` connections, whose
    request factory hands the hit path's hand-overs to the requests they are for."""

    def __init__(
        self,
        handler: Any,
        *,
        request_factory: RequestFactory,
        handler_cancellation: bool,
        loop: asyncio.AbstractEventLoop,
        head_timeout: float,
        send_timeout: float,
        hits: HitAnswerer[H] | None,
        cap: ConnectionCap | None,
        **handler_kwargs: Any,
    ) -> None:
        make_request = request_factory
        if hits is not None:
            key = hits.handover_key

            def with_handover(
                message: RawRequestMessage,
                payload: StreamReader,
                protocol: RequestHandler,
                writer: AbstractStreamWriter,
                task: asyncio.Task[None],
            ) -> web.BaseRequest:
                request = request_factory(message, payload, protocol, writer, task)
                if isinstance(protocol, ProxyRequestHandler):
                    protocol.full_path_taking(message, payload, writer)
                    handover = protocol.take_handover(message)
                    if handover is not None:
                        request[key] = handover
                return request

            make_request = with_handover
        super().__init__(
            handler,
            cap=cap,
            request_factory=make_request,
            handler_cancellation=handler_cancellation,
            loop=loop,
            **handler_kwargs,
        )
        self._proxy_loop = loop
        self._proxy_handler_kwargs = handler_kwargs
        self._head_timeout = head_timeout
        self._send_timeout = send_timeout
        self._hits = hits

    def __call__(self) -> RequestHandler:
        return ProxyRequestHandler(
            self,
            loop=self._proxy_loop,
            head_timeout=self._head_timeout,
            send_timeout=self._send_timeout,
            hits=self._hits,
            **self._proxy_handler_kwargs,
        )


# Keyword arguments of web.AppRunner that are not RequestHandler's: the runner's own, and
# web.Server's (read back from the server AppRunner made).
_RUNNER_KWARGS = frozenset({"handle_signals", "shutdown_timeout", "handler_cancellation"})


def _handler_kwargs(runner_kwargs: dict[str, Any], handler_args: dict[str, Any]) -> dict[str, Any]:
    """The RequestHandler arguments for a proxy runner's server: what AppRunner would give its
    server - the runner's own keyword arguments but its own, then the app's ``handler_args``
    (which win, as in aiohttp) - except ``debug``, always False.

    aiohttp passes ``debug=app._debug`` (the event loop's debug mode unless the app says
    otherwise), and in debug mode a handler exception's 500 carries the traceback in its body.
    tierproxy's listeners face untrusted clients: a traceback (paths, code, values) is never
    sent, whatever the loop's mode (asyncio debug, PYTHONASYNCIODEBUG=1, python -X dev).
    """
    kwargs = {k: v for k, v in runner_kwargs.items() if k not in _RUNNER_KWARGS}
    kwargs.update(handler_args)
    kwargs["debug"] = False
    return kwargs


def _plain_server(server: web.Server, kwargs: dict[str, Any]) -> web.Server:
    """aiohttp's own server (no internals: the unhardened fallback), as AppRunner made
    ``server`` but with :func:`_handler_kwargs`' arguments (``debug=False``)."""
    return web.Server(
        server.request_handler,
        request_factory=server.request_factory,
        handler_cancellation=server.handler_cancellation,
        loop=asyncio.get_running_loop(),
        **kwargs,
    )


class CappedRunner(web.AppRunner):
    """``web.AppRunner`` whose connections a :class:`ConnectionCap` bounds (the admin port).

    ``handler_args`` are the app's (``web.Application(handler_args=...)``), required:
    AppRunner builds its server from the app's, but aiohttp offers no public way to read them
    back, and a runner that silently lacked them would run the listener on aiohttp's
    defaults (a 3630 s keep-alive).
    """

    __slots__ = ("_cap", "_handler_args", "_runner_kwargs")

    def __init__(
        self,
        app: web.Application,
        *,
        cap: ConnectionCap,
        handler_args: dict[str, Any],
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._cap = cap
        self._handler_args = handler_args
        self._runner_kwargs = kwargs

    async def _make_server(self) -> web.Server:  # PRIVATE_NAMES
        server = await super()._make_server()  # starts the app
        kwargs = _handler_kwargs(self._runner_kwargs, self._handler_args)
        if missing_internals():
            # tierproxy serve refused to start already, unless allowed: no cap (it reads
            # RequestHandler internals to find idle connections).
            return _plain_server(server, kwargs)
        return CappedServer(
            server.request_handler,
            cap=self._cap,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **kwargs,
        )


class ProxyRunner(web.AppRunner, Generic[H]):
    """``web.AppRunner`` whose connections are :class:`ProxyRequestHandler` s.

    ``header_timeout`` and ``send_timeout`` are ``TIERPROXY_HEADER_TIMEOUT`` and
    ``TIERPROXY_SEND_TIMEOUT``; ``cap`` bounds the open connections
    (``TIERPROXY_MAX_CLIENT_CONNECTIONS``); ``handler_args`` are the app's
    (:func:`tierproxy.listener.handler_args`; required, as for :class:`CappedRunner`).
    ``hits``, when given, answers what it can of each request on the connection itself
    (:mod:`tierproxy.hits`); the app handles the rest.
    """

    __slots__ = (
        "_allow_unhardened",
        "_cap",
        "_handler_args",
        "_header_timeout",
        "_hits",
        "_runner_kwargs",
        "_send_timeout",
    )

    def __init__(
        self,
        app: web.Application,
        *,
        header_timeout: float,
        send_timeout: float,
        handler_args: dict[str, Any],
        hits: HitAnswerer[H] | None = None,
        allow_unhardened: bool = False,
        cap: ConnectionCap | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout
        self._send_timeout = send_timeout
        self._handler_args = handler_args
        self._hits = hits
        self._allow_unhardened = allow_unhardened
        self._cap = cap
        self._runner_kwargs = kwargs

    async def _make_server(self) -> web.Server:  # PRIVATE_NAMES
        server = await super()._make_server()  # starts the app (on_startup, cleanup_ctx)
        kwargs = _handler_kwargs(self._runner_kwargs, self._handler_args)
        missing = missing_internals()
        if missing:
            message = unhardened_message(missing)
            if not self._allow_unhardened:
                raise UnhardenedListener(message)
            # Still safe from smuggling (aiohttp's limits and framing checks apply), but a
            # client may hold a connection as long as it likes: said at every start.
            log.warning("TIERPROXY_ALLOW_UNHARDENED=on: serving unhardened: %s", message)
            return _plain_server(server, kwargs)
        return _ProxyServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=asyncio.get_running_loop(),
            head_timeout=self._header_timeout,
            send_timeout=self._send_timeout,
            hits=self._hits,
            cap=self._cap,
            **kwargs,
        )


# ============================================================================================
# Origin connections (client side)
# ============================================================================================


class ConnectorUnavailable(RuntimeError):
    """This aiohttp lacks the client connector hooks that keep origin connections clean;
    start-up stops with this message (there is no running without them)."""


class OriginBusy(Exception):
    """No origin connection came free within ``TIERPROXY_ORIGIN_QUEUE_TIMEOUT``.

    Not a failure of the origin (it was never asked), so never counted against its breaker.
    Deliberately not a TimeoutError: aiohttp would turn that into a connection timeout.
    Raised from inside aiohttp's connector (:class:`_OriginConnector`); re-exported by
    :mod:`tierproxy.origin`.
    """


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

    def __init__(
        self, loop: asyncio.AbstractEventLoop, discarded: Callable[[str], None] | None = None
    ) -> None:
        super().__init__(loop)
        self.idle = False  # in the pool, no request outstanding
        self._discarded = discarded
        self.fetch: _FetchClock | None = None  # the fetch using the connection now

    def discard(self, reason: str, detail: str, level: int = logging.WARNING) -> None:
        origin_log.log(level, "origin connection discarded: %s", detail)
        if self._discarded is not None:
            self._discarded(reason)
        self.force_close()
        transport = self.transport
        if transport is not None:
            transport.close()

    def data_received(self, data: bytes) -> None:
        if self.idle and data:
            self.discard(
                "unsolicited-bytes", f"{len(data)} unsolicited bytes on an idle connection"
            )
            return
        if data and self.fetch is not None:
            self.fetch.answered = True  # bytes of an answer: the fetch is not retried
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
            self.discard(
                "unread-before-reuse", "unread bytes or EOF on an idle connection", logging.INFO
            )
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
    answered: bool = False  # a byte of the origin's answer arrived (set by _OriginProtocol)


_FETCH_CLOCK: contextvars.ContextVar[_FetchClock | None] = contextvars.ContextVar(
    "tierproxy_origin_fetch_clock", default=None
)


def without_builtin_retry(session: aiohttp.ClientSession) -> aiohttp.ClientSession:
    """``session`` with aiohttp's own resend of a failed request turned off (see
    PRIVATE_NAMES: ClientSession._retry_connection): the origin client's retries are
    tierproxy's (tierproxy.upstream), counted and bounded by the request's deadline."""
    session._retry_connection = False
    return session


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
            functools.partial(
                _OriginProtocol, loop=asyncio.get_running_loop(), discarded=discarded
            ),
        )

    async def _get(self, key: Any, traces: list[Any]) -> aiohttp.connector.Connection | None:
        # No traces are configured, so the parent does not await: nothing runs between its
        # is_connected() check and the connection leaving the idle state here.
        connection = await super()._get(key, traces)
        if connection is not None and isinstance(connection.protocol, _OriginProtocol):
            connection.protocol.idle = False
        return connection

    async def connect(
        self, req: aiohttp.ClientRequest, traces: list[Any], timeout: aiohttp.ClientTimeout
    ) -> aiohttp.connector.Connection:
        # Public: the connection a fetch is about to use learns which fetch it serves.
        connection = await super().connect(req, traces, timeout)
        if isinstance(connection.protocol, _OriginProtocol):
            connection.protocol.fetch = _FETCH_CLOCK.get()
        return connection

    def _release(self, key: Any, protocol: ResponseHandler, *, should_close: bool = False) -> None:
        super()._release(key, protocol, should_close=should_close)
        if isinstance(protocol, _OriginProtocol):
            protocol.fetch = None
            if protocol.transport is not None:
                protocol.idle = True  # pooled (a closed one has no transport)

    async def _wait_for_available_connection(self, key: Any, traces: list[Any]) -> None:
        clock = _FETCH_CLOCK.get()
        if clock is None:
            await super()._wait_for_available_connection(key, traces)
            return
        loop = asyncio.get_running_loop()
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
