"""Why a tier's lookup found nothing (tierproxy.lookups.tier_get, tiers.base.MISS_REASON): the
word each tier's RFC 9211 Cache-Status member carries. A real L1 and a real SQLite L3."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from multidict import CIMultiDict, CIMultiDictProxy

from tierproxy.config import load_settings
from tierproxy.entry import Entry
from tierproxy.keys import KeySpace
from tierproxy.lookups import outcome, tier_get
from tierproxy.metrics import Metrics
from tierproxy.states import ProxyRequest
from tierproxy.tiers import make_tiers
from tierproxy.tiers.base import MISS_REASON, Blob, GuardedTier

ORIGIN = "http://127.0.0.1:9000"
KEYS = KeySpace(ORIGIN)


def _headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(values))


def _entry(path: str, fresh_for: float, vary: tuple[tuple[str, str], ...] = ()) -> Entry:
    now = time.time()
    return Entry(
        key=path,
        status=200,
        headers=(("Vary", "Accept-Language"),) if vary else (),
        body=b"x",
        stored_at=now,
        fresh_until=now + fresh_for,
        stale_until=now + 100,
        swr_until=now,
        expires_at=now + 100,
        vary=vary,
    )


def _request(path: str, budget: float, **headers: str) -> ProxyRequest:
    return ProxyRequest(
        method="GET",
        key=KEYS.key(path),
        headers=_headers(**headers),
        peer=None,
        scheme="http",
        deadline=asyncio.get_running_loop().time() + budget,
    )


async def _tiers(tmp_path: Path, **env: str) -> tuple[GuardedTier, GuardedTier]:
    settings = load_settings(
        {
            "TIERPROXY_ORIGIN": ORIGIN,
            "TIERPROXY_SQLITE_PATH": str(tmp_path / "l3.sqlite3"),
            **{f"TIERPROXY_{name}": value for name, value in env.items()},
        }
    )
    l1, l3 = make_tiers(settings, Metrics(), KEYS)
    await l3.open()
    return l1, l3


async def test_each_way_a_tier_finds_nothing_has_its_word(tmp_path: Path) -> None:
    l1, l3 = await _tiers(tmp_path, BREAKER_FAILURES="1")
    loop = asyncio.get_running_loop()
    try:
        fresh, stale = _entry("/fresh", 60), _entry("/stale", -1)
        english = _entry("/v", 60, vary=(("accept-language", "en"),))
        for path, entry in (("/fresh", fresh), ("/stale", stale), ("/v", english)):
            assert await l3.set(KEYS.key(path), entry, Blob(entry))
        now = time.time()

        assert outcome(await tier_get(_request("/fresh", 1), l3, loop), now) == "hit"
        assert outcome(await tier_get(_request("/stale", 1), l3, loop), now) == "stale"
        assert await tier_get(_request("/none", 1), l3, loop) == (None, "uri-miss")
        assert await tier_get(_request("/v", 1, **{"Accept-Language": "de"}), l3, loop) == (
            None,
            "vary-miss",
        )
        got = await tier_get(_request("/v", 1, **{"Accept-Language": "en"}), l3, loop)
        assert outcome(got, now) == "hit"
        assert await tier_get(_request("/fresh", 0), l3, loop) == (None, "skipped")  # no budget

        l3.breaker.failure()  # one failure opens it here
        assert await tier_get(_request("/fresh", 1), l3, loop) == (None, "breaker-open")

        # The synchronous L1 says the same words.
        l1.set_now(KEYS.key("/v"), english)
        assert l1.get_now(KEYS.key("/v"), _headers(**{"Accept-Language": "de"})) is None
        assert MISS_REASON.get() == "vary-miss"
        assert l1.get_now(KEYS.key("/nothing"), _headers()) is None
        assert MISS_REASON.get() == "uri-miss"
    finally:
        await l3.close()
