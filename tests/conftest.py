"""Shared fixtures: a real redis-server, a scriptable origin, fault proxies, the proxy.

Fixture API in brief (details in ``tests/support``):

``redis_server``  session, sync. ``.url .port .pid .stop() .freeze() .thaw() .kill()
                  .restart()``; ``with redis_server.frozen(): ...`` always SIGCONTs.
                  Skipped when ``redis-server`` is missing, a failure when ``CI=true``.
``redis_url``     function: FLUSHALLed, alive and thawed ``redis://127.0.0.1:P/0``.
                  Asking for it also makes ``make_proxy``/``spawn_proxy`` turn L2 on.
``redis_client``  function: a sync redis-py client on ``redis_url`` (2 s socket timeout).
``origin``        function, async: a started :class:`support.origin.Origin`.
``sqlite_path``   ``tmp_path / "cache.sqlite3"`` - the L3 file every proxy of a test shares.
``fault_proxy``   async factory ``await fault_proxy(port, host="127.0.0.1", mode="pass")``.
``canary``        async: a :class:`support.net.CanaryListener` on 127.0.0.2.
``make_proxy``    async factory ``await make_proxy(ORIGIN_TIMEOUT=0.5, ...)`` → ProxyHandle
                  (in-process, via load_settings/build_app + TestServer). Calling it again
                  with the same SQLite/Redis is "a new process" with an empty L1.
``spawn_proxy``   async factory ``await spawn_proxy(wait_healthy=True, **env)`` →
                  SpawnedProxy (``python -m tierproxy serve``), SIGKILLed at teardown.
Overrides accept ``NAME=value`` (prefixed with ``TIERPROXY_``) or full names; ``None``
removes a variable.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# tests/ on sys.path so ``import support`` works under any pytest import mode.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from support.faultproxy import FaultProxy  # noqa: E402
from support.net import CanaryListener, free_port  # noqa: E402
from support.origin import Origin  # noqa: E402
from support.proxy import (  # noqa: E402
    ProxyHandle,
    SpawnedProxy,
    apply_env,
    start_inprocess_proxy,
    start_subprocess_proxy,
)
from support.redis_server import RedisServer, RedisServerError, find_redis_server  # noqa: E402

if TYPE_CHECKING:
    from tierproxy.clock import Clock


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


# -- Redis ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = find_redis_server()
    if binary is None:
        reason = (
            "redis-server not found (PATH or $REDIS_SERVER_BIN); "
            "install it with: apt-get install -y redis-server"
        )
        if _in_ci():
            pytest.fail(f"{reason}; CI=true so this is a failure, not a skip", pytrace=False)
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("redis")
    server: RedisServer | None = None
    last_error: Exception | None = None
    for _attempt in range(3):  # a free port can be taken between probe and bind
        server = RedisServer(binary, workdir)
        try:
            server.start()
            break
        except RedisServerError as exc:
            last_error = exc
            server.stop()
            server = None
    if server is None:
        pytest.fail(f"could not start redis-server: {last_error}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean, alive, thawed Redis for this test (restarted if a prior test killed it)."""
    import redis

    redis_server.ensure_healthy()
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.flushall()
    except redis.RedisError:
        redis_server.restart()
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        yield client
    finally:
        client.close()


# -- origin, faults, canary --------------------------------------------------------------


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    server = await Origin().start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    return tmp_path / "cache.sqlite3"


@pytest.fixture
async def fault_proxy() -> AsyncIterator[Callable[..., Awaitable[FaultProxy]]]:
    proxies: list[FaultProxy] = []

    async def factory(target_port: int, host: str = "127.0.0.1", **kwargs: Any) -> FaultProxy:
        proxy = await FaultProxy(host, target_port, **kwargs).start()
        proxies.append(proxy)
        return proxy

    try:
        yield factory
    finally:
        for proxy in proxies:
            await proxy.close()


@pytest.fixture
async def canary() -> AsyncIterator[CanaryListener]:
    listener = await CanaryListener("127.0.0.2").start()
    try:
        yield listener
    finally:
        await listener.close()


# -- the proxy -------------------------------------------------------------------------


def _base_env(request: pytest.FixtureRequest, origin: Origin, sqlite_path: Path) -> dict[str, str]:
    env = {
        "TIERPROXY_ORIGIN": origin.url,
        "TIERPROXY_SQLITE_PATH": str(sqlite_path),
    }
    if "redis_url" in request.fixturenames:
        env["TIERPROXY_REDIS_URL"] = request.getfixturevalue("redis_url")
    return env


@pytest.fixture
async def make_proxy(
    request: pytest.FixtureRequest, origin: Origin, sqlite_path: Path
) -> AsyncIterator[Callable[..., Awaitable[ProxyHandle]]]:
    base = _base_env(request, origin, sqlite_path)
    handles: list[ProxyHandle] = []

    async def factory(
        *, hit_path: bool = True, clock: Clock | None = None, **overrides: Any
    ) -> ProxyHandle:
        if clock is not None:
            origin.clock = clock  # the origin's Date agrees with the proxy's clock
        handle = await start_inprocess_proxy(
            apply_env(base, overrides), hit_path=hit_path, clock=clock
        )
        handles.append(handle)
        return handle

    try:
        yield factory
    finally:
        origin.release()  # nothing in the proxy's shutdown may wait on a hanging origin
        for handle in reversed(handles):
            await handle.close()


@pytest.fixture
async def spawn_proxy(
    request: pytest.FixtureRequest, origin: Origin, sqlite_path: Path, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[SpawnedProxy]]]:
    base = _base_env(request, origin, sqlite_path)
    spawned: list[SpawnedProxy] = []

    async def factory(
        *, wait_healthy: bool = True, healthy_timeout: float = 15.0, **overrides: Any
    ) -> SpawnedProxy:
        env = dict(base)
        env["TIERPROXY_HOST"] = "127.0.0.1"
        env["TIERPROXY_PORT"] = str(free_port())
        env["TIERPROXY_ADMIN_PORT"] = str(free_port())
        env = apply_env(env, overrides)
        proc = start_subprocess_proxy(env, tmp_path / "logs", tmp_path)
        spawned.append(proc)
        if wait_healthy:
            await proc.wait_healthy(healthy_timeout)
        return proc

    try:
        yield factory
    finally:
        origin.release()
        for proc in spawned:
            proc.cleanup()
