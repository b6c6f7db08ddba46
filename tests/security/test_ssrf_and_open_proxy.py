"""Issue 4, line 6: SSRF / open proxy.

Nothing a client sends makes the proxy connect anywhere but TIERPROXY_ORIGIN: not an
absolute-form target, not Host, not a redirect from the origin, not CONNECT. A canary
listener on 127.0.0.2 stands for "anywhere else" and must see no connection at all.
"""

from __future__ import annotations

import pytest
from support.fixture_types import MakeProxy
from support.net import CanaryListener
from support.origin import Origin

from .helpers import raw_exchange, status_of


def _request(method: str, target: str, host: str, extra: str = "") -> bytes:
    return (
        f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
    ).encode("latin-1")


@pytest.mark.parametrize(
    ("target", "host_header", "extra"),
    [
        ("http://{canary}/x", "{canary}", ""),
        ("https://{canary}/x", "{canary}", ""),
        ("http://user:pw@{canary}/x", "{canary}", ""),
        ("http://{canary}", "{canary}", ""),
        ("HTTP://{canary}/x?y=1", "{canary}", ""),
        ("//{canary}/x", "{canary}", ""),
        ("/x", "{canary}", ""),
        ("/x", "localhost", "X-Forwarded-Host: {canary}\r\nForwarded: host={canary}\r\n"),
        ("/@{canary}/x", "{canary}", ""),
        (
            "/x",
            "{canary}",
            "X-Original-URL: http://{canary}/\r\nX-Rewrite-URL: http://{canary}/\r\n",
        ),
    ],
    ids=[
        "absolute-http",
        "absolute-https",
        "absolute-userinfo",
        "absolute-no-path",
        "absolute-upper-scheme",
        "network-path",
        "host-header",
        "forwarded-host-headers",
        "at-sign-path",
        "rewrite-url-headers",
    ],
)
async def test_no_request_makes_the_proxy_connect_anywhere_but_the_origin(
    target: str,
    host_header: str,
    extra: str,
    origin: Origin,
    make_proxy: MakeProxy,
    canary: CanaryListener,
) -> None:
    proxy = await make_proxy()
    fill = {"canary": canary.authority}

    response = await raw_exchange(
        proxy.port,
        _request("GET", target.format(**fill), host_header.format(**fill), extra.format(**fill)),
    )

    assert canary.connections == 0
    assert b"canary" not in response.partition(b"\r\n\r\n")[2]
    assert status_of(response) in (200, 400), response[:300]
    for seen in origin.requests:
        assert seen.headers["Host"] == f"127.0.0.1:{origin.port}"
        assert seen.path_qs.startswith("/") and "://" not in seen.path_qs


async def test_connect_is_refused_with_405(
    origin: Origin, make_proxy: MakeProxy, canary: CanaryListener
) -> None:
    proxy = await make_proxy()

    response = await raw_exchange(
        proxy.port, _request("CONNECT", canary.authority, canary.authority)
    )

    assert status_of(response) == 405, response[:300]
    assert canary.connections == 0
    assert origin.count() == 0


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_origin_redirects_are_passed_to_the_client_never_followed(
    status: int, origin: Origin, make_proxy: MakeProxy, canary: CanaryListener
) -> None:
    location = f"http://{canary.authority}/internal"
    origin.set("/go", status=status, headers={"Location": location})
    proxy = await make_proxy()

    response = await proxy.get("/go")

    assert response.status == status
    assert response.headers["Location"] == location  # passed on unchanged, not rewritten
    assert canary.connections == 0
    assert origin.count() == 1


async def test_environment_proxy_settings_are_ignored(
    origin: Origin, make_proxy: MakeProxy, canary: CanaryListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An HTTP_PROXY in the proxy's environment must not divert origin fetches (trust_env off)."""
    monkeypatch.setenv("HTTP_PROXY", f"http://{canary.authority}")
    monkeypatch.setenv("http_proxy", f"http://{canary.authority}")
    proxy = await make_proxy()

    response = await proxy.get("/via-env")

    assert response.status == 200
    assert canary.connections == 0
    assert origin.count() == 1
