"""Issue 10 §6: file descriptors. Idle keep-alive connections cannot lock everyone out.

Before: ~1,000 idle keep-alive connections at the default limit of 1,024 descriptors stopped
the proxy answering anyone, ``/healthz`` included, with nothing useful in the log (asyncio's
accept loop hits EMFILE and retries). Now the proxy raises its soft RLIMIT_NOFILE to the hard
limit, caps client connections (``TIERPROXY_MAX_CLIENT_CONNECTIONS``, by default what the limit
leaves after a reserve for origin, Redis, SQLite, the admin port and the process itself), and
at the cap closes the oldest idle keep-alive connections first; a new connection is refused
(503) only when none is idle. One log line per episode; ``tierproxy_client_connections_shed``
counts what was closed or refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from support.fixture_types import MakeProxy
from support.net import free_port
from support.origin import Origin
from support.proxy import SpawnedProxy, start_subprocess_proxy
from support.wait import wait_for_condition

pytestmark = pytest.mark.slow

NOFILE = 256
IDLE_CLIENTS = 300  # more than 256 descriptors could ever hold
REQUEST = b"GET /a HTTP/1.1\r\nHost: proxy\r\n\r\n"


@pytest.fixture
async def spawn_limited(
    origin: Origin, tmp_path: Path
) -> AsyncIterator[Callable[..., SpawnedProxy]]:
    procs: list[SpawnedProxy] = []

    def factory(nofile: int, event_loop: str = "uvloop", **env: str) -> SpawnedProxy:
        extra: list[str] = []
        if event_loop == "asyncio":  # uvloop hidden: asyncio's accept loop
            shim = tmp_path / "no-uvloop"
            shim.mkdir(exist_ok=True)
            (shim / "sitecustomize.py").write_text("import sys\nsys.modules['uvloop'] = None\n")
            extra.append(str(shim))
        full_env = {
            "TIERPROXY_ORIGIN": origin.url,
            "TIERPROXY_SQLITE_PATH": str(tmp_path / "cache.sqlite3"),
            "TIERPROXY_HOST": "127.0.0.1",
            "TIERPROXY_PORT": str(free_port()),
            "TIERPROXY_ADMIN_PORT": str(free_port()),
            "TIERPROXY_ACCESS_LOG": "off",
            **env,
        }
        proc = start_subprocess_proxy(
            full_env, tmp_path / "logs", tmp_path, nofile=nofile, extra_pythonpath=extra
        )
        procs.append(proc)
        return proc

    try:
        yield factory
    finally:
        origin.release()
        for proc in procs:
            proc.cleanup()


async def _keepalive_exchange(
    port: int, timeout: float = 5.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """One GET on a new connection, left open (idle keep-alive); None if not answered."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            match = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
            assert match is not None, head
            await reader.readexactly(int(match.group(1)))
            if not head.startswith(b"HTTP/1.1 200 "):
                raise ConnectionError(head[:100])
            return reader, writer
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        if writer is not None:
            writer.close()
        return None


async def _get(session: aiohttp.ClientSession, url: str) -> int | str:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return repr(exc)


