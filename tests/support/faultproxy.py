"""A small asyncio TCP proxy for fault injection in front of Redis or the origin.

Modes (switchable at any time; they act on new *and* open connections):
  ``pass``      forward bytes both ways
  ``delay``     forward each chunk after ``delay`` seconds
  ``blackhole`` accept, read and drop everything, never answer
  ``reset``     answer with a TCP RST (SO_LINGER 0) - on accept and on the next chunk

``stop_listening()`` closes the listening socket, so new connections are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Literal

from .net import refused_url

__all__ = ["FaultProxy", "Mode", "refused_url"]

Mode = Literal["pass", "delay", "blackhole", "reset"]
_MODES = ("pass", "delay", "blackhole", "reset")


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Conn:
    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None

    def reset(self) -> None:
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)

    def close(self) -> None:
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()


class FaultProxy:
    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        mode: Mode = "pass",
        delay: float = 0.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = 0
        self.mode: Mode = mode
        self.delay = delay
        self.accepted = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._on_client, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def url(self, scheme: str = "http", path: str = "") -> str:
        return f"{scheme}://{self.host}:{self.port}{path}"

    def set_mode(self, mode: Mode, delay: float | None = None) -> None:
        if mode not in _MODES:
            raise ValueError(f"unknown fault mode {mode!r}")
        if delay is not None:
            self.delay = delay
        self.mode = mode
        if mode == "reset":
            for conn in list(self._conns):
                conn.reset()

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    async def stop_listening(self, *, drop_open: bool = False) -> None:
        """Close the listening socket: new connections are refused.

        ``drop_open=True`` also closes the connections already open (the service "went
        away"), so a client's pooled keep-alive connection cannot keep it reachable.
        """
        if drop_open:
            for conn in list(self._conns):
                conn.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
            self._server = None

    async def close(self) -> None:
        self._closing = True
        await self.stop_listening()
        for conn in list(self._conns):
            conn.reset()  # every pump sees EOF/an error and its task ends by itself
        if self._tasks:
            _, stuck = await asyncio.wait(list(self._tasks), timeout=2)
            for task in stuck:  # last resort only
                task.cancel()
            if stuck:
                await asyncio.wait(stuck, timeout=2)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        conn = _Conn(writer)
        self._conns.add(conn)
        try:
            if self.mode == "reset":
                conn.reset()
                return
            if self.mode == "blackhole":
                await self._discard(reader)
                return
            try:
                async with asyncio.timeout(2):
                    up_reader, up_writer = await asyncio.open_connection(
                        self.target_host, self.target_port
                    )
            except (OSError, TimeoutError):
                conn.reset()
                return
            conn.upstream = up_writer
            pumps = [
                asyncio.ensure_future(self._pump(reader, up_writer, conn, upstream=True)),
                asyncio.ensure_future(self._pump(up_reader, writer, conn, upstream=False)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.wait(pumps, timeout=2)
        except asyncio.CancelledError:
            # asyncio.start_server's done-callback logs a cancelled client task as an error
            # on 3.11; a cancellation we caused ourselves in close() ends quietly.
            if not self._closing:
                raise
        except OSError:
            pass
        finally:
            self._conns.discard(conn)
            conn.close()
            self._tasks.discard(task)

    async def _discard(self, reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        conn: _Conn,
        *,
        upstream: bool,
    ) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    return
                mode = self.mode
                if mode == "reset":
                    conn.reset()
                    return
                if mode == "blackhole":
                    continue
                if mode == "delay" and self.delay > 0:
                    await asyncio.sleep(self.delay)
                if upstream:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                dst.write(data)
                await dst.drain()
        except (OSError, RuntimeError):
            return
