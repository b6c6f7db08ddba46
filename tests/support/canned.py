"""An origin that answers each target with fixed response bytes, header bytes sent verbatim.

For what the aiohttp test origin cannot send: header values that are not UTF-8 (obs-text),
odd status lines, exact header order. Byte-level faults (cut bodies, stray responses, resets)
are :mod:`support.raworigin`'s.

    origin = await CannedOrigin().start()
    origin.set("/latin", [b"Cache-Control: max-age=300", b"X-Name: caf\\xe9"], b"body")
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["CannedOrigin"]

_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


class CannedOrigin:
    def __init__(self) -> None:
        self.responses: dict[bytes, bytes] = {}
        self.count = 0  # requests answered
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(
        self,
        target: str,
        header_lines: list[bytes],
        body: bytes,
        status_line: bytes = b"HTTP/1.1 200 OK",
    ) -> None:
        """Answer ``target`` (a path: any query; or an exact ``path?query``) with these bytes
        and a Content-Length."""
        head = status_line + b"\r\n" + b"".join(line + b"\r\n" for line in header_lines)
        self.responses[target.encode()] = head + b"Content-Length: %d\r\n\r\n" % len(body) + body

    async def start(self) -> CannedOrigin:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(1000):  # bounded: requests per connection
                async with asyncio.timeout(10):
                    head = await reader.readuntil(b"\r\n\r\n")
                self.count += 1
                target = head.split(b" ", 2)[1]
                answer = self.responses.get(target) or self.responses.get(
                    target.split(b"?")[0], _NOT_FOUND
                )
                writer.write(answer)
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
