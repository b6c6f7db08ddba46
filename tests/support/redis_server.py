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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .net import free_port

__all__ = [
    "RedisClusterSet",
    "RedisSentinelSet",
    "RedisServer",
    "RedisServerError",
    "find_redis_server",
]


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

    def __init__(
        self,
        binary: str,
        workdir: Path,
        port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.binary = binary
        self.extra_args = list(extra_args)
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
            *self.extra_args,
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
                reply = sock.recv(64)
                # A server started with --requirepass answers, but asks for a password first.
                return reply.startswith((b"+PONG", b"-NOAUTH"))
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


def _redis_cli() -> str:
    found = shutil.which("redis-cli") or "/usr/bin/redis-cli"
    if not os.access(found, os.X_OK):
        raise RedisServerError("redis-cli not found (needed to create a Redis Cluster)")
    return found


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # not ready yet: retried until the deadline
            if check():
                return
        time.sleep(0.05)
    raise RedisServerError(f"{what}: not within {timeout}s")


class RedisSentinelSet:
    """A master, one replica and one sentinel (quorum 1, down after ``down_after_ms``) on
    free loopback ports: ``kill_master()`` then ``wait_failover()`` promote the replica."""

    SERVICE = "tierproxy-test"

    def __init__(self, binary: str, workdir: Path, down_after_ms: int = 300) -> None:
        self.binary = binary
        self.workdir = Path(workdir)
        self.master = RedisServer(binary, self.workdir / "master")
        self.replica = RedisServer(
            binary,
            self.workdir / "replica",
            extra_args=["--replicaof", "127.0.0.1", str(self.master.port)],
        )
        self.down_after_ms = down_after_ms
        self.sentinel_port = free_port()
        self._sentinel: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.SERVICE}/0"

    def _client(self, port: int) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)

    def master_port(self) -> int:
        """The master's port as the sentinel has it."""
        with self._client(self.sentinel_port) as client:
            _host, port = client.sentinel_get_master_addr_by_name(self.SERVICE)
        return int(port)

    def start(self, timeout: float = 15.0) -> None:
        self.master.start()
        self.replica.start()

        def linked() -> bool:
            with self._client(self.replica.port) as client:
                info = client.info("replication")
            return bool(info.get("master_link_status") == "up")

        _wait(linked, timeout, "replica linked to its master")
        conf = self.workdir / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.workdir}\n"
            f"logfile {self.workdir / 'sentinel.log'}\n"
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {self.SERVICE} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.SERVICE} 3000\n"
            f"sentinel parallel-syncs {self.SERVICE} 1\n"
        )
        self._sentinel = subprocess.Popen(
            [self.binary, str(conf), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def knows_replica() -> bool:
            with self._client(self.sentinel_port) as client:
                return len(client.sentinel_slaves(self.SERVICE)) == 1

        _wait(knows_replica, timeout, "sentinel found the replica")

    def kill_master(self) -> None:
        self.master.kill()

    def wait_failover(self, timeout: float = 15.0) -> None:
        _wait(lambda: self.master_port() == self.replica.port, timeout, "sentinel failover")

        def promoted() -> bool:
            with self._client(self.replica.port) as client:
                return bool(client.info("replication").get("role") == "master")

        _wait(promoted, timeout, "replica promoted")

    def stop(self) -> None:
        if self._sentinel is not None and self._sentinel.poll() is None:
            self._sentinel.kill()
            self._sentinel.wait(5)
        self.replica.stop()
        self.master.stop()


class RedisClusterSet:
    """``size`` masters (no replicas) forming one Redis Cluster on free loopback ports (each
    with its cluster bus on another free port), created with ``redis-cli --cluster create``."""

    def __init__(self, binary: str, workdir: Path, size: int = 3) -> None:
        self.workdir = Path(workdir)
        self.nodes: list[RedisServer] = []
        for i in range(size):
            node_dir = self.workdir / f"node{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            self.nodes.append(
                RedisServer(
                    binary,
                    node_dir,
                    extra_args=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(node_dir / "nodes.conf"),
                        "--cluster-port",
                        str(free_port()),
                        "--cluster-node-timeout",
                        "2000",
                    ],
                )
            )

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self, timeout: float = 20.0) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                _redis_cli(),
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
        )
        import redis

        def ready() -> bool:
            for node in self.nodes:
                with redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=1) as client:
                    if client.cluster("info").get("cluster_state") != "ok":
                        return False
            return True

        _wait(ready, timeout, "cluster state ok on every node")

    def keys_per_node(self) -> list[int]:
        """How many keys each node holds."""
        import redis

        counts = []
        for node in self.nodes:
            with redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=1) as client:
                counts.append(int(client.dbsize()))
        return counts

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
