"""``TIERPROXY_WORKERS=N``: N serving processes on one port, supervised by the parent.

**The listening sockets: ``SO_REUSEPORT``.** The parent binds the proxy port with
``SO_REUSEPORT`` and holds it without listening: ``TIERPROXY_PORT=0`` means one port for the
whole group, and no other program can take the port while workers come and go. Each worker
binds its own socket to that address and listens (:func:`listen_like`); Linux spreads new
connections over the listening sockets by a hash of the connection. A socket bound once by the
parent and inherited by every worker would not lose the backlog of a worker that dies, but
it balanced badly when measured: the worker that wakes first accepts the whole backlog, so
under light or bursty load one worker took every connection. With ``SO_REUSEPORT`` the
connections queued on a worker that is killed are reset; later ones go to live workers.

**Workers** run ``python -m tierproxy _worker``: the same proxy as one process (its own L1,
the shared L2 and L3), with its admin app on a unix socket in the group's private directory
(mode 0700) instead of the admin port. They stop when told (SIGTERM/SIGINT) or when the
parent is gone (the read end of a pipe whose write end only the parent holds reaches EOF).

**The parent** supervises: it starts the first worker and waits until it is ready (it
creates the L3 file and its schema alone), then the others; a worker that exits is started
again, after a capped exponential backoff with jitter while it keeps dying soon after start.
It serves the one admin port (:func:`tierproxy.admin.build_group_admin_app`): ``/metrics``
sums every worker's metrics (prometheus_client's multiprocess mode, in a private
``PROMETHEUS_MULTIPROC_DIR`` it creates and removes); ``/readyz`` asks each worker's unix
socket (ready when every worker is); ``POST /purge`` is handed to one worker. SIGTERM or
SIGINT: every worker gets SIGTERM and drains; one still running after
``TIERPROXY_SHUTDOWN_TIMEOUT`` is killed; the parent exits 0.

**Purges** reach every worker's L1: with Redis through the replicas' invalidation channel
(each worker is a replica, :mod:`tierproxy.invalidation`); without Redis the worker that took
the purge sends it to every other worker's unix socket (:func:`purge_siblings`), which purges
its L1 and the shared L3 again (after any write of its own that landed there since the first
worker purged it), then - once every worker answered - a second time, L1 only (a copy such a
write put in L3 meanwhile may have been read into another worker's L1), before the PURGE
answers (the two rounds: :meth:`tierproxy.invalidation.Invalidation.purge`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, multiprocess

from .backoff import SessionBackoff
from .invalidation import PurgeOrder, apply_order
from .state import ProxyState

__all__ = [
    "GroupStartError",
    "Supervisor",
    "WorkerSide",
    "bind_proxy_socket",
    "listen_like",
]

log = logging.getLogger("tierproxy.workers")

_SOCKET_PATTERN = "worker-{slot}.sock"
_READY_TIMEOUT = 60.0  # a worker not ready this long after it started: start-up failed
_ASK_TIMEOUT = 2.0  # one question to a worker over its unix socket
_PURGE_RELAY_TIMEOUT = 10.0  # one worker's L1 purge (relayed)
_BACKOFF_BASE = 0.2
_BACKOFF_CAP = 10.0
_STABLE_AFTER = 10.0  # a worker that lived this long resets its backoff
_SYNC_INTERVAL = 1.0  # a worker writes its process-local metrics this often
_RELAY_PATH = "/_worker/purge"
_CLOSE_ALLOWANCE = 5.0  # a stopping worker closing its tiers and pools, after its drain


class GroupStartError(Exception):
    """The group could not start; the message is one line for the operator."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def bind_proxy_socket(host: str, port: int) -> socket.socket:
    """The proxy port, bound with ``SO_REUSEPORT`` but not listening: it holds the port for
    the group (``TIERPROXY_PORT=0`` picks one) while the workers come and go."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise GroupStartError(f"TIERPROXY_HOST={host}: cannot resolve: {exc}", 1) from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        _reuse(sock)
        sock.bind(address)
        # Another process (without SO_REUSEPORT, or another user) holding the port would
        # only be noticed by the workers: try listening once, here, and stop again.
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            _reuse(probe)
            probe.bind(sock.getsockname())
            probe.listen(1)
        finally:
            probe.close()
    except OSError as exc:
        sock.close()
        reason = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise GroupStartError(
            f"TIERPROXY_PORT={port} on {host}: cannot listen: {reason}", 1
        ) from None
    return sock


def _reuse(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


def listen_like(held: socket.socket, backlog: int) -> socket.socket:
    """A worker's own listening socket on the port ``held`` (the supervisor's) holds."""
    sock = socket.socket(held.family, socket.SOCK_STREAM)
    try:
        _reuse(sock)
        sock.bind(held.getsockname())
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _unix_session(path: str, timeout: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=path),
        timeout=aiohttp.ClientTimeout(total=timeout),
    )


async def _ask(path: str, method: str, target: str, timeout: float, **kwargs: Any) -> Any:
    """(status, parsed JSON body or text) of one request to a worker's unix socket."""
    async with (
        _unix_session(path, timeout) as session,
        session.request(method, f"http://worker{target}", **kwargs) as resp,
    ):
        text = await resp.text()
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text
        return resp.status, body


