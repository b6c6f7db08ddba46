"""A scriptable origin server (aiohttp) for the integration tests.

Behaviour is chosen per request by the most specific rule: an exact ``path?query`` rule,
then a ``path`` rule, then the default. Every request is logged (method, path, path_qs,
headers, body) before any latency or hang, so tests can assert what the origin saw even
when the proxy gave up waiting.

    origin.set("/a", headers={"Cache-Control": "max-age=60"}, etag='"v1"',
               honor_if_none_match=True)
    origin.set("/slow", hang=True)          # answers only after origin.release()
    origin.count("/a")                      # requests seen for /a (any query)
    origin.peak_concurrency("/a")           # most requests for /a ever handled at once
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import hashlib
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy

if TYPE_CHECKING:
    from tierproxy.clock import Clock

__all__ = ["Behavior", "Origin", "ReceivedRequest", "make_body"]

_MAX_LOG = 10_000  # the request log is bounded like everything else


def make_body(size: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random bytes (incompressible, so nothing can cheat on size)."""
    return random.Random(seed).randbytes(size)


@dataclass(frozen=True)
class Behavior:
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None  # None and size None: a text body naming path and request no.
    size: int | None = None  # deterministic body of this many bytes (see ``make_body``)
    seed: int = 0
    latency: float = 0.0  # seconds before the status line
    hang: bool = False  # wait for ``Origin.release()`` before the status line
    hang_limit: float = 30.0  # a hang never outlives this (bounded)
    chunked: bool = False  # no Content-Length; Transfer-Encoding: chunked
    chunk_size: int = 16_384
    chunk_delay: float = 0.0  # pause between chunks (streamed bodies)
    pause_after: int | None = None  # stream this many bytes, wait for release(), then rest
    close_mid_body: bool = False  # announce the full length, send half, drop the connection
    etag: str | None = None
    last_modified: str | None = None
    honor_if_none_match: bool = False  # 304 when If-None-Match matches ``etag``
    honor_range: bool = False  # 206 for one "bytes=a-b" / "a-" / "-n" Range (RFC 9110 §14)


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str  # decoded path
    path_qs: str  # the request target exactly as it came over the wire (raw path + query)
    headers: CIMultiDictProxy[str]
    body: bytes
    at: float  # wall clock


