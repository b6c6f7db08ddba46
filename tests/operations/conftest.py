"""Fixtures for operating tierproxy: the admin listener of an in-process proxy, scrapes.

``admin_for(proxy)`` serves ``build_admin_app(proxy.app)`` (what ``tierproxy serve`` runs on
TIERPROXY_ADMIN_PORT) on its own loopback port and returns an :class:`Admin` client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from support.proxy import Fetched, fetch

TOKEN = "test-purge-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, parsed by prometheus_client's parser."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample ``name{labels}`` exactly; 0.0 when absent (a counter never touched)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def by_label(samples: Samples, name: str, label: str, **match: str) -> dict[str, float]:
    """{label value: sample value} for the non-zero samples of ``name`` matching ``match``."""
    out: dict[str, float] = {}
    for (sample_name, labels), sample_value in samples.items():
        tags = dict(labels)
        if sample_name != name or any(tags.get(k) != v for k, v in match.items()):
            continue
        if sample_value:
            out[tags[label]] = out.get(tags[label], 0.0) + sample_value
    return out


async def scrape_url(url: str) -> Samples:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp,
    ):
        assert resp.status == 200, resp.status
        return parse_metrics(await resp.text())


class Admin:
    """A client for one in-process proxy's admin app."""

    def __init__(self, client: TestClient[Any, Any]) -> None:
        self.client = client

    async def request(self, method: str, path: str, **kwargs: Any) -> Fetched:
        return await fetch(self.client, method, path, **kwargs)

    async def metrics(self) -> Samples:
        response = await self.request("GET", "/metrics")
        assert response.status == 200, response
        assert response.headers["Content-Type"].startswith("text/plain"), response
        return parse_metrics(response.body.decode())

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        import json

        response = await self.request("GET", "/readyz")
        return response.status, json.loads(response.body)

    async def purge(self, body: Any, headers: dict[str, str] | None = None) -> Fetched:
        return await self.request(
            "POST", "/purge", json=body, headers=AUTH if headers is None else headers
        )


# ``await admin_for(proxy)`` -> an Admin client for that proxy's admin app.
AdminFor = Callable[[Any], Awaitable[Admin]]


@pytest.fixture
async def admin_for() -> AsyncIterator[AdminFor]:
    from tierproxy.admin import build_admin_app

    clients: list[TestClient[Any, Any]] = []

    async def factory(proxy: Any) -> Admin:
        app = proxy if hasattr(proxy, "router") else proxy.app
        client: TestClient[Any, Any] = TestClient(
            TestServer(build_admin_app(app), host="127.0.0.1")
        )
        await client.start_server()
        clients.append(client)
        return Admin(client)

    try:
        yield factory
    finally:
        for client in reversed(clients):
            await client.close()
