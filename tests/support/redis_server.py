"""A real ``redis-server`` process for the test session, with fault helpers.

Synchronous on purpose: a session-scoped fixture must not depend on an event loop (pytest-asyncio
gives each test its own).
Faults: SIGSTOP/SIGCONT (connections stay open, replies stall), SIGKILL, restart on the
same port. Nothing is persisted (``--save "" --appendonly no``), so a restart is empty.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from .net import free_port

__all__ = ["RedisServer", "RedisServerError", "find_redis_server"]


class RedisServerError(RuntimeError):
    pass


def find_redis_server() -> str | None:
    """``$REDIS_SERVER_BIN`` if set (empty or missing file = not available), else PATH."""
    explicit = os.environ.get("REDIS_SERVER_BIN")
    if explicit is not None:
        return explicit if explicit and os.access(explicit, os.X_OK) else None
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )


class RedisServer:
    """One ``redis-server`` bound to 127.0.0.1 on a free port (never 6379)."""

    def __init__(self, binary: str, workdir: Path, port: int | None = None) -> None:
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        if self.port == 6379:
            raise RedisServerError("refusing to use the default Redis port 6379")
        self._proc: subprocess.Popen[bytes] | None = None
        self.frozen_now = False
        self.starts = 0

    # -- addresses -------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RedisServerError("redis-server is not running")
        return self._proc.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    # -- life cycle -----------------------------------------------------------------
    def start(self, ready_timeout: float = 10.0) -> None:
        if self.is_alive():
            return
        cmd = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.log_path),
            "--daemonize",
            "no",
        ]
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.frozen_now = False
        self.starts += 1
        self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RedisServerError(
                    f"redis-server exited with {self._proc.returncode} on port {self.port}: "
                    f"{self._log_tail()}"
                )
            if self.ping(timeout=0.2):
                return
            time.sleep(0.02)
        raise RedisServerError(
            f"redis-server on port {self.port} did not answer PING within {timeout}s: "
            f"{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def ping(self, timeout: float = 0.5) -> bool:
        """True if the server answers ``PING`` within ``timeout`` (raw socket, no client)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
                sock.settimeout(timeout)
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop (SIGTERM; SIGKILL if it does not exit within ``timeout``)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self.thaw()
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout)
        self.frozen_now = False

    def kill(self) -> None:
        """SIGKILL: the port stops answering at once; all data is gone."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5)
        self.frozen_now = False

    def restart(self, ready_timeout: float = 10.0) -> None:
        """Kill (if running) and start again on the same port, empty."""
        self.kill()
        self.start(ready_timeout)

    # -- faults ---------------------------------------------------------------------
    def freeze(self) -> None:
        """SIGSTOP: TCP connections stay open (the kernel still accepts), nothing answers."""
        if self.is_alive():
            os.kill(self.pid, signal.SIGSTOP)
            self.frozen_now = True

    def thaw(self) -> None:
        """SIGCONT. Safe to call at any time."""
        if self.is_alive():
            os.kill(self.pid, signal.SIGCONT)
        self.frozen_now = False

    @contextlib.contextmanager
    def frozen(self) -> Iterator[RedisServer]:
        """``with redis_server.frozen(): ...`` - always SIGCONTs in ``finally``."""
        self.freeze()
        try:
            yield self
        finally:
            self.thaw()

    def ensure_healthy(self, ready_timeout: float = 10.0) -> None:
        """Thaw; restart if a previous test killed it or it stopped answering."""
        self.thaw()
        if not self.is_alive():
            self.start(ready_timeout)
            return
        if not self.ping(timeout=1.0):
            self.restart(ready_timeout)
