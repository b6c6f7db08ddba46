"""A byte-level origin on ``asyncio.start_server``, for framing faults aiohttp won't produce.

Each request head is read (bounded) and handed to the handler scripted for its path; the
handler writes exactly the bytes the test wants - a short body, an unsolicited extra
response, a TCP reset - and says whether the connection stays open for another request.

    origin = await RawOrigin().start()
    async def cut(exchange: Exchange) -> bool:
        exchange.write(head(200, {"Cache-Control": "max-age=60"}) + b"part of a body")
        await exchange.wait_sent()
        exchange.reset()
        return False
    origin.route("/cut", cut)
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

__all__ = ["Exchange", "Handler", "RawOrigin", "head", "response"]

_MAX_LOG = 10_000
_MAX_REQUESTS_PER_CONNECTION = 1_000
_HEAD_TIMEOUT = 30.0


def head(status: int = 200, headers: Mapping[str, str] | None = None) -> bytes:
    """A response head, exactly these headers (no Content-Length unless given)."""
    lines = [f"HTTP/1.1 {status} X"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def response(body: bytes, headers: Mapping[str, str] | None = None, status: int = 200) -> bytes:
    """A whole response framed by Content-Length."""
    return head(status, {**(headers or {}), "Content-Length": str(len(body))}) + body


@dataclass
class Exchange:
    """One request on one connection; ``connection`` numbers the connections from 1."""

    origin: RawOrigin
    target: str
    connection: int
    writer: asyncio.StreamWriter

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        async with asyncio.timeout(10):
            await self.writer.drain()

    def unacked(self) -> int:
        """Bytes written and not yet acknowledged by the peer (Linux TIOCOUTQ)."""
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return 0
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
        return int(struct.unpack("i", raw)[0])

    async def wait_sent(self, timeout: float = 5.0) -> None:
        """Until everything written so far is in the peer's kernel (bounded poll)."""
        await self.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.unacked() > 0:
            if loop.time() >= deadline:
                raise AssertionError(f"peer did not take {self.unacked()} bytes in {timeout}s")
            await asyncio.sleep(0.005)

    def reset(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0, then abort)."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[Exchange], Awaitable[bool]]  # True: read the next request on it


async def _default(exchange: Exchange) -> bool:
    exchange.write(response(f"raw origin body for {exchange.target}".encode()))
    return True


class RawOrigin:
    def __init__(self) -> None:
        self.port = 0
        self.targets: list[str] = []  # every request target, in arrival order
        self.connections = 0
        self._routes: dict[str, Handler] = {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def route(self, path: str, handler: Handler) -> None:
        self._routes[path] = handler

    def count(self, target: str) -> int:
        return sum(1 for seen in self.targets if seen == target)

    async def start(self) -> RawOrigin:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        connection = self.connections
        try:
            for _ in range(_MAX_REQUESTS_PER_CONNECTION):
                async with asyncio.timeout(_HEAD_TIMEOUT):
                    raw = await reader.readuntil(b"\r\n\r\n")
                target = raw.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
                if len(self.targets) < _MAX_LOG:
                    self.targets.append(target)
                path = target.split("?", 1)[0]
                handler = self._routes.get(path, _default)
                keep = await handler(Exchange(self, target, connection, writer))
                if not keep or writer.transport.is_closing():
                    break
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
