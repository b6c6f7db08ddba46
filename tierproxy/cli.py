"""``tierproxy serve``: settings from env (flags override), both listeners, graceful stop.

``tierproxy demo`` runs the same proxy in front of a built-in slow origin (tierproxy.demo) on
loopback; ``tierproxy demo-origin`` runs that origin alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import importlib.metadata
import logging
import os
import resource
import signal
import sys
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from .admin import ADMIN_HANDLER_ARGS, build_admin_app, build_group_admin_app
from .aiohttp_internals import (
    CappedRunner,
    ConnectionCap,
    ConnectorUnavailable,
    connector_internals_available,
    missing_internals,
    missing_serving_internals,
    unhardened_message,
)
from .config import ConfigError, Settings, load_settings
from .demo import BindError, DemoOrigin, add_demo_commands, bind_loopback
from .demo import instructions as demo_instructions
from .demo import run_origin as run_demo_origin
from .listener import (
    ADMIN_BACKLOG,
    ADMIN_MAX_CONNECTIONS,
    client_connection_cap,
    counted_cap,
    listen_backlog,
)
from .logs import configure as configure_logging
from .server import STATE, build_app, make_runner
from .tiers.sqlite import SQLiteOpenError
from .workers import GroupStartError, Supervisor, WorkerSide, bind_proxy_socket

__all__ = ["main"]

log = logging.getLogger("tierproxy")

# flag -> env var; env is the primary interface, a flag wins over the environment.
_FLAGS = {
    "origin": "TIERPROXY_ORIGIN",
    "host": "TIERPROXY_HOST",
    "port": "TIERPROXY_PORT",
    "admin_port": "TIERPROXY_ADMIN_PORT",
    "redis_url": "TIERPROXY_REDIS_URL",
    "sqlite_path": "TIERPROXY_SQLITE_PATH",
    "log_level": "TIERPROXY_LOG_LEVEL",
}


class StartupError(Exception):
    """Start-up could not complete; the message is one line for the operator."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tierproxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy (configured by TIERPROXY_* env vars)")
    for flag, env in _FLAGS.items():
        serve.add_argument(
            f"--{flag.replace('_', '-')}", dest=flag, metavar=env, help=f"overrides {env}"
        )
    add_demo_commands(sub)
    # One worker of a group (TIERPROXY_WORKERS > 1), started by its supervisor only.
    worker = sub.add_parser("_worker")
    worker.add_argument("--port-fd", type=int, required=True)
    worker.add_argument("--admin-socket", required=True)
    worker.add_argument("--parent-fd", type=int, required=True)
    return parser