# -- the worker side ------------------------------------------------------------------------


class WorkerSide:
    """What ``tierproxy _worker`` adds to the one-process proxy (see module docstring)."""

    def __init__(self, held_fd: int, admin_socket: str, parent_fd: int) -> None:
        self.held = socket.socket(fileno=held_fd)
        self.admin_socket = admin_socket
        self.parent_fd = parent_fd
        self._sync: asyncio.Task[None] | None = None
        self._state: ProxyState | None = None

    def proxy_site(self, runner: web.BaseRunner, backlog: int) -> web.BaseSite:
        sock = listen_like(self.held, backlog)
        self.held.close()
        return web.SockSite(runner, sock)

    def admin_site(self, runner: web.BaseRunner) -> web.BaseSite:
        return web.UnixSite(runner, self.admin_socket)

    def add_routes(self, admin_app: web.Application, state: ProxyState) -> None:
        """The private route the other workers relay purges to (reachable only through the
        unix socket in the group's 0700 directory)."""

        async def relayed(request: web.Request) -> web.Response:
            try:
                raw = await request.json()
                order = PurgeOrder(
                    tuple(str(k) for k in raw["keys"]),
                    tuple(str(t) for t in raw["tags"]),
                    bool(raw["soft"]),
                    float(raw["at"]),
                    bool(raw.get("again", False)),
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                return web.json_response({"error": "bad relayed purge"}, status=400)
            tiers = await apply_order(state.readthrough, state.keys, order)
            ok = all(isinstance(count, int) for count in tiers.values())
            return web.json_response({"tiers": tiers}, status=200 if ok else 503)

        admin_app.router.add_post(_RELAY_PATH, relayed)

    def started(self, state: ProxyState, stop: asyncio.Event) -> None:
        """Serving: watch the parent, relay purges without Redis, write metrics."""
        self._state = state
        loop = asyncio.get_running_loop()

        def parent_gone() -> None:
            # Readable only at EOF: the parent never writes. Its end closed: it is gone.
            loop.remove_reader(self.parent_fd)
            log.warning("supervisor gone: stopping")
            stop.set()

        loop.add_reader(self.parent_fd, parent_gone)
        state.invalidation.siblings = self.purge_siblings
        self._sync = asyncio.create_task(self._sync_metrics(state))

    async def _sync_metrics(self, state: ProxyState) -> None:
        while True:
            try:
                state.metrics.sync()
            except Exception as exc:  # noqa: BLE001 - metrics never stop the worker
                log.warning("metrics sync failed: %r", exc)
            await asyncio.sleep(_SYNC_INTERVAL)

    async def stopped(self) -> None:
        if self._sync is not None:
            self._sync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync
        if self._state is not None:
            with contextlib.suppress(Exception):
                self._state.metrics.sync()

    async def purge_siblings(self, order: PurgeOrder) -> tuple[int, int]:
        """Send ``order`` to every other worker's L1; (acknowledged, unconfirmed). A worker
        whose socket refuses is not running (being restarted): it has no L1 to purge."""
        directory = Path(self.admin_socket).parent
        others = sorted(
            str(path)
            for path in directory.glob(_SOCKET_PATTERN.format(slot="*"))
            if str(path) != self.admin_socket
        )
        payload = {
            "keys": list(order.keys),
            "tags": list(order.tags),
            "soft": order.soft,
            "at": order.at,
            "again": order.again,
        }

        async def one(path: str) -> str:
            try:
                status, _ = await _ask(
                    path, "POST", _RELAY_PATH, _PURGE_RELAY_TIMEOUT, json=payload
                )
            except (FileNotFoundError, ConnectionRefusedError):
                return "gone"
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, FileNotFoundError | ConnectionRefusedError):
                    return "gone"
                return "unconfirmed"
            except (aiohttp.ClientError, TimeoutError, OSError):
                return "unconfirmed"
            return "acked" if status == 200 else "unconfirmed"

        outcomes = await asyncio.gather(*(one(path) for path in others))
        return outcomes.count("acked"), outcomes.count("unconfirmed")


