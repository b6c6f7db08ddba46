"""Fixtures for the hostile-input suite (issue 4).

Every proxy fixture (``make_proxy``, ``spawn_proxy``) is the shared one: ``make_proxy`` runs the
app with the runner ``tierproxy serve`` uses (``tierproxy.server.make_runner``), so the header
read timeout, the 414/431 answers and the connection's L1 hit path are those of production.

``echo_origin`` is an origin that reflects request headers into a cacheable response: the
poisoning tests check that what one client sends never reaches what another is served.
``helpers.py``: ``raw_exchange`` / ``RawConnection`` talk bytes to the proxy (aiohttp's client would
normalise or refuse what these tests need to send).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .helpers import EchoOrigin


@pytest.fixture
async def echo_origin() -> AsyncIterator[EchoOrigin]:
    server = await EchoOrigin().start()
    try:
        yield server
    finally:
        await server.close()