def _setup_logging(settings: Settings) -> None:
    # Every record goes through a bounded queue to a logging thread that writes stderr, as
    # JSON lines or text (tierproxy.logs); the proxy's access log is on tierproxy.access.
    configure_logging(settings.log_level, settings.log_format)
    # aiohttp's per-request access log is replaced by the proxy's own (issue: operating it).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _raise_nofile_limit() -> tuple[int, int]:
    """Lift the soft RLIMIT_NOFILE to the hard one (the default soft 1,024 is far too few for
    a proxy); return (before, now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:  # Linux refuses more than fs.nr_open
            with open("/proc/sys/fs/nr_open") as nr_open:
                target = int(nr_open.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft, soft
        return soft, target
    return soft, soft


async def _start_site(
    runner: web.AppRunner, host: str, port: int, env_name: str, backlog: int
) -> int:
    site = web.TCPSite(runner, host, port, backlog=backlog)
    try:
        await site.start()
    except OSError as exc:
        reason = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise StartupError(f"{env_name}={port} on {host}: cannot listen: {reason}", 1) from None
    # The bound port (0 asks the OS for one): the last address the runner got.
    addresses = runner.addresses
    return int(addresses[-1][1]) if addresses else port


async def serve(
    settings: Settings,
    nofile: int,
    cap: int,
    on_listening: Callable[[int, int], None] | None = None,
    worker: WorkerSide | None = None,
) -> int:
    """One serving process: the whole proxy, or (``worker``) one worker of a group, which
    accepts on the socket its supervisor bound and answers admin requests on a unix socket."""
    app = build_app(settings)
    admin_app = build_admin_app(app)
    if worker is not None:
        worker.add_routes(admin_app, app[STATE])
    # aiohttp's runner with hardened connections (tierproxy.aiohttp_internals) that answer
    # fresh hits themselves (tierproxy.hits), at most TIERPROXY_MAX_CLIENT_CONNECTIONS of them.
    runner = make_runner(
        app, client_connections=cap, access_log=None, shutdown_timeout=settings.shutdown_timeout
    )
    # The admin port has its own small cap, inside the descriptor reserve: it always answers.
    admin_cap = counted_cap(app[STATE].metrics, ADMIN_MAX_CONNECTIONS, "admin")
    admin_runner = CappedRunner(
        admin_app,
        cap=admin_cap,
        handler_args=ADMIN_HANDLER_ARGS,
        access_log=None,
        shutdown_timeout=1.0,
    )
    try:
        try:
            await runner.setup()  # opens tiers and the origin session (cleanup_ctx)
        except ConnectorUnavailable as exc:
            raise StartupError(str(exc), 2) from None
        except SQLiteOpenError as exc:
            # Only an L3 path that can never work as configured (its directory is missing, or
            # it is a directory): a locked, unreadable or corrupt file or a full disk starts
            # the proxy with L3 unavailable instead (tierproxy.tiers.sqlite), since exiting
            # would only make a supervisor restart it in a loop.
            raise StartupError(str(exc), 2) from None
        await admin_runner.setup()
        if worker is not None:
            try:
                await worker.proxy_site(runner, listen_backlog(nofile)).start()
            except OSError as exc:
                raise StartupError(
                    f"TIERPROXY_PORT={settings.port}: cannot listen: {exc}", 1
                ) from None
            await worker.admin_site(admin_runner).start()
            port, admin_port = settings.port, settings.admin_port
        else:
            port = await _start_site(
                runner, settings.host, settings.port, "TIERPROXY_PORT", listen_backlog(nofile)
            )
            admin_port = await _start_site(
                admin_runner,
                settings.admin_host,
                settings.admin_port,
                "TIERPROXY_ADMIN_PORT",
                ADMIN_BACKLOG,
            )
    except StartupError:
        await admin_runner.cleanup()
        await runner.cleanup()
        raise

    # Everything set up so far lives as long as the process: move it out of the cyclic
    # collector's view, so a full collection while serving scans only what requests made
    # (a full collection over the start-up heap is a pause of tens of ms).
    gc.collect()
    gc.freeze()
    log.info(
        "tierproxy serving %s on http://%s:%d (admin on http://%s:%d)",
        settings.origin,
        settings.host,
        port,
        settings.admin_host,
        admin_port,
    )
    if on_listening is not None:
        on_listening(port, admin_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if worker is not None:
        worker.started(app[STATE], stop)
    await stop.wait()
    # Unready first, so load balancers stop sending while in-flight requests finish.
    app[STATE].ready = False
    log.info("stopping: finishing in-flight requests, draining background writes")
    # Order: stop accepting and finish in-flight requests, drain backfills, close pools
    # (all inside runner.cleanup via cleanup_ctx); the admin listener goes last.
    await runner.cleanup()
    if worker is not None:
        await worker.stopped()
    await admin_runner.cleanup()
    log.info("stopped")
    return 0


async def serve_group(settings: Settings, env: dict[str, str], nofile: int) -> int:
    """``TIERPROXY_WORKERS`` > 1: bind the proxy port, start and supervise the workers, serve
    the group's admin port, stop them all on SIGTERM/SIGINT (tierproxy.workers)."""
    try:
        sock = bind_proxy_socket(settings.host, settings.port)
    except GroupStartError as exc:
        raise StartupError(str(exc), exc.exit_code) from None
    group = Supervisor(settings.workers, env, sock, settings.shutdown_timeout)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Capped like one process's admin port (the group has no proxy metrics to count in).
    admin_runner = CappedRunner(
        build_group_admin_app(group),
        cap=ConnectionCap(ADMIN_MAX_CONNECTIONS, "admin"),
        handler_args=ADMIN_HANDLER_ARGS,
        access_log=None,
        shutdown_timeout=1.0,
    )
    try:
        starting = asyncio.create_task(group.start())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # a signal during start-up
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, GroupStartError):
                await starting
            await group.stop()
            return 0
        stopped.cancel()
        try:
            starting.result()
        except GroupStartError as exc:
            raise StartupError(str(exc), exc.exit_code) from None
        await admin_runner.setup()
        try:
            admin_port = await _start_site(
                admin_runner,
                settings.admin_host,
                settings.admin_port,
                "TIERPROXY_ADMIN_PORT",
                ADMIN_BACKLOG,
            )
        except StartupError:
            await group.stop()
            raise
        log.info(
            "tierproxy serving %s on http://%s:%d with %d workers (admin on http://%s:%d)",
            settings.origin,
            settings.host,
            sock.getsockname()[1],
            settings.workers,
            settings.admin_host,
            admin_port,
        )
        await stop.wait()
        log.info("stopping: every worker drains within %.1fs", group.stop_timeout)
        await group.stop()
        log.info("stopped")
        return 0
    finally:
        await admin_runner.cleanup()
        group.close()


Serve = Callable[[Settings, int, int], Coroutine[Any, Any, int]]


def _run(run: Serve, settings: Settings, nofile: int, cap: int) -> int:
    # Which code serves (a checkout, an installed package): a before/after comparison, or an
    # operator, can tell two builds apart by it.
    log.info("tierproxy code: %s", Path(__file__).resolve().parent)
    try:
        import uvloop
    except ImportError:
        log.info("event loop: asyncio (install tierproxy[uvloop] for uvloop)")
        return asyncio.run(run(settings, nofile, cap))
    log.info("event loop: uvloop %s", importlib.metadata.version("uvloop"))
    return uvloop.run(run(settings, nofile, cap))


