"""Fixtures for the hostile-input suite (issue 4).

``make_proxy`` is overridden here: the same in-process proxy as the integration suite's, but
run by :class:`tierproxy.listener.ProxyRunner` - what ``tierproxy serve`` runs - so the
header read timeout and the 414/431 answers are those of production. Every other fixture
(``origin``, ``redis_url``, ``canary``, ``spawn_proxy``, ...) is the shared one.

``echo_origin`` is an origin that reflects request headers into a cacheable response: the
poisoning tests check that what one client sends never reaches what another is served.
``helpers.py``: ``raw_exchange`` / ``RawConnection`` talk bytes to the proxy (aiohttp's client would
normalise or refuse what these tests need to send).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from support.origin import Origin
from support.proxy import ProxyHandle, apply_env

from .helpers import EchoOrigin


class _ProductionTestServer(TestServer):
    """TestServer with the production runner and aiohttp's production handler settings."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        from tierproxy.listener import ProxyRunner
        from tierproxy.server import STATE

        kwargs["handler_cancellation"] = False
        kwargs.setdefault("shutdown_timeout", 5.0)
        settings = self.app[STATE].settings
        return ProxyRunner(self.app, header_timeout=settings.header_timeout,
                           send_timeout=settings.send_timeout, **kwargs)


async def start_production_proxy(env: dict[str, str]) -> ProxyHandle:
    import tierproxy.config
    import tierproxy.server

    settings = tierproxy.config.load_settings(dict(env))
    app = tierproxy.server.build_app(settings)
    client: TestClient[Any, Any] = TestClient(_ProductionTestServer(app, host="127.0.0.1"))
    await client.start_server()
    return ProxyHandle(client, app, settings, dict(env))


@pytest.fixture
async def make_proxy(
    request: pytest.FixtureRequest, origin: Origin, sqlite_path: Path
) -> AsyncIterator[Callable[..., Awaitable[ProxyHandle]]]:
    base = {"TIERPROXY_ORIGIN": origin.url, "TIERPROXY_SQLITE_PATH": str(sqlite_path)}
    if "redis_url" in request.fixturenames:
        base["TIERPROXY_REDIS_URL"] = request.getfixturevalue("redis_url")
    handles: list[ProxyHandle] = []

    async def factory(**overrides: Any) -> ProxyHandle:
        handle = await start_production_proxy(apply_env(base, overrides))
        handles.append(handle)
        return handle

    try:
        yield factory
    finally:
        origin.release()
        for handle in reversed(handles):
            await handle.close()


@pytest.fixture
async def echo_origin() -> AsyncIterator[EchoOrigin]:
    server = await EchoOrigin().start()
    try:
        yield server
    finally:
        await server.close()
