"""Start and stop the processes a load test needs: origin, Redis, proxy, nginx, load tools.

Every child gets its own session (a terminal's Ctrl-C reaches only the driver, which then
stops the children in order), a log file, and — on Linux — a parent-death signal, so a
driver that is killed outright still takes its children with it. Nothing here listens or
connects anywhere but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: S110, BLE001
        pass


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    pp = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + pp if pp else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


class Proc:
    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        taskset: str | None = None,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        if taskset and shutil.which("taskset"):
            self.cmd = ["taskset", "-c", taskset, *self.cmd]
        self.log_path = log
        self._log: IO[bytes] = open(log, "ab")  # noqa: SIM115
        self.popen = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env if env is not None else child_env(),
            cwd=str(cwd or REPO),
            start_new_session=True,
            preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None,  # noqa: PLW1509
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)  # our own child's process group (start_new_session)

    def stop(self, timeout: float = 5.0, first: int = signal.SIGTERM) -> int | None:
        if self.alive():
            self.send(signal.SIGCONT)  # a SIGSTOPped child would not act on SIGTERM
            self.send(first)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.send(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(5)
        with contextlib.suppress(Exception):
            self._log.close()
        return self.popen.returncode

    def tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


class ProcGroup:
    """Owns started processes; stops them in reverse start order, always."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, *a: Any, **kw: Any) -> Proc:
        p = Proc(*a, **kw)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        while self.procs:
            p = self.procs.pop()
            with contextlib.suppress(Exception):
                p.stop()

    def __enter__(self) -> ProcGroup:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


class StartupError(RuntimeError):
    pass


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, headers={"User-Agent": "tierproxy-loadtest"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), {k: v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {k: v for k, v in e.headers.items()}


def http_post_json(url: str, payload: dict[str, Any], timeout: float = 2.0) -> Any:
    import json

    req = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_http(url: str, proc: Proc | None, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise StartupError(
                f"{what or proc.name} exited with code {proc.popen.returncode} before "
                f"{url} answered; last log lines:\n{proc.tail()}"
            )
        try:
            status, _, _ = http_get(url, timeout=1.0)
            if status == 200:
                return
            last = f"HTTP {status}"
        except (OSError, urllib.error.URLError) as e:
            last = str(e)
        time.sleep(0.1)
    tail = f"; last log lines:\n{proc.tail()}" if proc else ""
    raise StartupError(f"{what or url} not ready after {timeout:.0f}s ({last}){tail}")


def redis_ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis_server_path() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )


def start_redis(
    group: ProcGroup, workdir: Path, port: int | None = None, taskset: str | None = None
) -> tuple[Proc, int]:
    exe = redis_server_path()
    if not exe:
        raise StartupError("redis-server not found (apt-get install redis-server)")
    port = port or free_port()
    if port == 6379:
        raise StartupError("refusing to use port 6379 (the machine's own Redis)")
    cmd = [
        exe,
        "--port",
        str(port),
        "--bind",
        LOOPBACK,
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--protected-mode",
        "yes",
        "--dir",
        str(workdir),
        "--maxmemory",
        "512mb",
        "--maxmemory-policy",
        "allkeys-lru",
        "--loglevel",
        "warning",
    ]
    p = group.start("redis", cmd, workdir / "redis.log", taskset=taskset)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not p.alive():
            raise StartupError(f"redis-server exited: {p.tail()}")
        if redis_ping(port):
            return p, port
        time.sleep(0.05)
    raise StartupError("redis-server did not answer PING within 10s")


def start_origin(
    group: ProcGroup,
    workdir: Path,
    args: Sequence[str],
    port: int | None = None,
    max_lifetime: float = 3600,
    taskset: str | None = None,
) -> tuple[Proc, int]:
    port = port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "loadtest.origin",
        "--port",
        str(port),
        "--max-lifetime",
        str(int(max_lifetime)),
        *args,
    ]
    p = group.start("origin", cmd, workdir / "origin.log", taskset=taskset)
    wait_http(f"http://{LOOPBACK}:{port}/__health", p, 15, "origin")
    return p, port


def proxy_command(override: str | None = None) -> list[str]:
    override = override or os.environ.get("LOADTEST_PROXY_CMD")
    if override:
        return shlex.split(override)
    return [sys.executable, "-m", "tierproxy", "serve"]


def start_proxy(
    group: ProcGroup,
    workdir: Path,
    env_extra: dict[str, str],
    name: str = "proxy",
    cmd_override: str | None = None,
    taskset: str | None = None,
    timeout: float = 30.0,
) -> tuple[Proc, int, int]:
    port = int(env_extra.get("TIERPROXY_PORT") or free_port())
    admin = int(env_extra.get("TIERPROXY_ADMIN_PORT") or free_port())
    env = {
        "TIERPROXY_HOST": LOOPBACK,
        "TIERPROXY_PORT": str(port),
        "TIERPROXY_ADMIN_PORT": str(admin),
        # The proxy starts in this repository, and ``python -m`` would put it first on
        # sys.path, before PYTHONPATH: a command running another build
        # (``env PYTHONPATH=DIR python -m tierproxy serve``) would run this checkout.
        "PYTHONSAFEPATH": "1",
        **env_extra,
    }
    p = group.start(
        name,
        proxy_command(cmd_override),
        workdir / f"{name}.log",
        env=child_env(env),
        taskset=taskset,
    )
    wait_http(f"http://{LOOPBACK}:{admin}/healthz", p, timeout, name)
    return p, port, admin


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """user+system CPU seconds of a process (all its threads), from /proc; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return None


def host_busy_seconds() -> float | None:
    """CPU seconds all cores spent busy (not idle/iowait), from /proc/stat; shows outside load."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
        vals = [int(x) for x in parts[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        return (sum(vals[:8]) - vals[3] - vals[4]) / tick  # user..steal minus idle, iowait
    except (OSError, IndexError, ValueError, AttributeError):
        return None


def wait_quiet(max_wait: float, threshold_pct: float = 35.0, window: float = 1.0) -> float | None:
    """Wait up to `max_wait` s until the whole host is less than `threshold_pct` busy (100 = one
    core) over `window` s — our own children idle, so that is load from elsewhere. Returns the
    last busy % seen (None where /proc/stat is unreadable)."""
    deadline = time.monotonic() + max_wait
    busy = None
    while True:
        a = host_busy_seconds()
        time.sleep(window)
        b = host_busy_seconds()
        if a is None or b is None:
            return None
        busy = (b - a) / window * 100
        if busy < threshold_pct or time.monotonic() >= deadline:
            return round(busy, 1)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (and SIGHUP) into KeyboardInterrupt so `finally:` blocks stop children."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