class Origin:
    def __init__(self) -> None:
        self.default = Behavior()
        self._rules: dict[str, Behavior] = {}
        self.requests: list[ReceivedRequest] = []
        self._per_target: dict[str, int] = {}
        # Requests being handled now, and the most ever at once, per decoded path (bounded:
        # one counter per path a test uses).
        self._active: dict[str, int] = {}
        self._peak: dict[str, int] = {}
        self._gate = asyncio.Event()
        self._server: TestServer | None = None
        # The proxy's clock when a test advances it (make_proxy(clock=...) sets it): the
        # origin's Date then comes from the same clock, as a real origin's Date agrees with
        # the proxy's time (RFC 9111 §4.2.3 computes an age from it). None: aiohttp's Date.
        self.clock: Clock | None = None

    # -- scripting ------------------------------------------------------------------
    def set(self, target: str, **fields: Any) -> Behavior:
        """Rule for ``target``: a path (any query) or an exact ``path?query``."""
        behavior = Behavior(**fields)
        self._rules[target] = behavior
        if behavior.hang or behavior.pause_after is not None:
            self._gate.clear()
        return behavior

    def set_default(self, **fields: Any) -> Behavior:
        self.default = Behavior(**fields)
        if self.default.hang or self.default.pause_after is not None:
            self._gate.clear()
        return self.default

    def update(self, target: str, **fields: Any) -> Behavior:
        """Change some fields of ``target``'s current rule (or the default's)."""
        base = self._rules.get(target, self.default)
        return self.set(target, **{**dataclasses.asdict(base), **fields})

    def release(self) -> None:
        """Let every hanging/paused response go on (and later ones not wait)."""
        self._gate.set()

    def hold(self) -> None:
        self._gate.clear()

    # -- observing ------------------------------------------------------------------
    def requests_for(
        self, target: str | None = None, method: str | None = None
    ) -> list[ReceivedRequest]:
        out = []
        for req in self.requests:
            if target is not None:
                if "?" in target:
                    if req.path_qs != target:
                        continue
                elif req.path != target:
                    continue
            if method is not None and req.method != method.upper():
                continue
            out.append(req)
        return out

    def count(self, target: str | None = None, method: str | None = None) -> int:
        """Requests seen, optionally for a path (any query) / exact path?query / method."""
        return len(self.requests_for(target, method))

    def active(self, path: str) -> int:
        """Requests for ``path`` (any query) the origin is handling right now."""
        return self._active.get(path, 0)

    def peak_concurrency(self, path: str) -> int:
        """The most requests for ``path`` (any query) the origin ever handled at once."""
        return self._peak.get(path, 0)

    def body_for(self, target: str) -> bytes:
        """The body a ``size``-rule for ``target`` produces."""
        behavior = self._rules.get(target, self.default)
        assert behavior.size is not None, "body_for() needs a size rule"
        return make_body(behavior.size, behavior.seed)

    @staticmethod
    def sha256(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    # -- server ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None and self._server.port, "origin not started"
        return f"http://127.0.0.1:{self._server.port}"

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.port
        return int(self._server.port)

    async def start(self) -> Origin:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # The stock TestServer cancels a handler when its client disconnects, which is what
        # we want here: a hanging response dies with the proxy's connection.
        self._server = TestServer(app, host="127.0.0.1", shutdown_timeout=2.0)
        await self._server.start_server()
        return self

    async def close(self) -> None:
        self.release()
        if self._server is not None:
            await self._server.close()

    def _rule_for(self, request: web.Request) -> Behavior:
        return self._rules.get(request.raw_path) or self._rules.get(request.path) or self.default

    async def _wait_gate(self, limit: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                await self._gate.wait()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        active = self._active[path] = self._active.get(path, 0) + 1
        self._peak[path] = max(self._peak.get(path, 0), active)
        try:
            return await self._respond(request)
        finally:
            self._active[path] -= 1

    async def _respond(self, request: web.Request) -> web.StreamResponse:
        body_in = await request.read()
        received = ReceivedRequest(
            request.method,
            request.path,
            # Not request.path_qs: yarl renders a path starting with "//" as "////..." there.
            request.raw_path,
            CIMultiDictProxy(CIMultiDict(request.headers)),
            body_in,
            time.time(),
        )
        if len(self.requests) < _MAX_LOG:
            self.requests.append(received)
        target = request.raw_path
        n = self._per_target[target] = self._per_target.get(target, 0) + 1
        rule = self._rule_for(request)

        if rule.latency:
            await asyncio.sleep(rule.latency)
        if rule.hang:
            await self._wait_gate(rule.hang_limit)

        headers: CIMultiDict[str] = CIMultiDict(rule.headers)
        if self.clock is not None and "Date" not in headers:
            headers["Date"] = email.utils.formatdate(self.clock.wall(), usegmt=True)
        if rule.etag is not None:
            headers["ETag"] = rule.etag
        if rule.last_modified is not None:
            headers["Last-Modified"] = rule.last_modified

        if rule.honor_if_none_match and rule.etag is not None:
            inm = request.headers.get("If-None-Match")
            if inm is not None and (
                inm.strip() == "*" or rule.etag in [t.strip() for t in inm.split(",")]
            ):
                return web.Response(status=304, headers=headers)

        if rule.size is not None:
            body = make_body(rule.size, rule.seed)
            headers.setdefault("Content-Type", "application/octet-stream")
        elif rule.body is not None:
            body = rule.body
            headers.setdefault("Content-Type", "application/octet-stream")
        else:
            body = f"origin body for {target} (request {n})".encode()
            headers.setdefault("Content-Type", "text/plain; charset=utf-8")

        status = rule.status
        if rule.honor_range and status == 200:
            ranged = _one_range(request.headers.get("Range"), len(body))
            if ranged is not None:
                first, last = ranged
                headers["Content-Range"] = f"bytes {first}-{last}/{len(body)}"
                body, status = body[first : last + 1], 206

        if request.method == "HEAD":
            response: web.StreamResponse = web.Response(status=status, headers=headers)
            response.content_length = len(body)
            return response

        if rule.close_mid_body:
            response = web.StreamResponse(status=status, headers=headers)
            response.content_length = len(body)
            await response.prepare(request)
            await response.write(body[: max(1, len(body) // 2)])
            await asyncio.sleep(0.05)  # let the half body reach the wire first
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError()  # nothing more to do for this connection

        if rule.chunked or rule.pause_after is not None or rule.chunk_delay:
            response = web.StreamResponse(status=status, headers=headers)
            if rule.chunked:
                response.enable_chunked_encoding()
            else:
                response.content_length = len(body)
            await response.prepare(request)
            sent = 0
            paused = False
            for start in range(0, len(body), rule.chunk_size):
                chunk = body[start : start + rule.chunk_size]
                await response.write(chunk)
                sent += len(chunk)
                if rule.pause_after is not None and not paused and sent >= rule.pause_after:
                    paused = True
                    await self._wait_gate(rule.hang_limit)
                elif rule.chunk_delay:
                    await asyncio.sleep(rule.chunk_delay)
            await response.write_eof()
            return response

        return web.Response(status=status, headers=headers, body=body)


def _one_range(value: str | None, length: int) -> tuple[int, int] | None:
    """The test origin's own, deliberately simple reading of one satisfiable byte range."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", value or "")
    if match is None or not (match[1] or match[2]) or length == 0:
        return None
    if not match[1]:
        return max(0, length - int(match[2])), length - 1
    first = int(match[1])
    last = min(int(match[2]), length - 1) if match[2] else length - 1
    return (first, last) if first <= last else None