def _metric(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_idle_keepalive_connections_at_the_descriptor_limit_lock_nobody_out(
    origin: Origin, spawn_limited: Callable[..., SpawnedProxy], event_loop: str
) -> None:
    origin.set("/a", body=b"a body", headers={"Cache-Control": "public, max-age=600"})
    proxy = spawn_limited(
        NOFILE, event_loop, TIERPROXY_ORIGIN_MAX_CONNECTIONS="10", TIERPROXY_KEEPALIVE_TIMEOUT="300"
    )
    await proxy.wait_healthy(20)
    await wait_for_condition(
        lambda: f"event loop: {event_loop}" in proxy.stderr,
        timeout=10,
        message=f"the proxy on {event_loop}",
    )
    clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    unanswered = 0
    try:
        for _ in range(IDLE_CLIENTS // 50):  # 50 at a time, each left open and idle
            batch = await asyncio.gather(*(_keepalive_exchange(proxy.port) for _ in range(50)))
            clients += [c for c in batch if c is not None]
            unanswered += sum(1 for c in batch if c is None)
        async with aiohttp.ClientSession() as session:
            # The admin port answers, and so does the proxy port for a new client.
            assert await _get(session, proxy.admin_url + "/healthz") == 200
            assert await _get(session, proxy.admin_url + "/readyz") == 200
            assert await _get(session, proxy.url + "/a") == 200
            metrics = await session.get(proxy.admin_url + "/metrics")
            text = await metrics.text()
        assert unanswered == 0, f"{unanswered} of {IDLE_CLIENTS} clients got no answer"
        closed = _metric(
            text, "tierproxy_client_connections_shed_total", 'action="idle-closed",listener="proxy"'
        )
        assert closed >= IDLE_CLIENTS - NOFILE, text[-2000:]
        assert (
            _metric(text, "tierproxy_client_connection_cap_episodes_total", 'listener="proxy"') == 1
        )
        # The oldest idle connections were the ones closed: the first client's is gone.
        first_reader = clients[0][0]
        async with asyncio.timeout(5):
            assert await first_reader.read(100) == b""
        cap_lines = await wait_for_condition(
            lambda: _cap_lines(proxy), timeout=10, message="the cap's log line"
        )
        assert len(cap_lines) == 1, cap_lines  # one line for the episode, not one per connection

        # The episode ends when the connections fall to half the cap; the next one is new.
        for _, writer in clients:
            writer.close()
        clients.clear()
        async with aiohttp.ClientSession() as session:
            await wait_for_condition(
                lambda: _open_connections(session, proxy),
                timeout=10,
                message="the proxy to see the clients gone",
            )
        for _ in range(3):
            batch = await asyncio.gather(*(_keepalive_exchange(proxy.port) for _ in range(50)))
            clients += [c for c in batch if c is not None]
            assert all(c is not None for c in batch)
        second = await wait_for_condition(
            lambda: len(_cap_lines(proxy)) == 2, timeout=10, message="a second episode's line"
        )
        assert second
    finally:
        for _, writer in clients:
            writer.close()
    log = proxy.stderr
    assert "Too many open files" not in log and "EMFILE" not in log, log[-3000:]


def _cap_lines(proxy: SpawnedProxy) -> list[str]:
    return [line for line in proxy.stderr.splitlines() if "client connections at the cap" in line]


async def _open_connections(session: aiohttp.ClientSession, proxy: SpawnedProxy) -> bool:
    """Whether the proxy counts no more client connections than half its cap."""
    async with session.get(proxy.admin_url + "/metrics") as resp:
        text = await resp.text()
    return _metric(text, "tierproxy_client_connections", 'listener="proxy"') <= (
        _metric(text, "tierproxy_client_connections_max", 'listener="proxy"') // 2
    )


async def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(
    origin: Origin, tmp_path: Path
) -> None:
    # prlimit sets soft 256 / hard 512 here; the proxy lifts its soft limit to 512.
    env = {
        "TIERPROXY_ORIGIN": origin.url,
        "TIERPROXY_SQLITE_PATH": "off",
        "TIERPROXY_HOST": "127.0.0.1",
        "TIERPROXY_PORT": str(free_port()),
        "TIERPROXY_ADMIN_PORT": str(free_port()),
    }
    proxy = start_subprocess_proxy(env, tmp_path / "logs", tmp_path, nofile=(256, 512))
    try:
        await proxy.wait_healthy(20)
        limits = Path(f"/proc/{proxy.pid}/limits").read_text()
        line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert line.split()[3:5] == ["512", "512"], line
        await wait_for_condition(
            lambda: "RLIMIT_NOFILE" in proxy.stderr,
            timeout=10,
            message="the descriptor limit in the log",
        )
    finally:
        proxy.cleanup()


async def test_a_cap_the_descriptor_limit_cannot_hold_stops_start_up(
    origin: Origin, spawn_limited: Callable[..., SpawnedProxy]
) -> None:
    proxy = spawn_limited(NOFILE, TIERPROXY_MAX_CLIENT_CONNECTIONS="5000")
    try:
        code = await proxy.wait(timeout=20)
    finally:
        proxy.cleanup()
    lines = [line for line in proxy.stderr.splitlines() if line.strip()]
    assert code == 2, proxy.stderr
    assert len(lines) == 1 and "TIERPROXY_MAX_CLIENT_CONNECTIONS=5000" in lines[0], lines


async def test_a_new_connection_is_refused_with_503_when_none_is_idle(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    # Every connection has a request in progress (the origin hangs): nothing idle to close,
    # so the one over the cap gets a 503 and is closed; the others are answered when the
    # origin is.
    origin.set("/slow", hang=True, headers={"Cache-Control": "no-store"})
    proxy = await make_proxy(
        MAX_CLIENT_CONNECTIONS=4, ORIGIN_TIMEOUT=10, REQUEST_DEADLINE=10, SQLITE_PATH="off"
    )
    busy: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for n in range(4):  # distinct keys: no coalescing
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"GET /slow?%d HTTP/1.1\r\nHost: x\r\n\r\n" % n)
            busy.append((reader, writer))
        await wait_for_condition(
            lambda: len(origin.requests_for("/slow")) == 4,
            timeout=5,
            message="four requests at the origin",
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            async with asyncio.timeout(5):
                refused = await reader.read()
        finally:
            writer.close()
        assert refused.startswith(b"HTTP/1.1 503 "), refused[:200]
        assert b"\r\nRetry-After: " in refused and b"\r\nConnection: close\r\n" in refused
        origin.release()
        for reader, _ in busy:
            async with asyncio.timeout(5):
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
    finally:
        for _, writer in busy:
            with contextlib.suppress(OSError):
                writer.close()


async def test_idle_admin_connections_never_stop_the_admin_port_answering(
    origin: Origin, spawn_limited: Callable[..., SpawnedProxy]
) -> None:
    # The admin port keeps a few connections (its own cap, inside the descriptor reserve):
    # the oldest idle ones make room, so a health check always gets through.
    proxy = spawn_limited(NOFILE)
    await proxy.wait_healthy(20)
    idle: list[asyncio.StreamWriter] = []
    try:
        for _ in range(IDLE_CLIENTS):  # more than the descriptor limit could hold
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.admin_port)
            idle.append(writer)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head
        async with aiohttp.ClientSession() as session:
            assert await _get(session, proxy.admin_url + "/healthz") == 200
            text = await (await session.get(proxy.admin_url + "/metrics")).text()
        assert (
            _metric(
                text,
                "tierproxy_client_connections_shed_total",
                'action="idle-closed",listener="admin"',
            )
            >= IDLE_CLIENTS - 32
        )
    finally:
        for writer in idle:
            writer.close()
