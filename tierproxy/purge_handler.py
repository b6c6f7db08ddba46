"""``PURGE <path>`` on the proxy port, and the bearer-token check it shares with the admin
port's ``POST /purge`` (:mod:`tierproxy.admin`)."""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING

from aiohttp import web

from .invalidation import PurgeOrder
from .response import REFUSED, plain

if TYPE_CHECKING:
    from .keys import CacheKey
    from .state import ProxyState

__all__ = ["purge", "purge_authorized"]


def purge_authorized(request: web.Request, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time: the comparison must not
    reveal how much of the token was right. Shared by PURGE and the admin ``POST /purge``."""
    supplied = request.headers.get("Authorization", "")
    return hmac.compare_digest(
        supplied.encode("utf-8", "surrogateescape"), f"Bearer {token}".encode()
    )


async def purge(request: web.Request, state: ProxyState, key: CacheKey) -> web.Response:
    """``PURGE <path>``: the key (its entry, or every variant of a URL that varies) from every
    tier and every replica's local tiers. ``Soft-Purge: 1`` marks it stale instead of deleting
    it. With replicas, 200 once each live one applied it or was fenced (see
    tierproxy.invalidation); 503 when that or a tier could not be confirmed."""
    token = state.settings.purge_token
    if token is None:
        return plain(405, "405 PURGE is disabled: set TIERPROXY_PURGE_TOKEN to enable it")
    if not purge_authorized(request, token):
        state.metrics.purge_requests.labels("proxy", "unauthorized").inc()
        return plain(401, "401 unauthorized")
    soft = request.headers.get("Soft-Purge", "0").strip() == "1"
    outcome = await state.invalidation.purge(
        PurgeOrder((key.material,), (), soft, state.clock.wall()), "proxy"
    )
    body = {"key": key.material, **outcome.body}
    return web.Response(
        status=200 if outcome.ok else 503,
        text=json.dumps(body),
        content_type="application/json",
        headers={"X-Cache": REFUSED[0]},  # no tier handled it: no Cache-Status member
    )
