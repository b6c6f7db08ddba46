"""What tierproxy's runners keep of aiohttp's server contract, on real servers and processes.

* No traceback reaches a client: aiohttp gives its connection handler ``debug=`` from the
  event loop's debug mode, and in it a handler exception's 500 carries the traceback; the
  proxy's runners pass ``debug=False`` always (the hardened listener, the admin listener, and
  the unhardened fallback).
* The runners take the app's ``handler_args`` explicitly (aiohttp has no public way to read
  them back): a runner built without them is an error, not aiohttp's 3630 s keep-alive.
* ``web.Server.requests_count`` (public; aiohttp's gunicorn worker's ``max_requests``) counts
  the requests the hit path answers too.
* ``tierproxy serve`` refuses to start, whatever ``TIERPROXY_ALLOW_UNHARDENED`` says, when
  aiohttp lacks what every response needs or what keeps origin connections clean - instance
  attributes of classes that are not slotted all the way down included.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from support.fixture_types import MakeProxy
from support.net import RawConnection, free_port
from support.origin import Origin
from support.proxy import REPO_ROOT, SpawnedProxy, start_subprocess_proxy

from tierproxy.aiohttp_internals import CappedRunner, ConnectionCap, ProxyRunner

SECRET = "a-detail-only-the-traceback-holds"


async def _fail(request: web.Request) -> web.Response:
    raise RuntimeError(SECRET)


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def _failing_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/fail", _fail)
    return app


def _runner(kind: str, app: web.Application) -> web.AppRunner:
    if kind == "proxy":
        return ProxyRunner(app, header_timeout=5.0, send_timeout=5.0, handler_args={})
    if kind == "admin":
        return CappedRunner(app, cap=ConnectionCap(8, "admin"), handler_args={})
    return web.AppRunner(app)  # aiohttp's own, for comparison


async def _get_fail(runner: web.AppRunner, accept: str) -> tuple[int, str]:
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"http://127.0.0.1:{port}/fail",
                headers={"Accept": accept},
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp,
        ):
            return resp.status, await resp.text()
    finally:
        await runner.cleanup()


@pytest.fixture
async def debug_loop() -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    before = loop.get_debug()
    loop.set_debug(True)  # as PYTHONASYNCIODEBUG=1 or python -X dev would
    try:
        yield
    finally:
        loop.set_debug(before)


@pytest.mark.parametrize("accept", ["text/plain", "text/html"])
@pytest.mark.parametrize("kind", ["proxy", "admin"])
async def test_a_handler_exception_in_asyncio_debug_mode_sends_no_traceback(
    debug_loop: None, kind: str, accept: str
) -> None:
    # The setup does reach aiohttp's debug mode: its own runner sends the traceback ...
    status, body = await _get_fail(_runner("aiohttp", _failing_app()), accept)
    assert status == 500 and SECRET in body and "Traceback" in body, body
    # ... tierproxy's runners do not.
    status, body = await _get_fail(_runner(kind, _failing_app()), accept)
    assert status == 500, body
    assert SECRET not in body and "Traceback" not in body, body
    assert "500 Internal Server Error" in body


# Runs in a child process whose aiohttp lacks RequestHandler._buffer_paused (as 3.14.3 does):
# the runners fall back to aiohttp's own connection handler, and must still send no traceback.
_HIDE_BUFFER_PAUSED = """
import aiohttp.web_protocol as _wp
for _cls in _wp.RequestHandler.__mro__:
    if "_buffer_paused" in _cls.__dict__.get("__slots__", ()):
        _cls.__slots__ = tuple(n for n in _cls.__slots__ if n != "_buffer_paused")
"""

_CHILD = """
import asyncio, json, sys
import aiohttp
from aiohttp import web
from tierproxy.aiohttp_internals import CappedRunner, ConnectionCap, ProxyRunner, missing_internals

async def fail(request):
    raise RuntimeError(%(secret)r)

async def get(runner):
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session:
            async with session.get(
                f"http://127.0.0.1:{port}/fail", timeout=aiohttp.ClientTimeout(total=10)
            ) as resp:
                return [resp.status, await resp.text()]
    finally:
        await runner.cleanup()

def app():
    a = web.Application()
    a.router.add_get("/fail", fail)
    return a

async def main():
    asyncio.get_running_loop().set_debug(True)
    out = {"missing": missing_internals()}
    out["aiohttp"] = await get(web.AppRunner(app()))
    out["proxy"] = await get(ProxyRunner(
        app(), header_timeout=5.0, send_timeout=5.0, handler_args={}, allow_unhardened=True
    ))
    out["admin"] = await get(CappedRunner(app(), cap=ConnectionCap(8, "admin"), handler_args={}))
    print(json.dumps(out))

