"""The admin listener: liveness, readiness, metrics and purge. Nothing here is ever proxied.

``GET /healthz`` - liveness: 200 ``ok`` whenever the event loop answers. Restart on failure.

``GET /readyz`` - readiness, JSON, and the rule for it:

* **200** while the proxy listener is serving: from the moment every tier is open (or, for
  L3, found unavailable: see ``unavailable`` below) until shutdown begins. A tier or the origin being down is *not* a reason to be unready - the proxy
  still answers, from the other tiers, from stale copies, or with a fast 502/504 - and taking
  every replica out of a load balancer because Redis or the origin is down (they share both)
  would turn degraded service into none.
* **503** only while the proxy cannot serve at all: before start-up has opened the tiers, and
  from the start of shutdown (while in-flight requests finish and backfills drain).

The body names each tier's state, for people and dashboards, never for the status code:

* ``up`` - working; the last operation succeeded.
* ``degraded`` - recent consecutive failures (timeouts/errors) below the breaker threshold,
  or lookups work but writes fail (e.g. L3 on a full disk: writes are skipped for a
  cool-down by their own breaker, ``tierproxy_breaker_open{tier="l3-writes"}``, while
  what is stored is still served); for the origin, its last fetch failed (error, timeout
  or 5xx).
* ``breaker-open`` - the breaker opened after ``TIERPROXY_BREAKER_FAILURES`` consecutive
  failures: the tier is skipped (counted as ``skipped``) until a probe after
  ``TIERPROXY_BREAKER_COOLDOWN`` seconds succeeds (``half-open`` while probing).
* ``unavailable`` - the tier's storage cannot be used at all: the L3 file could not be opened
  (locked, unreadable, on a full disk) or was found deleted or corrupt under the running
  proxy. Lookups and writes skip it; it is reopened in the background (with backoff, at most
  ``TIERPROXY_BREAKER_COOLDOWN`` apart) and a corrupt file is moved aside as
  ``<path>.corrupt-<unix time>``. Said once in the log when it happens and when it is over.
* ``disabled`` - not configured (``TIERPROXY_L1_MAX_BYTES=0``, no ``TIERPROXY_REDIS_URL``,
  ``TIERPROXY_SQLITE_PATH=off``).

``timeouts`` gives each configured tier's lookup timeout in seconds, as
``tierproxy_tier_timeout_seconds`` does: learned from its recent latencies with
``TIERPROXY_ADAPTIVE_TIMEOUTS=on`` (L2, L3), else the configured one; ``origin`` is
``TIERPROXY_ORIGIN_TIMEOUT``.

``invalidation`` is the replicas' purge channel: ``connected``, ``connecting`` or ``disabled``
(no L2). ``purge_lease``: ``held`` (local copies may be served fresh), ``lapsed`` (the channel
was not confirmed within ``TIERPROXY_PURGE_LEASE``: local copies are revalidated before they
are served) or ``disabled`` (no L2). See :mod:`tierproxy.invalidation`.

``GET /metrics`` - Prometheus text format.

``POST /purge`` - ``Authorization: Bearer <TIERPROXY_PURGE_TOKEN>`` and a JSON body
``{"keys": ["/path?q"], "tags": ["t1"], "soft": false}``: removes the keys and every entry
tagged (``Surrogate-Key``) with one of the tags from every tier and every replica's L1;
``"soft": true`` marks them stale instead, so they are revalidated but can still be served if
the origin fails. 200 with counts, once every other live replica applied it or was fenced
(``replicas_acked``, ``replicas_fenced``); 503 with the same body when a tier, the purge log
or a replica's acknowledgement failed (``replicas_unconfirmed``; retry); 400 for a bad body; 401 for a missing or wrong token; 405 when no token is set.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .invalidation import PurgeOrder
from .keys import BadTarget, KeySpace
from .purge_handler import purge_authorized
from .state import STATE, ProxyState

if TYPE_CHECKING:
    from .workers import Supervisor

__all__ = [
    "ADMIN_HANDLER_ARGS",
    "MAX_PURGE_ITEMS",
    "build_admin_app",
    "build_group_admin_app",
    "readiness",
]

TIERS = ("l1", "l2", "l3")
MAX_PURGE_ITEMS = 10_000  # keys + tags in one POST /purge
_MAX_PURGE_BODY = 4 * 1024 * 1024
#: The admin listener's RequestHandler arguments (its app's handler_args, and its runner's).
ADMIN_HANDLER_ARGS: dict[str, Any] = {"keepalive_timeout": 15.0}


def _tier_state(state: ProxyState, name: str) -> str:
    tier = state.tier(name)
    if tier is None:
        return "disabled"
    return tier.state()


def _lease_state(state: ProxyState) -> str:
    trust = state.invalidation.trust
    if trust is None:
        return "disabled"
    return "held" if trust.held() else "lapsed"


def readiness(state: ProxyState) -> tuple[bool, dict[str, object]]:
    """(ready, body) by the rule in the module docstring."""
    tiers = {name: _tier_state(state, name) for name in TIERS}
    tiers["origin"] = state.readthrough.origin_breaker.health()
    timeouts = {tier.name: tier.lookup_timeout for tier in state.tiers}
    timeouts["origin"] = state.settings.origin_timeout
    body: dict[str, object] = {
        "ready": state.ready,
        "tiers": tiers,
        "timeouts": timeouts,
        "invalidation": state.invalidation.state,
        "purge_lease": _lease_state(state),
        "inflight": state.inflight,
        "background_tasks": state.background.pending,
    }
    return state.ready, body


def _bad(text: str) -> web.Response:
    return web.json_response({"error": text}, status=400)


def _purge_order(payload: Any, now: float, keyspace: KeySpace) -> PurgeOrder | str:
    """The validated order, or what is wrong with the body."""
    if not isinstance(payload, dict):
        return 'expected a JSON object: {"keys": [...], "tags": [...], "soft": false}'
    unknown = set(payload) - {"keys", "tags", "soft"}
    if unknown:
        return f"unknown fields: {sorted(unknown)}"
    keys, tags, soft = payload.get("keys", []), payload.get("tags", []), payload.get("soft", False)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        return '"keys" must be a list of strings such as "/path?q=1"'
    if not isinstance(tags, list) or not all(
        isinstance(t, str) and t and " " not in t for t in tags
    ):
        return '"tags" must be a list of non-empty strings without spaces'
    if not isinstance(soft, bool):
        return '"soft" must be true or false'
    if not keys and not tags:
        return 'nothing to purge: give "keys" and/or "tags"'
    if len(keys) + len(tags) > MAX_PURGE_ITEMS:
        return f"at most {MAX_PURGE_ITEMS} keys and tags per request"
    materials: dict[str, None] = {}
    for key in keys:
        if not key.startswith("/"):
            return f"key {key[:100]!r} must start with '/' (a path, optional query)"
        try:
            # The same key a request for it gets (query rules included).
            materials[keyspace.for_target(key).material] = None
        except BadTarget as exc:
            return f"key {key[:100]!r} cannot be used: {exc}"
    return PurgeOrder(tuple(materials), tuple(dict.fromkeys(tags)), soft, now)


def build_admin_app(proxy_app: web.Application) -> web.Application:
    state = proxy_app[STATE]
    # Idle admin connections go soon: the admin port keeps few (tierproxy.listener
    # ADMIN_MAX_CONNECTIONS, oldest idle closed first) so that it always answers.
    app = web.Application(client_max_size=_MAX_PURGE_BODY, handler_args=ADMIN_HANDLER_ARGS)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        ready, body = readiness(state)
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(state.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    async def purge(request: web.Request) -> web.Response:
        token = state.settings.purge_token
        if token is None:
            return web.json_response(
                {"error": "purge is disabled: set TIERPROXY_PURGE_TOKEN to enable it"}, status=405
            )
        if not purge_authorized(request, token):
            state.metrics.purge_requests.labels("admin", "unauthorized").inc()
            return web.json_response({"error": "unauthorized"}, status=401)
        try:
            payload = await request.json(loads=json.loads)
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": "body too large"}, status=413)
        except ValueError:
            return _bad("body is not JSON")
        order = _purge_order(payload, state.clock.wall(), state.keys)
        if isinstance(order, str):
            return _bad(order)
        outcome = await state.invalidation.purge(order, "admin")
        return web.json_response(outcome.body, status=200 if outcome.ok else 503)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/purge", purge)
    return app


def build_group_admin_app(group: Supervisor) -> web.Application:
    """The admin port of a group of workers (``TIERPROXY_WORKERS`` > 1), served by their
    supervisor (:mod:`tierproxy.workers`). Same routes as one process's:

    * ``/healthz``: 200 while the supervisor's event loop answers.
    * ``/readyz``: 200 when every worker answers its own /readyz with 200; the body has each
      worker's (``workers``: pid, ready, and its readiness body or what went wrong). 503
      while a worker is starting, being restarted or not answering, and from shutdown on.
    * ``/metrics``: every worker's metrics summed (counters and histograms over every
      worker that ran, gauges over the live ones unless their help says otherwise), then the
      supervisor's own (``tierproxy_workers``, ``tierproxy_worker_restarts_total``).
    * ``POST /purge``: handed to one worker, which purges every tier and every other
      worker's L1 before it answers.
    """
    app = web.Application(client_max_size=_MAX_PURGE_BODY, handler_args=ADMIN_HANDLER_ARGS)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        answers = await asyncio.gather(*(group.worker_ready(slot) for slot in group.slots))
        workers = [
            {
                "worker": slot.index,
                "pid": slot.proc.pid if slot.proc is not None else None,
                "ready": ready,
                "restarts": slot.restarts,
                "readiness": body,
            }
            for slot, (ready, body) in zip(group.slots, answers, strict=True)
        ]
        ready = not group.stopping and all(answer[0] for answer in answers)
        return web.json_response({"ready": ready, "workers": workers}, status=200 if ready else 503)

    async def metrics(request: web.Request) -> web.Response:
        text = generate_latest(group.group_registry()) + generate_latest(group.registry)
        return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def purge(request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": "body too large"}, status=413)
        headers = {
            name: value
            for name in ("Authorization", "Content-Type")
            if (value := request.headers.get(name)) is not None
        }
        return await group.forward_purge(body, headers)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/purge", purge)
    return app
