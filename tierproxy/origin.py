"""The origin client: one pooled aiohttp session, every fetch under a deadline.

The upstream URL is always ``TIERPROXY_ORIGIN`` + the normalised key material: no client
byte chooses the host. Redirects are passed back, never followed; bodies are forwarded as the
origin encoded them (no decompression).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .policy import end_to_end

__all__ = ["OriginClient", "OriginResponse", "OriginTimeout", "OriginError", "upstream_headers"]

log = logging.getLogger("tierproxy.origin")

_CONDITIONALS = ("if-none-match", "if-modified-since", "if-match", "if-unmodified-since",
                 "if-range", "range")
_ALWAYS_DROP = ("host", "content-length", "expect", "x-forwarded-for", "x-forwarded-proto",
                "x-real-ip")


class OriginTimeout(Exception):
    """The origin did not answer (headers and body) within the budget."""


class OriginError(Exception):
    """The origin refused the connection or sent a broken response."""


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
    def __init__(self, base_url: str, *, max_connections: int, read_timeout: float) -> None:
        self.base_url = base_url
        self.read_timeout = read_timeout
        self._session: aiohttp.ClientSession | None = None
        self._max_connections = max_connections

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            # Bytes as the origin sent them (PITFALLS.md); no cookies kept between clients.
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
    ) -> OriginResponse:
        """Send the request; read the body too when it fits in ``buffer_limit`` bytes.

        Headers, and a body that is buffered, come within ``budget`` seconds or
        :class:`OriginTimeout` is raised. A larger body is left open for streaming.
        """
        session = self._session
        if session is None:
            raise OriginError("origin client is closed")
        url = URL(self.base_url + target, encoded=True)
        request_time = time.time()
        response: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(budget):
                response = await session.request(
                    method, url, headers=headers, data=body, allow_redirects=False,
                    # absolute URL from TIERPROXY_ORIGIN only; no proxy from the environment
                    proxy=None,
                )
                response_time = time.time()
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
                # No length: read up to the limit; past it, stream the rest through.
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
            if isinstance(exc, (aiohttp.ClientError, OSError, ValueError)):
                raise OriginError(f"{type(exc).__name__}: {exc}") from None
            raise

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
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise OriginError(f"{type(exc).__name__}: {exc}") from None
