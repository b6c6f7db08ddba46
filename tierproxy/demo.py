"""The demo origin: what ``tierproxy demo`` puts behind the proxy, and ``tierproxy demo-origin``.

A slow origin on purpose, so a cache hit is visibly faster than a miss. Every ``GET``/``HEAD``
is a page answered after ``delay`` seconds with ``Cache-Control: max-age=<max_age>,
stale-if-error=600`` (RFC 9111 §5.2.2.1, RFC 5861 §4): fresh for a few seconds, then servable
stale while the origin fails. ``POST /_demo/fail`` toggles failures: while they are on, every
page is a ``503``, and the proxy answers with its stale copy instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import errno
import signal
import socket
import sys
from typing import Any, Protocol

from aiohttp import web

__all__ = [
    "DEFAULT_DELAY",
    "DEFAULT_MAX_AGE",
    "FAIL_PATH",
    "STALE_IF_ERROR",
    "BindError",
    "DemoOrigin",
    "add_demo_commands",
    "bind_loopback",
    "bind_socket",
    "instructions",
    "run_origin",
]

DEFAULT_DELAY = 0.3  # seconds before each page: a miss is slow, a hit is not
DEFAULT_MAX_AGE = 5  # seconds a page is fresh: short enough to watch it go stale
STALE_IF_ERROR = 600  # seconds past freshness a copy may stand in for a failing origin
FAIL_PATH = "/_demo/fail"


class BindError(Exception):
    """A listening socket could not be opened; the message is one line for the operator."""


class DemoOrigin:
    """The demo origin's behaviour and state: the failure switch and a request counter."""

    def __init__(self, delay: float = DEFAULT_DELAY, max_age: int = DEFAULT_MAX_AGE) -> None:
        self.delay = delay
        self.max_age = max_age
        self.failing = False
        self.pages = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(FAIL_PATH, self._toggle)
        app.router.add_get("/{path:.*}", self._page)
        return app

    async def _page(self, request: web.Request) -> web.Response:
        self.pages += 1
        number = self.pages
        await asyncio.sleep(self.delay)
        if self.failing:
            return web.Response(
                status=503,
                text=f"the demo origin is failing on purpose (POST {FAIL_PATH} to heal it)\n",
                content_type="text/plain",
                headers={"Cache-Control": "no-store"},
            )
        made = datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S")
        return web.Response(
            text=f"hello from the demo origin: {request.path}, page #{number}, made at {made} UTC\n",
            content_type="text/plain",
            headers={"Cache-Control": f"max-age={self.max_age}, stale-if-error={STALE_IF_ERROR}"},
        )

    async def _toggle(self, request: web.Request) -> web.Response:
        self.failing = not self.failing
        state = "on: pages now answer 503" if self.failing else "off: pages answer 200 again"
        return web.Response(
            text=f"demo origin failures {state}\n",
            content_type="text/plain",
            headers={"Cache-Control": "no-store"},
        )

    async def start(self, sock: socket.socket) -> web.AppRunner:
        """Serve on an already bound, listening socket; the caller cleans the runner up."""
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        return runner


def bind_socket(host: str, port: int, what: str) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: any free port), or :class:`BindError`."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"{what} {host}:{port}: cannot listen: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        reason = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise BindError(f"{what} {host}:{port}: cannot listen: {reason}") from None
    sock.setblocking(False)
    return sock


def bind_loopback(port: int, what: str) -> socket.socket:
    return bind_socket("127.0.0.1", port, what)


