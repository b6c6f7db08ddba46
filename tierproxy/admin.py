"""The admin listener: liveness, readiness, metrics. Nothing here is ever proxied."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .server import STATE, ProxyState

__all__ = ["build_admin_app", "readiness"]


def _tier_state(state: ProxyState, name: str) -> str:
    tier = state.tier(name)
    if tier is None:
        return "disabled"
    if tier.breaker.is_open:
        return "breaker-open"
    if tier.breaker.failures:
        return "degraded"
    return "up"


def readiness(state: ProxyState) -> tuple[bool, dict[str, object]]:
    """Ready while the proxy listener serves. A tier being down is not a reason to be unready:
    the proxy still answers (from other tiers or the origin), so pulling it from a load
    balancer would only turn degraded service into none."""
    tiers = {name: _tier_state(state, name) for name in ("l1", "l2", "l3")}
    body: dict[str, object] = {
        "ready": state.ready,
        "tiers": tiers,
        "inflight": state.inflight,
        "background_tasks": state.background.pending,
    }
    return state.ready, body


def build_admin_app(proxy_app: web.Application) -> web.Application:
    state = proxy_app[STATE]
    app = web.Application()

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        ready, body = readiness(state)
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(state.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
