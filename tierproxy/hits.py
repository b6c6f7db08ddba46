"""The L1 hit path: fresh L1 hits answered by the connection handler, as stored bytes.

A fresh L1 hit needs no I/O, so it need not pay for what aiohttp builds around every request
(a ``Request``, a task, the router and middleware, a ``Response`` whose headers are merged and
serialised anew). :class:`HitPath` answers such a request synchronously, from
:meth:`tierproxy.listener.ProxyRequestHandler.data_received`: it returns the response bytes -
the entry's status line and stored headers, encoded once per entry (``Entry.wire_head``), plus
the few header lines that change per request - and the handler writes them to the transport.

Anything it is not sure of goes the full way (``None``): another method, a request with a body,
``Connection: close``, HTTP/1.0, a conditional or ``Cache-Control`` request header, a copy that
is missing, stale or for other ``Vary`` values, a stored status aiohttp frames specially, the
proxy not ready. The response is the one the full path sends for the same hit, byte for byte
but the request id (tests/integration/test_hit_path.py holds the two side by side), and it is
counted and logged the same way: ``tierproxy_tier_lookups_total{tier="l1",outcome="hit"}``,
the L1 latency histogram, ``tierproxy_responses_total`` and one access-log line; and also in
``tierproxy_hit_path_responses_total``.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_parser import RawRequestMessage
from aiohttp.web_response import REASON_PHRASES

from .keys import BadTarget, CacheKey, normalise_target
from .logs import request_id

if TYPE_CHECKING:
    from .entry import Entry
    from .server import ProxyState
    from .tiers.base import GuardedTier

__all__ = ["HitPath"]

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
    b"%sAge: %d\r\nX-Cache: %s\r\nCache-Status: tierproxy; hit; ttl=%d%s\r\n"
    b"X-Request-ID: %s\r\nContent-Length: %d\r\n%s\r\n"
)


def encode_head(entry: Entry) -> bytes | None:
    """The status line and stored header lines, as aiohttp writes them; None if unsafe.

    A header line with CR or LF (possible only in a tampered shared-tier entry: the origin's
    parser refuses them) is left to aiohttp, which refuses to send it.
    """
    lines = [b"HTTP/1.1 %d %s\r\n" % (entry.status, REASON_PHRASES.get(entry.status, "").encode())]
    for name, value in entry.headers:
        line = f"{name}: {value}\r\n"
        if "\r" in line[:-2] or "\n" in line[:-2]:
            return None
        try:
            lines.append(line.encode("utf-8"))
        except UnicodeEncodeError:
            return None
    return b"".join(lines)


class HitPath:
    """Answers fresh L1 hits for :class:`tierproxy.listener.ProxyRequestHandler`."""

    __slots__ = ("_access_log", "_l1", "_label", "_metrics", "_state", "_status_suffix")

    def __init__(self, state: ProxyState, l1: GuardedTier) -> None:
        self._state = state
        self._l1 = l1
        self._metrics = state.metrics
        self._access_log = state.access_log
        self._label = f"HIT-{l1.name.upper()}"
        # What follows "ttl=<n>" in Cache-Status, as the full path writes it.
        self._status_suffix = f"; detail={l1.name}".encode()

    def answer(self, message: RawRequestMessage, remote: str | None) -> tuple[bytes, bytes] | None:
        """The response head and body for ``message``, or None: take the full path."""
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
            material = normalise_target(message.path)
        except BadTarget:
            return None
        started = time.perf_counter()
        now = time.time()
        entry = self._l1.fresh_now(CacheKey(material), headers, now)
        if entry is None or entry.status in _SPECIAL_STATUS or entry.status < 200:
            return None
        head = entry.wire_head
        if head is None:
            head = encode_head(entry)
            if head is None:
                return None
            object.__setattr__(entry, "wire_head", head)
        rid = request_id(headers.get("X-Request-ID"))
        body = entry.body
        stored = entry.response_headers
        # The lines aiohttp adds after ours when the stored headers lack them.
        tail = b""
        if body and "Content-Type" not in stored:
            tail = _OCTET_STREAM_LINE
        if "Date" not in stored:
            tail += b"Date: " + rfc822_formatted_time().encode() + b"\r\n"
        if "Server" not in stored:
            tail += _SERVER_LINE
        response_head = _HIT_HEAD % (
            head, entry.age(now), self._label.encode(), math.floor(entry.fresh_until - now),
            self._status_suffix, rid.encode(), len(body), tail,
        )
        self._metrics.response(self._label, entry.status)
        self._metrics.hit_path_responses.inc()
        access_log = self._access_log
        if access_log.enabled:
            access_log.emit("GET", message.path, entry.status, self._label, len(body),
                            time.perf_counter() - started, _NO_TIMINGS, rid, remote)
        return response_head, body