# -- the parent -----------------------------------------------------------------------------


@dataclass
class _Slot:
    index: int
    socket_path: str
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    backoff: SessionBackoff = field(
        default_factory=lambda: SessionBackoff(_BACKOFF_BASE, _BACKOFF_CAP, _STABLE_AFTER)
    )
    task: asyncio.Task[None] | None = None
    restarts: int = field(default=0)


class Supervisor:
    """The parent of a group of workers (see module docstring)."""

    def __init__(
        self,
        count: int,
        env: dict[str, str],
        sock: socket.socket,
        shutdown_timeout: float,
    ) -> None:
        self.count = count
        self.sock = sock
        self.shutdown_timeout = shutdown_timeout
        self.directory = tempfile.mkdtemp(prefix="tierproxy-workers-")  # mode 0700
        self.metrics_dir = os.path.join(self.directory, "metrics")
        os.mkdir(self.metrics_dir, 0o700)
        self.env = dict(env)
        self.env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        self.slots = [
            _Slot(i, os.path.join(self.directory, _SOCKET_PATTERN.format(slot=i)))
            for i in range(count)
        ]
        # The parent's own metrics (not in the multiprocess files: its environment has no
        # PROMETHEUS_MULTIPROC_DIR).
        self.registry = CollectorRegistry()
        self.restarts = Counter(
            "tierproxy_worker_restarts",
            "Workers started again after they exited",
            registry=self.registry,
        )
        self.live = Gauge("tierproxy_workers", "Worker processes running", registry=self.registry)
        self.live.set_function(lambda: float(sum(1 for s in self.slots if self._alive(s))))
        self.stopping = False
        self._stop = asyncio.Event()
        self._parent_r, self._parent_w = os.pipe()

    @staticmethod
    def _alive(slot: _Slot) -> bool:
        return slot.proc is not None and slot.proc.returncode is None

    def group_registry(self) -> CollectorRegistry:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.metrics_dir)  # type: ignore[no-untyped-call]
        return registry

    async def _spawn(self, slot: _Slot) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(slot.socket_path)
        slot.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tierproxy",
            "_worker",
            "--port-fd",
            str(self.sock.fileno()),
            "--admin-socket",
            slot.socket_path,
            "--parent-fd",
            str(self._parent_r),
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            pass_fds=(self.sock.fileno(), self._parent_r),
        )
        slot.started_at = time.monotonic()
        log.info("worker %d started (pid %d)", slot.index, slot.proc.pid)

    async def worker_ready(self, slot: _Slot) -> tuple[bool, Any]:
        """(ready, the worker's /readyz body or what went wrong)."""
        if not self._alive(slot):
            return False, "not running"
        try:
            status, body = await _ask(slot.socket_path, "GET", "/readyz", _ASK_TIMEOUT)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return False, f"not answering: {type(exc).__name__}"
        return status == 200, body

    async def _until_ready(self, slot: _Slot) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT
        while time.monotonic() < deadline:
            assert slot.proc is not None
            if slot.proc.returncode is not None:
                raise GroupStartError(
                    f"worker {slot.index} exited with {slot.proc.returncode} during start-up",
                    slot.proc.returncode if slot.proc.returncode > 0 else 1,
                )
            ready, _ = await self.worker_ready(slot)
            if ready:
                return
            await asyncio.sleep(0.05)
        raise GroupStartError(f"worker {slot.index} not ready within {_READY_TIMEOUT:.0f}s", 1)

    async def start(self) -> None:
        """The first worker alone (it creates the L3 file), then the others; all ready."""
        try:
            first, *rest = self.slots
            await self._spawn(first)
            await self._until_ready(first)
            for slot in rest:
                await self._spawn(slot)
            for slot in rest:
                await self._until_ready(slot)
        except BaseException:
            await self.stop()
            raise
        for slot in self.slots:
            slot.task = asyncio.create_task(self._keep(slot))

    async def _keep(self, slot: _Slot) -> None:
        """Start ``slot``'s worker again whenever it exits, until the group stops."""
        while not self.stopping:
            assert slot.proc is not None
            code = await slot.proc.wait()
            if self.stopping:
                return
            pid = slot.proc.pid
            multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]
            lived = time.monotonic() - slot.started_at
            delay = slot.backoff.pause(lived)
            log.warning(
                "worker %d (pid %d) exited with %s after %.1fs; starting it again in %.2fs",
                slot.index,
                pid,
                code,
                lived,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            if self.stopping:
                return
            try:
                await self._spawn(slot)
            except OSError as exc:
                log.error("worker %d could not be started: %r", slot.index, exc)
                continue
            self.restarts.inc()
            slot.restarts += 1

    @property
    def stop_timeout(self) -> float:
        """How long a worker may take to stop before it is killed: as long as one serving
        process's shutdown may take (the timeout for the requests in flight, then the timeout
        again for background writes), and a moment to close its pools."""
        return 2 * self.shutdown_timeout + _CLOSE_ALLOWANCE

    async def stop(self) -> None:
        """SIGTERM every worker; kill those still running after :attr:`stop_timeout`."""
        self.stopping = True
        self._stop.set()
        procs = [s.proc for s in self.slots if s.proc is not None and s.proc.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if procs:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in procs], timeout=self.stop_timeout
            )
            for proc in procs:
                if proc.returncode is None:
                    log.warning("worker pid %d still running: killed", proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        for slot in self.slots:
            if slot.task is not None and slot.task is not asyncio.current_task():
                slot.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await slot.task

    def close(self) -> None:
        for fd in (self._parent_r, self._parent_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.sock.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    async def forward_purge(self, body: bytes, headers: dict[str, str]) -> web.Response:
        """``POST /purge`` handed to the first worker that answers: it purges every tier and
        takes the purge to the other workers (module docstring)."""
        for slot in self.slots:
            if not self._alive(slot):
                continue
            try:
                status, answer = await _ask(
                    slot.socket_path, "POST", "/purge", 60.0, data=body, headers=headers
                )
            except (aiohttp.ClientError, TimeoutError, OSError):
                continue
            if isinstance(answer, str):
                return web.Response(text=answer, status=status, content_type="text/plain")
            return web.json_response(answer, status=status)
        return web.json_response({"error": "no worker answered"}, status=503)
