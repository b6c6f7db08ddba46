"""Issue 4, line 8: purge abuse.

PURGE is answered by the proxy and never forwarded; without the bearer token it evicts nothing
from any tier; the token is compared in constant time.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.fixture_types import MakeProxy
from support.origin import Origin
from support.proxy import ProxyHandle
from support.storage import redis_key, sqlite_row

TOKEN = "s3cret-purge-token-0123456789"


async def _cached_everywhere(
    proxy: ProxyHandle, redis_client: Any, sqlite_path: Path, target: str = "/doc?v=1"
) -> None:
    first = await proxy.get(target)
    assert first.x_cache == "MISS", first
    await proxy.settle()
    assert _held(proxy, redis_client, sqlite_path, target) == (True, True, True)


def _held(
    proxy: ProxyHandle, redis_client: Any, sqlite_path: Path, material: str
) -> tuple[bool, bool, bool]:

    l1 = proxy.state.tiers[0].backend.get_now(proxy.state.keys.key(material)) is not None
    l2 = redis_client.exists(redis_key(material, proxy.settings.origin)) == 1
    l3 = sqlite_row(sqlite_path, material, proxy.settings.origin) is not None
    return l1, l2, l3


async def test_purge_is_refused_and_never_forwarded_when_no_token_is_configured(
    origin: Origin, make_proxy: MakeProxy, redis_client: Any, sqlite_path: Path
) -> None:
    proxy = await make_proxy(PURGE_TOKEN=None)
    await _cached_everywhere(proxy, redis_client, sqlite_path)

    response = await proxy.request("PURGE", "/doc?v=1", headers={"Authorization": "Bearer x"})

    assert response.status == 405, response
    assert _held(proxy, redis_client, sqlite_path, "/doc?v=1") == (True, True, True)
    assert origin.count(method="PURGE") == 0


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer " + "x" * len(TOKEN)},
        {"Authorization": "Bearer " + TOKEN[:-1]},
        {"Authorization": "Bearer " + TOKEN + "x"},
        {"Authorization": "Bearer " + TOKEN.upper()},
        {"Authorization": TOKEN},
        {"Authorization": "Basic " + TOKEN},
        {"Authorization": "Bearer  " + TOKEN},
        {"X-Purge-Token": TOKEN},
        {"Proxy-Authorization": "Bearer " + TOKEN},
        {"Cookie": "token=" + TOKEN},
    ],
    ids=[
        "none",
        "wrong-same-length",
        "prefix",
        "suffix-added",
        "wrong-case",
        "no-scheme",
        "basic",
        "double-space",
        "other-header",
        "proxy-authorization",
        "cookie",
    ],
)
async def test_an_unauthorized_purge_evicts_nothing_from_any_tier(
    headers: dict[str, str],
    origin: Origin,
    make_proxy: MakeProxy,
    redis_client: Any,
    sqlite_path: Path,
) -> None:
    proxy = await make_proxy(PURGE_TOKEN=TOKEN)
    await _cached_everywhere(proxy, redis_client, sqlite_path)

    response = await proxy.request("PURGE", "/doc?v=1", headers=headers)
    again = await proxy.get("/doc?v=1")

    assert response.status == 401, response
    assert _held(proxy, redis_client, sqlite_path, "/doc?v=1") == (True, True, True)
    assert again.x_cache == "HIT-L1"
    assert origin.count() == 1 and origin.count(method="PURGE") == 0


async def test_a_token_in_the_query_string_is_part_of_the_key_not_a_credential(
    origin: Origin, make_proxy: MakeProxy, redis_client: Any, sqlite_path: Path
) -> None:
    proxy = await make_proxy(PURGE_TOKEN=TOKEN)
    await _cached_everywhere(proxy, redis_client, sqlite_path)

    response = await proxy.request("PURGE", f"/doc?v=1&token={TOKEN}")

    assert response.status == 401
    assert _held(proxy, redis_client, sqlite_path, "/doc?v=1") == (True, True, True)


async def test_an_authorized_purge_evicts_from_every_tier_and_is_not_forwarded(
    origin: Origin, make_proxy: MakeProxy, redis_client: Any, sqlite_path: Path
) -> None:
    proxy = await make_proxy(PURGE_TOKEN=TOKEN)
    await _cached_everywhere(proxy, redis_client, sqlite_path)

    response = await proxy.request(
        "PURGE", "/doc?v=1", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    await proxy.settle()

    assert response.status == 200, response
    assert _held(proxy, redis_client, sqlite_path, "/doc?v=1") == (False, False, False)
    assert origin.count(method="PURGE") == 0
    assert origin.count() == 1


async def test_a_method_override_header_cannot_smuggle_a_purge_to_the_origin(
    origin: Origin, make_proxy: MakeProxy, redis_client: Any, sqlite_path: Path
) -> None:
    proxy = await make_proxy(PURGE_TOKEN=TOKEN)

    await proxy.request(
        "POST",
        "/doc",
        data=b"x",
        headers={
            "X-HTTP-Method-Override": "PURGE",
            "X-HTTP-Method": "PURGE",
            "X-Method-Override": "PURGE",
        },
    )

    [seen] = origin.requests
    assert seen.method == "POST"
    assert not {"X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"} & set(seen.headers)


def _tierproxy_sources() -> Iterator[tuple[str, str]]:
    import tierproxy

    for path in sorted(Path(tierproxy.__file__).parent.rglob("*.py")):
        yield path.name, path.read_text()


def test_purge_tokens_are_only_ever_compared_in_constant_time() -> None:
    """Wherever the purge token is checked, it is with hmac.compare_digest, never == / !=.

    (Timing cannot be measured reliably in a test; the code that compares can be read.)
    """
    checked = 0
    for name, source in _tierproxy_sources():
        if "purge_token" not in source:
            continue
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            if not any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                continue
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            names |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
            assert not names & {"token", "purge_token", "supplied"}, (
                f"{name} line {node.lineno} compares the token with == / !="
            )
        if "compare_digest" in source:
            checked += 1
    assert checked >= 1, "no module compares the purge token with hmac.compare_digest"
