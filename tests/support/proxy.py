"""Running tierproxy for tests: in-process (TestServer) and as a real subprocess.

In-process uses only the lead's internal API: ``tierproxy.config.load_settings(env)``,
``tierproxy.server.build_app(settings)`` and ``app[tierproxy.server.STATE]``.
The subprocess runs ``python -m tierproxy serve`` configured by env only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDictProxy
from yarl import URL

from .storage import CacheStatus, answering_member, tier_members

if TYPE_CHECKING:
    from tierproxy.clock import Clock

__all__ = [
    "Fetched",
    "ProxyHandle",
    "SpawnedProxy",
    "normalise_env",
    "start_inprocess_proxy",
    "start_subprocess_proxy",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_PREFIX = "TIERPROXY_"


def normalise_env(overrides: Mapping[str, Any]) -> dict[str, str | None]:
    """``ORIGIN_TIMEOUT=0.5`` → ``{"TIERPROXY_ORIGIN_TIMEOUT": "0.5"}``; None means unset."""
    out: dict[str, str | None] = {}
    for name, value in overrides.items():
        key = name if name.startswith(ENV_PREFIX) else ENV_PREFIX + name.upper()
        out[key] = None if value is None else str(value)
    return out


def apply_env(base: Mapping[str, str], overrides: Mapping[str, Any]) -> dict[str, str]:
    env = dict(base)
    for key, value in normalise_env(overrides).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@dataclass
class Fetched:
    """A fully read response plus how long it took (loop clock)."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    elapsed: float

    @property
    def x_cache(self) -> str | None:
        return self.headers.get("X-Cache")

    @property
    def cache_status(self) -> CacheStatus | None:
        """tierproxy's member telling how the request was answered (parsed as RFC 8941)."""
        return answering_member(self.headers.get("Cache-Status"))

    @property
    def tiers(self) -> dict[str, CacheStatus]:
        """tierproxy's ``Cache-Status`` members by tier (``l1``...), origin side first."""
        return tier_members(self.headers.get("Cache-Status"))

    @property
    def age(self) -> int | None:
        value = self.headers.get("Age")
        return int(value) if value is not None else None

    def __repr__(self) -> str:  # short, for assertion messages
        return (
            f"<Fetched {self.status} X-Cache={self.x_cache!r} "
            f"Cache-Status={self.headers.get('Cache-Status')!r} Age={self.headers.get('Age')!r} "
            f"{len(self.body)}B {self.elapsed:.3f}s body={self.body[:80]!r}>"
        )


async def fetch(
    session_or_client: Any, method: str, url: str | URL, *, timeout: float = 15.0, **kwargs: Any
) -> Fetched:
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with session_or_client.request(
        method, url, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False, **kwargs
    ) as resp:
        body = await resp.read()
        return Fetched(resp.status, resp.headers, body, loop.time() - started)


