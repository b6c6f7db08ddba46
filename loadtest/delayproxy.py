"""A delay line in front of Redis, for the timeout benchmarks (``loadtest/timeouts.py``).

    python -m loadtest.delayproxy --port 7001 --target-port 7000 --control-port 7002 \\
        --delay-ms 2 --stall-ms 50 --stall-every 1.0

Forwards TCP both ways between 127.0.0.1:``--port`` and 127.0.0.1:``--target-port``. Requests
go through at once; every chunk of a reply is held until ``delay`` after it arrived, in order
(a delay line, not a sleep per chunk: a pipelined connection keeps its throughput). Stalls, to
model a Redis that pauses now and then (a fork, a slow command, a busy core): at random
moments (exponential gaps of mean ``--stall-every`` seconds; 0 = none) nothing is delivered on
any connection for ``--stall-ms``, and everything that arrived meanwhile goes out after it.

Knobs change at run time: ``GET /__control`` (JSON) and ``POST /__control`` with any of
``{"delay_ms": .., "stall_ms": .., "stall_every": ..}`` on ``--control-port``; ``GET
/__stats`` counts connections, chunks and stalls. Loopback only; exits by itself after
``--max-lifetime`` seconds. (tests/support/faultproxy.py is the test suite's fault proxy:
modes, resets, black holes; this one is only a delay line, run as its own process so the
load generator's CPU does not delay it.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
from typing import Any

from aiohttp import web

LOOPBACK = "127.0.0.1"


class DelayLine:
    def __init__(
        self, target_port: int, delay_ms: float, stall_ms: float, stall_every: float, seed: int
    ) -> None:
        self.target_port = target_port
        self.delay_ms = delay_ms
        self.stall_ms = stall_ms
        self.stall_every = stall_every
        self.rng = random.Random(seed)
        self.stall_until = 0.0
        self.stats = {"connections": 0, "chunks": 0, "stalls": 0}
        self._wake = asyncio.Event()

    def knobs(self) -> dict[str, float]:
        return {
            "delay_ms": self.delay_ms,
            "stall_ms": self.stall_ms,
            "stall_every": self.stall_every,
        }

    def set(self, values: dict[str, Any]) -> None:
        for name in ("delay_ms", "stall_ms", "stall_every"):
            if name in values:
                value = float(values[name])
                if not 0 <= value <= 60_000:
                    raise ValueError(f"{name} must be between 0 and 60000, got {value}")
                setattr(self, name, value)
        self._wake.set()  # a new stall_every applies now

    async def stalls(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            gap = self.rng.expovariate(1 / self.stall_every) if self.stall_every > 0 else 3600.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(gap):
                    await self._wake.wait()
                    continue  # knobs changed: draw again
            if self.stall_every > 0 and self.stall_ms > 0:
                self.stall_until = loop.time() + self.stall_ms / 1000
                self.stats["stalls"] += 1

    async def on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats["connections"] += 1
        try:
            async with asyncio.timeout(2):
                up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.target_port)
        except (OSError, TimeoutError):
            writer.close()
            return
        tasks = [
            asyncio.ensure_future(self._forward(reader, up_writer)),
            asyncio.ensure_future(self._delayed(up_reader, writer)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=2)
            writer.close()
            up_writer.close()

    async def _forward(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()

    async def _delayed(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        last_due = 0.0

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                while (wait := max(due, self.stall_until) - loop.time()) > 0:
                    await asyncio.sleep(wait)  # a stall that began meanwhile holds it too
                dst.write(data)
                await dst.drain()

        writer = asyncio.ensure_future(deliver())
        try:
            while data := await src.read(65536):
                self.stats["chunks"] += 1
                last_due = max(loop.time() + self.delay_ms / 1000, last_due)
                queue.put_nowait((last_due, data))
                if writer.done():
                    return
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await writer


async def serve(ns: argparse.Namespace) -> None:
    line = DelayLine(ns.target_port, ns.delay_ms, ns.stall_ms, ns.stall_every, ns.seed)
    server = await asyncio.start_server(line.on_client, LOOPBACK, ns.port)

    async def get_control(request: web.Request) -> web.Response:
        return web.json_response(line.knobs())

    async def post_control(request: web.Request) -> web.Response:
        try:
            line.set(await request.json())
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(line.knobs())

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({**line.stats, **line.knobs()})

    app = web.Application()
    app.router.add_get("/__control", get_control)
    app.router.add_post("/__control", post_control)
    app.router.add_get("/__stats", stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, ns.control_port).start()
    stalls = asyncio.ensure_future(line.stalls())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(ns.max_lifetime):
            await stop.wait()
    stalls.cancel()
    server.close()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.delayproxy", description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--target-port", type=int, required=True)
    ap.add_argument("--control-port", type=int, required=True)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--stall-ms", type=float, default=0.0)
    ap.add_argument("--stall-every", type=float, default=0.0, help="mean seconds between stalls")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-lifetime", type=float, default=3600.0)
    ns = ap.parse_args(argv)
    if 6379 in (ns.port, ns.target_port):
        ap.error("refusing port 6379 (the machine's own Redis)")
    asyncio.run(serve(ns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
