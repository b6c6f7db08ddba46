"""Loopback networking helpers: free ports, a canary listener, raw HTTP/1.1 exchanges."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field

from multidict import CIMultiDict

__all__ = [
    "CanaryListener",
    "RawConnection",
    "RawResponse",
    "free_port",
    "raw_http_exchange",
    "refused_url",
]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is listening on right now (bind 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def refused_url(scheme: str = "http") -> str:
    """A loopback URL whose port has no listener: connecting to it is refused at once."""
    return f"{scheme}://127.0.0.1:{free_port()}"


class CanaryListener:
    """A TCP listener that counts connections (e.g. on 127.0.0.2) and answers a tiny 200.

    Used to prove that a request target or Host header naming it never makes the proxy
    connect there: ``connections`` must stay 0.
    """

    def __init__(self, host: str = "127.0.0.2") -> None:
        self.host = host
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> CanaryListener:
        self._server = await asyncio.start_server(self._on_client, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            async with asyncio.timeout(2):
                await reader.readuntil(b"\r\n\r\n")
            body = b"canary"
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (len(body), body)
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: bytes = b""
    raw: bytes = b""


def _decode_chunked(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    for _ in range(1_000_000):  # bounded: at most this many chunks
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            break
        size = int(data[pos:eol].split(b";")[0].strip() or b"0", 16)
        pos = eol + 2
        if size == 0:
            break
        out += data[pos : pos + size]
        pos += size + 2
    return bytes(out)


async def raw_http_exchange(
    host: str, port: int, request: bytes, *, timeout: float = 5.0
) -> RawResponse:
    """Send ``request`` bytes verbatim and read the answer until the server closes.

    The request should carry ``Connection: close``. Bounded by ``timeout``.
    """
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request)
            await writer.drain()
            raw = await reader.read(-1)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines or not lines[0].startswith("HTTP/"):
        raise AssertionError(f"not an HTTP response: {raw[:200]!r}")
    _version, status, *reason = lines[0].split(" ", 2)
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        body = _decode_chunked(body)
    return RawResponse(int(status), reason[0] if reason else "", headers, body, raw)


class RawConnection:
    """One TCP connection to the proxy; every read is bounded."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> RawConnection:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_until_closed(self, timeout: float = 5.0) -> bytes:
        """Everything the proxy sends until it closes; AssertionError if it doesn't."""
        chunks: list[bytes] = []
        try:
            async with asyncio.timeout(timeout):
                while chunk := await self.reader.read(65536):
                    chunks.append(chunk)
        except TimeoutError:
            raise AssertionError(
                f"proxy kept the connection open for {timeout}s; got {b''.join(chunks)[:300]!r}"
            ) from None
        except ConnectionResetError:
            pass
        return b"".join(chunks)

    async def read_response_head(self, timeout: float = 5.0) -> bytes:
        async with asyncio.timeout(timeout):
            return await self.reader.readuntil(b"\r\n\r\n")

    async def read_response(self, timeout: float = 5.0) -> bytes:
        """One whole response with a Content-Length body (what the proxy sends for these)."""
        async with asyncio.timeout(timeout):
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            return head + await self.reader.readexactly(length)

    def is_closed_by_peer(self) -> bool:
        return self.reader.at_eof()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