def instructions(
    *, proxy_url: str, admin_url: str, origin_url: str, origin: DemoOrigin, tiers: str
) -> str:
    """What ``tierproxy demo`` prints once both listen: the three curl lines to try."""
    page = f"{proxy_url}/hello"
    delay_ms = round(origin.delay * 1000)
    cache_control = f"max-age={origin.max_age}, stale-if-error={STALE_IF_ERROR}"
    lines = [
        "tierproxy demo",
        f"  origin  {origin_url}  (answers after {delay_ms} ms, Cache-Control: {cache_control})",
        f"  proxy   {proxy_url}  ({tiers}; admin {admin_url})",
        "",
        "In another terminal:",
        "",
        f"  curl -si {page}",
        f"      twice: X-Cache: MISS ({delay_ms} ms, from the origin), then HIT-L1 (at once)",
        f"  curl -si -X POST {origin_url}{FAIL_PATH}",
        "      the origin now answers 503 to everything (run it again to heal it)",
        f"  curl -si {page}",
        f"      once the copy is {origin.max_age} s old: X-Cache: STALE-L1, not the 503",
        "",
        "Ctrl-C stops both.",
    ]
    return "\n".join(lines)


async def _serve_origin(origin: DemoOrigin, sock: socket.socket, url: str) -> int:
    runner = await origin.start(sock)
    try:
        print(
            f"tierproxy demo origin on {url}: pages after {round(origin.delay * 1000)} ms, "
            f"max-age={origin.max_age}; POST {FAIL_PATH} toggles failures",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


def run_origin(host: str, port: int, delay: float, max_age: int) -> int:
    """``tierproxy demo-origin``: the demo origin alone (e.g. in a container), until a signal."""
    try:
        sock = bind_socket(host, port, "demo origin")
    except BindError as exc:
        print(f"tierproxy: cannot start: {exc}", flush=True, file=sys.stderr)
        return 1
    bound = sock.getsockname()
    url = f"http://{host}:{bound[1]}"
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_serve_origin(DemoOrigin(delay, max_age), sock, url))
    return 0


class Subcommands(Protocol):
    """What ``ArgumentParser.add_subparsers()`` returns, as far as this module uses it."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


def add_demo_commands(sub: Subcommands) -> None:
    """The ``demo`` and ``demo-origin`` subcommands' arguments (tierproxy.cli runs them)."""
    demo = sub.add_parser(
        "demo",
        help="the proxy in front of a built-in slow origin on loopback, to try it with curl",
        description="Starts a demo origin (slow on purpose, short max-age, a failure switch) "
        "and the proxy in front of it, both on 127.0.0.1 (L1 + SQLite in a temporary "
        "directory; Redis too when TIERPROXY_REDIS_URL is set), and prints curl lines "
        "that show MISS, HIT and STALE. Ctrl-C stops both.",
    )
    # Strings, like serve's flags: they become TIERPROXY_PORT/TIERPROXY_ADMIN_PORT.
    demo.add_argument("--port", dest="port", metavar="PORT", help="proxy port (8080)")
    demo.add_argument("--admin-port", dest="admin_port", metavar="PORT", help="admin port (8081)")
    demo.add_argument(
        "--origin-port", type=_port, default=0, metavar="PORT", help="demo origin port (a free one)"
    )
    _origin_arguments(demo)
    origin = sub.add_parser(
        "demo-origin",
        help="the demo origin alone (e.g. behind `tierproxy serve` in docker-compose)",
        description="The origin `tierproxy demo` starts, without the proxy: every GET is a "
        f"page after --delay seconds with a short max-age; POST {FAIL_PATH} toggles failures.",
    )
    origin.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    origin.add_argument("--port", type=_port, default=9000, help="port to listen on (9000)")
    _origin_arguments(origin)


def _origin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--delay",
        type=_delay,
        default=DEFAULT_DELAY,
        help=f"seconds before each page ({DEFAULT_DELAY})",
    )
    parser.add_argument(
        "--max-age",
        type=_max_age,
        default=DEFAULT_MAX_AGE,
        help=f"max-age of each page, seconds ({DEFAULT_MAX_AGE})",
    )


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: expected 0-65535")
    return port


def _delay(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 60.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid: expected seconds, 0-60")
    return value


def _max_age(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid: expected seconds, 1-86400")
    return value
