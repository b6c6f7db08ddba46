"""The upstream is always TIERPROXY_ORIGIN: neither Host nor an absolute-form target moves it.

A canary listener on 127.0.0.2 stands for "somewhere else": it must see no connection.
Requests that aiohttp's client would normalise are sent as raw bytes.
"""

from __future__ import annotations

import pytest
from support.fixture_types import MakeProxy
from support.net import CanaryListener, raw_http_exchange
from support.origin import Origin


def _raw(target: str, host: str, extra: str = "") -> bytes:
    return (f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n").encode(
        "latin-1"
    )


async def test_absolute_form_target_never_changes_the_upstream(
    origin: Origin, make_proxy: MakeProxy, canary: CanaryListener
) -> None:
    proxy = await make_proxy()

    response = await raw_http_exchange(
        "127.0.0.1", proxy.port, _raw(f"http://{canary.authority}/x?y=1", canary.authority)
    )

    assert response.status == 200, response.raw[:300]
    assert response.body == b"origin body for /x?y=1 (request 1)"
    assert canary.connections == 0
    [seen] = origin.requests
    assert seen.path_qs == "/x?y=1"
    assert seen.headers["Host"] == f"127.0.0.1:{origin.port}"
    # Scheme and authority are not part of the key: the origin-form request is the same entry.
    again = await proxy.get("/x?y=1")
    assert again.x_cache == "HIT-L1", again
    assert origin.count() == 1


@pytest.mark.parametrize(
    "target",
    [
        "http://{canary}",
        "https://{canary}/x",
        "//{canary}/x",
        "http://user:pw@{canary}/x",
        "http://{canary}/../../x",
    ],
    ids=["absolute-no-path", "https-absolute", "network-path", "userinfo", "dot-segments"],
)
async def test_odd_request_targets_never_reach_another_host(
    target: str, origin: Origin, make_proxy: MakeProxy, canary: CanaryListener
) -> None:
    proxy = await make_proxy()

    response = await raw_http_exchange(
        "127.0.0.1", proxy.port, _raw(target.format(canary=canary.authority), canary.authority)
    )

    assert canary.connections == 0
    assert response.status != 500 and response.status < 600, response.raw[:300]
    assert response.body != b"canary"
    # Whatever reached the origin was an origin-form target on the configured origin.
    for seen in origin.requests:
        assert seen.path_qs.startswith("/") and "://" not in seen.path_qs, seen
        assert seen.headers["Host"] == f"127.0.0.1:{origin.port}"


async def test_absolute_form_target_with_an_empty_path_means_the_root(
    origin: Origin, make_proxy: MakeProxy, canary: CanaryListener
) -> None:
    """RFC 9110 §4.2.3: an http URI with an empty path is equivalent to one with "/"."""
    proxy = await make_proxy()

    response = await raw_http_exchange(
        "127.0.0.1", proxy.port, _raw(f"http://{canary.authority}", canary.authority)
    )

    assert canary.connections == 0
    assert response.status == 200, response.raw[:300]
    assert response.headers.get("X-Cache") == "MISS", response.raw[:300]
    assert [r.path_qs for r in origin.requests] == ["/"]


async def test_host_header_never_changes_the_upstream(
    origin: Origin, make_proxy: MakeProxy, canary: CanaryListener
) -> None:
    proxy = await make_proxy()

    via_client = await proxy.get("/h", headers={"Host": canary.authority})
    via_raw = await raw_http_exchange("127.0.0.1", proxy.port, _raw("/h2", canary.authority))

    assert via_client.status == 200, via_client
    assert via_raw.status == 200, via_raw.raw[:300]
    assert canary.connections == 0
    assert [r.path for r in origin.requests] == ["/h", "/h2"]
    for seen in origin.requests:
        assert seen.headers["Host"] == f"127.0.0.1:{origin.port}"


async def test_forwarded_headers_are_set_and_hop_by_hop_headers_dropped(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy()

    response = await proxy.get(
        "/fw",
        headers={
            "X-End-To-End": "kept",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "TE": "trailers",
        },
    )

    assert response.status == 200, response
    [seen] = origin.requests
    assert seen.headers.get("X-End-To-End") == "kept"
    assert seen.headers.get("X-Forwarded-For", "").split(",")[-1].strip() == "127.0.0.1"
    assert seen.headers.get("X-Forwarded-Proto") == "http"
    for hop in ("Keep-Alive", "Proxy-Authorization", "TE"):
        assert hop not in seen.headers, (hop, dict(seen.headers))
