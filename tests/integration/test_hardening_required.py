"""Issue 10 §9: the hardened listener's protections never turn off silently.

tierproxy.aiohttp_internals reads aiohttp ``RequestHandler`` internals for its request-head and send
timeouts. An aiohttp without them (3.14.0-3.14.3 lack ``_buffer_paused``) must make
``tierproxy serve`` refuse to start with one clear line, unless the operator opts out with
``TIERPROXY_ALLOW_UNHARDENED=on`` (then it starts and says so in its log). The missing internal
is simulated by a ``sitecustomize`` shim on the child's PYTHONPATH that hides it exactly as
aiohttp 3.14.3 does (the attribute is in no ``__slots__`` of ``RequestHandler``'s classes).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import aiohttp
import pytest
from support.net import free_port
from support.origin import Origin
from support.proxy import REPO_ROOT, SpawnedProxy, start_subprocess_proxy

_SHIM = """
import aiohttp.web_protocol as _wp
for _cls in _wp.RequestHandler.__mro__:
    if "_buffer_paused" in _cls.__dict__.get("__slots__", ()):
        _cls.__slots__ = tuple(n for n in _cls.__slots__ if n != "_buffer_paused")
"""


def _shim_dir(tmp_path: Path, code: str = _SHIM) -> Path:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(code)
    return shim


def _spawn(origin: Origin, tmp_path: Path, shim: str = _SHIM, **env: str) -> SpawnedProxy:
    full_env = {
        "TIERPROXY_ORIGIN": origin.url,
        "TIERPROXY_SQLITE_PATH": "off",
        "TIERPROXY_HOST": "127.0.0.1",
        "TIERPROXY_PORT": str(free_port()),
        "TIERPROXY_ADMIN_PORT": str(free_port()),
        **env,
    }
    return start_subprocess_proxy(
        full_env, tmp_path / "logs", tmp_path, extra_pythonpath=[str(_shim_dir(tmp_path, shim))]
    )


async def test_serve_refuses_to_start_when_aiohttp_lacks_the_listener_internals(
    origin: Origin, tmp_path: Path
) -> None:
    proxy = _spawn(origin, tmp_path)
    try:
        code = await proxy.wait(timeout=20)
        lines = [line for line in proxy.stderr.splitlines() if line.strip()]
    finally:
        proxy.cleanup()
    assert code == 2, proxy.stderr
    assert len(lines) == 1, lines  # one clear line, no traceback
    line = lines[0]
    assert line.startswith("tierproxy: cannot start: aiohttp "), line
    assert "RequestHandler._buffer_paused" in line
    assert "TIERPROXY_ALLOW_UNHARDENED=on" in line


async def test_the_opt_out_starts_unhardened_and_says_so(origin: Origin, tmp_path: Path) -> None:
    proxy = _spawn(origin, tmp_path, TIERPROXY_ALLOW_UNHARDENED="on")
    try:
        await proxy.wait_healthy(20)
        async with aiohttp.ClientSession() as session, session.get(proxy.url + "/x") as resp:
            assert resp.status == 200
        warnings = [line for line in proxy.stderr.splitlines() if "serving unhardened" in line]
        assert len(warnings) == 1, proxy.stderr
        assert "RequestHandler._buffer_paused" in warnings[0]
    finally:
        proxy.cleanup()


def test_the_pin_admits_only_aiohttp_versions_with_the_internals() -> None:
    # The lower bound of the pin is the oldest version verified to have the internals (CI
    # runs the listener tests on it: .ci/run's OLDEST_AIOHTTP), and the installed one has them.
    from tierproxy.aiohttp_internals import missing_internals

    assert missing_internals() == []
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = [d for d in project["dependencies"] if d.startswith("aiohttp")]
    assert pins == ["aiohttp>=3.14.4,<3.15"], pins
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    oldest = re.search(r"^OLDEST_AIOHTTP=(\S+)$", ci, re.MULTILINE)
    assert oldest is not None and oldest.group(1) == "3.14.4", "CI must test the pin's lower bound"


@pytest.mark.parametrize("value", ["yes", "1", "maybe"])
def test_the_opt_out_takes_on_or_off_only(value: str) -> None:
    from tierproxy.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="TIERPROXY_ALLOW_UNHARDENED"):
        load_settings(
            {"TIERPROXY_ORIGIN": "http://127.0.0.1:9", "TIERPROXY_ALLOW_UNHARDENED": value}
        )


_CONNECTOR_SHIM = """
import aiohttp.connector
del aiohttp.connector.BaseConnector._wait_for_available_connection
"""


async def test_serve_refuses_to_start_when_aiohttp_lacks_the_origin_connector_hooks(
    origin: Origin, tmp_path: Path
) -> None:
    """Without the connector hooks a pooled origin connection holding a stray response could be
    reused and its bytes cached as another request's answer: no opt-out, one clear line."""
    # The listener's opt-out does not cover this.
    proxy = _spawn(origin, tmp_path, _CONNECTOR_SHIM, TIERPROXY_ALLOW_UNHARDENED="on")
    try:
        code = await proxy.wait(timeout=20)
        lines = [line for line in proxy.stderr.splitlines() if line.strip()]
    finally:
        proxy.cleanup()
    assert code == 2, proxy.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith("tierproxy: cannot start: aiohttp "), lines[0]
    assert "connector internals" in lines[0], lines[0]