asyncio.run(main())
"""


def test_the_unhardened_fallback_sends_no_traceback_in_asyncio_debug_mode(
    tmp_path: Path,
) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_HIDE_BUFFER_PAUSED)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD % {"secret": SECRET}],
        env={"PYTHONPATH": f"{shim}:{REPO_ROOT}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["missing"] == ["RequestHandler._buffer_paused"]
    status, body = out["aiohttp"]
    assert status == 500 and SECRET in body, body  # the child's loop is in debug mode
    for kind in ("proxy", "admin"):
        status, body = out[kind]
        assert status == 500, (kind, body)
        assert SECRET not in body and "Traceback" not in body, (kind, body)


def test_the_runners_take_the_apps_handler_args_explicitly() -> None:
    app = web.Application()
    with pytest.raises(TypeError, match="handler_args"):
        CappedRunner(app, cap=ConnectionCap(8, "admin"))  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="handler_args"):
        ProxyRunner(app, header_timeout=1.0, send_timeout=1.0)  # type: ignore[call-arg]


async def test_the_admin_runner_applies_the_handler_args_it_is_given() -> None:
    app = web.Application(handler_args={"keepalive_timeout": 15.0})
    app.router.add_get("/", _ok)
    runner = CappedRunner(
        app, cap=ConnectionCap(8, "admin"), handler_args={"keepalive_timeout": 15.0}
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        conn = await RawConnection.open(runner.addresses[0][1])
        try:
            await conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert b" 200 " in (await conn.read_response()).split(b"\r\n", 1)[0]
            server = runner.server
            assert server is not None
            # RequestHandler.keepalive_timeout: aiohttp's public view of the setting
            assert [h.keepalive_timeout for h in server.connections] == [15.0]
        finally:
            await conn.close()
    finally:
        await runner.cleanup()


async def test_hit_path_answers_count_in_the_servers_requests_count(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    origin.set("/counted", headers={"Cache-Control": "max-age=300"}, body=b"counted")
    proxy = await make_proxy()
    first = await proxy.get("/counted")  # a miss: the full path (start() counts it)
    assert first.status == 200
    server = proxy.client.server.runner.server  # type: ignore[union-attr]
    assert server is not None
    hits_before = (
        proxy.state.metrics.registry.get_sample_value("tierproxy_hit_path_responses_total") or 0.0
    )
    count_before = server.requests_count
    n = 7
    conn = await RawConnection.open(proxy.port)
    try:
        for _ in range(n):
            await conn.send(b"GET /counted HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
            response = await conn.read_response()
            assert response.endswith(b"counted") and b"X-Cache: HIT" in response, response[:300]
    finally:
        await conn.close()
    hits = proxy.state.metrics.registry.get_sample_value("tierproxy_hit_path_responses_total")
    assert hits == hits_before + n  # all answered by the hit path ...
    assert server.requests_count == count_before + n  # ... and counted as requests


def _spawn(origin: Origin, tmp_path: Path, shim: str, **env: str) -> SpawnedProxy:
    directory = tmp_path / "shim"
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(shim)
    full_env = {
        "TIERPROXY_ORIGIN": origin.url,
        "TIERPROXY_SQLITE_PATH": "off",
        "TIERPROXY_HOST": "127.0.0.1",
        "TIERPROXY_PORT": str(free_port()),
        "TIERPROXY_ADMIN_PORT": str(free_port()),
        **env,
    }
    return start_subprocess_proxy(
        full_env, tmp_path / "logs", tmp_path, extra_pythonpath=[str(directory)]
    )


async def _refused(proxy: SpawnedProxy) -> str:
    try:
        code = await proxy.wait(timeout=15)
        lines = [line for line in proxy.stderr.splitlines() if line.strip()]
    finally:
        proxy.cleanup()
    assert code == 2, proxy.stderr
    assert len(lines) == 1, lines  # one clear line, no traceback
    assert lines[0].startswith("tierproxy: cannot start: aiohttp "), lines[0]
    return lines[0]


# ResponseHandler is not slotted all the way down: its _payload is set by __init__, and no
# slot lists it. This aiohttp's ResponseHandler keeps the body being read elsewhere.
_NO_RESPONSE_PAYLOAD = """
import aiohttp.client_proto as _cp
_init = _cp.ResponseHandler.__init__
def __init__(self, loop):
    _init(self, loop)
    del self._payload
_cp.ResponseHandler.__init__ = __init__
"""


async def test_serve_refuses_to_start_when_the_origin_protocol_lacks_an_instance_attribute(
    origin: Origin, tmp_path: Path
) -> None:
    proxy = _spawn(origin, tmp_path, _NO_RESPONSE_PAYLOAD, TIERPROXY_ALLOW_UNHARDENED="on")
    assert "connector internals" in await _refused(proxy)


@pytest.mark.parametrize(
    "shim, name",
    [
        (
            "import aiohttp.web_response as _r\ndel _r.StreamResponse._write_headers\n",
            "StreamResponse._write_headers()",
        ),
        (
            "import aiohttp.web_runner as _r\ndel _r.AppRunner._make_server\n",
            "AppRunner._make_server()",
        ),
    ],
    ids=["_write_headers", "_make_server"],
)
async def test_serve_refuses_to_start_without_what_every_response_needs_even_when_opted_out(
    origin: Origin, tmp_path: Path, shim: str, name: str
) -> None:
    proxy = _spawn(origin, tmp_path, shim, TIERPROXY_ALLOW_UNHARDENED="on")
    line = await _refused(proxy)
    assert name in line and "every response needs" in line, line