def _demo(args: argparse.Namespace, env: dict[str, str]) -> int:
    """``tierproxy demo``: the demo origin and the proxy in one process, both on loopback."""
    try:
        origin_sock = bind_loopback(args.origin_port, "demo origin port")
    except BindError as exc:
        print(f"tierproxy: cannot start: {exc}", file=sys.stderr)
        return 1
    origin = DemoOrigin(args.delay, args.max_age)
    origin_url = f"http://127.0.0.1:{origin_sock.getsockname()[1]}"
    with origin_sock, tempfile.TemporaryDirectory(prefix="tierproxy-demo-") as tmp:
        sqlite_path = str(Path(tmp) / "cache.sqlite3")
        env.update(
            TIERPROXY_ORIGIN=origin_url,
            TIERPROXY_HOST="127.0.0.1",
            TIERPROXY_ADMIN_HOST="127.0.0.1",
            TIERPROXY_SQLITE_PATH=sqlite_path,
        )
        # Quiet unless asked: the curl output says what each request was.
        env.setdefault("TIERPROXY_LOG_LEVEL", "WARNING")
        redis = " + Redis" if env.get("TIERPROXY_REDIS_URL") else ""
        tiers = f"L1 memory{redis} + SQLite in {sqlite_path}"

        def listening(port: int, admin_port: int) -> None:
            text = demo_instructions(
                proxy_url=f"http://127.0.0.1:{port}",
                admin_url=f"http://127.0.0.1:{admin_port}",
                origin_url=origin_url,
                origin=origin,
                tiers=tiers,
            )
            print(text, flush=True)

        async def run(settings: Settings, nofile: int, cap: int) -> int:
            runner = await origin.start(origin_sock)
            try:
                return await serve(settings, nofile, cap, on_listening=listening)
            finally:
                await runner.cleanup()

        return _start(env, run)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo-origin":
        return run_demo_origin(args.host, args.port, args.delay, args.max_age)
    env = dict(os.environ)
    for flag, env_name in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            env[env_name] = value
    if args.command == "demo":
        return _demo(args, env)
    if args.command == "_worker":
        side = WorkerSide(args.port_fd, args.admin_socket, args.parent_fd)

        async def run_worker(settings: Settings, nofile: int, cap: int) -> int:
            return await serve(settings, nofile, cap, worker=side)

        return _start(env, run_worker)
    if env.get("TIERPROXY_WORKERS", "1").strip() not in ("", "1"):

        async def run_group(settings: Settings, nofile: int, cap: int) -> int:
            if settings.workers == 1:  # "auto" on one CPU
                return await serve(settings, nofile, cap)
            return await serve_group(settings, env, nofile)

        return _start(env, run_group)
    return _start(env, serve)


def _start(env: dict[str, str], run: Serve) -> int:
    """Settings from ``env``, the start-up checks, then ``run`` on the event loop."""
    try:
        settings = load_settings(env)
    except ConfigError as exc:
        print(f"tierproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    serving = missing_serving_internals()
    if serving:
        # No opt-out: every response and runner needs these (a head with non-UTF-8 bytes
        # written byte-exact, the proxy's own server built at all).
        print(
            f"tierproxy: cannot start: aiohttp {aiohttp.__version__} lacks internals every "
            f"response needs ({', '.join(serving)}); install the aiohttp version tierproxy "
            "pins (>=3.14.4,<3.15)",
            file=sys.stderr,
        )
        return 2
    missing = missing_internals()
    if missing and not settings.allow_unhardened:
        # Protections never turn off silently: without the internals the hardened listener
        # uses (tierproxy.aiohttp_internals) the proxy port runs on aiohttp's own connection
        # handler (unhardened_message says what that loses).
        print(f"tierproxy: cannot start: {unhardened_message(missing)}", file=sys.stderr)
        return 2
    if not connector_internals_available():
        # No opt-out: without these hooks a pooled origin connection holding a stray response
        # could be reused, and its bytes served (and cached) as another request's answer.
        print(
            f"tierproxy: cannot start: aiohttp {aiohttp.__version__} lacks the connector "
            "internals tierproxy uses to keep origin connections clean; install the aiohttp "
            "version tierproxy pins (>=3.14.4,<3.15)",
            file=sys.stderr,
        )
        return 2
    nofile_before, nofile = _raise_nofile_limit()
    try:
        cap = client_connection_cap(settings, nofile)
    except ValueError as exc:
        print(f"tierproxy: cannot start: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings)
    log.info(
        "file descriptors: RLIMIT_NOFILE %d (soft limit was %d); client connections capped at %d",
        nofile,
        nofile_before,
        cap,
    )
    try:
        return _run(run, settings, nofile, cap)
    except StartupError as exc:
        print(f"tierproxy: cannot start: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