class _ProductionLikeTestServer(TestServer):
    """TestServer with the runner ``tierproxy serve`` uses (``tierproxy.server.make_runner``).

    Also aiohttp's production default ``handler_cancellation=False``: the stock TestServer
    turns handler cancellation on; ``tierproxy serve`` does not, and coalescing/backfill
    behaviour depends on it (a client that disconnects must not cancel a shared origin fetch).
    Shutdown is bounded at 5 s. With ``hit_path=False``
    the runner is aiohttp's plain one, so every request takes the app's full path.
    """

    def __init__(self, app: web.Application, *, hit_path: bool = True, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.hit_path = hit_path

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        import tierproxy.server

        kwargs["handler_cancellation"] = False
        kwargs.setdefault("shutdown_timeout", 5.0)
        if not self.hit_path:
            return web.AppRunner(self.app, **kwargs)
        return tierproxy.server.make_runner(self.app, **kwargs)


class ProxyHandle:
    """One in-process proxy: ``client`` (TestClient), ``url``, ``app``, ``settings``, ``env``."""

    def __init__(
        self, client: TestClient[Any, Any], app: web.Application, settings: Any, env: dict[str, str]
    ) -> None:
        self.client = client
        self.app = app
        self.settings = settings
        self.env = env
        self.closed = False

    @property
    def port(self) -> int:
        port = self.client.port
        assert port is not None
        return port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self) -> Any:
        import tierproxy.server

        return self.app[tierproxy.server.STATE]

    def tier_names(self) -> list[str]:
        return [tier.name for tier in self.state.tiers]

    async def request(self, method: str, path: str | URL, **kwargs: Any) -> Fetched:
        return await fetch(self.client, method, path, **kwargs)

    async def get(self, path: str, **kwargs: Any) -> Fetched:
        return await self.request("GET", path, **kwargs)

    async def head(self, path: str, **kwargs: Any) -> Fetched:
        return await self.request("HEAD", path, **kwargs)

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait (bounded poll) until no background task (backfill, invalidation) is pending.

        Unlike ``state.background.drain()`` - a shutdown step after which new background
        tasks are refused - this leaves the proxy fully working.
        """
        from .wait import wait_for_condition

        await wait_for_condition(
            lambda: self.state.background.pending == 0,
            timeout=timeout,
            message=lambda: f"background tasks to finish ({self.state.background.pending} left)",
        )

    async def drain(self, timeout: float = 5.0) -> int:
        """The shutdown step: stop taking background tasks, wait for running ones."""
        return int(await self.state.background.drain(timeout))

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        async with asyncio.timeout(30):
            await self.client.close()


async def start_inprocess_proxy(
    env: Mapping[str, str], *, hit_path: bool = True, clock: Clock | None = None
) -> ProxyHandle:
    """An in-process proxy for ``env``; ``clock`` (default: the system's) is the one its
    freshness and cool-downs read (a test's :class:`~support.clock.SteppedClock`)."""
    import tierproxy.config
    import tierproxy.server
    from tierproxy.clock import SYSTEM

    settings = tierproxy.config.load_settings(dict(env))
    app = tierproxy.server.build_app(settings, clock=SYSTEM if clock is None else clock)
    server = _ProductionLikeTestServer(app, host="127.0.0.1", hit_path=hit_path)
    client: TestClient[Any, Any] = TestClient(server)
    await client.start_server()
    return ProxyHandle(client, app, settings, dict(env))


# -- subprocess -------------------------------------------------------------------------


def _int_or(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:  # a deliberately bad value in a config test
        return default


class SpawnedProxy:
    """``python -m tierproxy serve`` in a subprocess; stderr/stdout go to files."""

    def __init__(
        self, proc: subprocess.Popen[bytes], env: dict[str, str], logdir: Path, name: str
    ) -> None:
        self.proc = proc
        self.env = env
        self.stderr_path = logdir / f"{name}.stderr"
        self.stdout_path = logdir / f"{name}.stdout"
        self.port = _int_or(env.get("TIERPROXY_PORT"), 8080)
        self.admin_port = _int_or(env.get("TIERPROXY_ADMIN_PORT"), 8081)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    @property
    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def stdout(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except OSError:
            return ""

    def terminate(self) -> None:
        """SIGTERM (graceful shutdown)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    async def wait(self, timeout: float = 10.0) -> int:
        """Wait for exit without blocking the loop (in-process origins keep serving)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.proc.poll() is None:
            if loop.time() >= deadline:
                raise AssertionError(
                    f"tierproxy (pid {self.pid}) still running after {timeout}s; "
                    f"stderr:\n{self.stderr[-3000:]}"
                )
            await asyncio.sleep(0.02)
        return int(self.proc.returncode)

    async def wait_healthy(self, timeout: float = 15.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: object = None
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"tierproxy exited with {self.proc.returncode} before becoming healthy; "
                        f"stderr:\n{self.stderr[-3000:]}"
                    )
                try:
                    async with session.get(
                        self.admin_url + "/healthz", timeout=aiohttp.ClientTimeout(total=1)
                    ) as resp:
                        last = resp.status
                        if resp.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError) as exc:
                    last = exc
                if loop.time() >= deadline:
                    raise AssertionError(
                        f"tierproxy /healthz not 200 within {timeout}s (last: {last!r}); "
                        f"stderr:\n{self.stderr[-3000:]}"
                    )
                await asyncio.sleep(0.05)

    def cleanup(self) -> None:
        """Always called at teardown: SIGKILL if still alive, reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


_spawn_counter = 0


def start_subprocess_proxy(
    env: Mapping[str, str],
    logdir: Path,
    cwd: Path,
    *,
    extra_pythonpath: Sequence[str] = (),
    nofile: int | tuple[int, int] | None = None,
) -> SpawnedProxy:
    """Start ``python -m tierproxy serve`` with exactly ``env``'s TIERPROXY_* variables.

    ``extra_pythonpath`` goes before the repository on PYTHONPATH (e.g. a directory with a
    ``sitecustomize.py`` shim); ``nofile`` sets the child's RLIMIT_NOFILE: one number for soft and hard, or (soft, hard).
    """
    global _spawn_counter
    _spawn_counter += 1
    name = f"tierproxy-{_spawn_counter}-{int(time.time() * 1000) % 100000}"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    full_env.update(env)
    pythonpath = [*extra_pythonpath, str(REPO_ROOT)]
    if os.environ.get("PYTHONPATH"):
        pythonpath.append(os.environ["PYTHONPATH"])
    full_env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    full_env["PYTHONUNBUFFERED"] = "1"
    logdir.mkdir(parents=True, exist_ok=True)
    # prlimit (util-linux) execs the command with the limit: the pid is the proxy's.
    limit: list[str] = []
    if nofile is not None:
        soft, hard = (nofile, nofile) if isinstance(nofile, int) else nofile
        limit = ["prlimit", f"--nofile={soft}:{hard}", "--"]
    with open(logdir / f"{name}.stderr", "wb") as err, open(logdir / f"{name}.stdout", "wb") as out:
        proc = subprocess.Popen(
            [*limit, sys.executable, "-m", "tierproxy", "serve"],
            env=full_env,
            cwd=str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    return SpawnedProxy(proc, dict(env), logdir, name)
