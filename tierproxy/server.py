"""The composition root: the proxy listener's app, its runner, and what they are built from.

:func:`build_app` makes every component (tiers, origin client, background tasks, the
orchestrator, invalidation, access log) and the shared :class:`~tierproxy.state.ProxyState`,
registers the scrape-time gauges, and hands resources to the app's cleanup_ctx
(:func:`_resources`: opened before serving, drained and closed after). :func:`make_runner`
gives the runner ``tierproxy serve`` uses. The request path itself lives in
:mod:`tierproxy.handler` (the full path), :mod:`tierproxy.hits` (the connection's hit path),
:mod:`tierproxy.response` and :mod:`tierproxy.purge_handler`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from .aiohttp_internals import ProxyRunner
from .background import BackgroundTasks
from .clock import SYSTEM, Clock
from .config import Settings
from .handler import handle, unrouted_targets
from .hits import Handover, HitPath
from .invalidation import Invalidation
from .keys import KeySpace
from .listener import client_connection_cap, counted_cap, handler_args
from .logs import AccessLog, dropped_lines
from .metrics import BREAKER_STATES, Metrics
from .origin import OriginClient
from .probes import Prober
from .readthrough import ReadThrough
from .state import STATE, ProxyState
from .tiers import make_tiers
from .tiers.base import Breaker, GuardedTier

__all__ = ["STATE", "ProxyState", "build_app", "make_runner"]

log = logging.getLogger("tierproxy.server")


def _breaker_open(breaker: Breaker) -> Callable[[], float]:
    return lambda: float(breaker.is_open)


def _breaker_in(breaker: Breaker, breaker_state: str) -> Callable[[], float]:
    return lambda: float(breaker.state() == breaker_state)


def _health_is(breaker: Breaker, tier_state: str) -> Callable[[], float]:
    return lambda: float(breaker.health() == tier_state)


def _state_is(tier: GuardedTier, tier_state: str) -> Callable[[], float]:
    return lambda: float(tier.state() == tier_state)


def _lookup_timeout(tier: GuardedTier) -> Callable[[], float]:
    return lambda: tier.lookup_timeout


def _register_gauges(state: ProxyState) -> None:
    """Gauges read their value at scrape time: nothing on the request path updates them."""
    m = state.metrics
    m.inflight.set_function(lambda: state.inflight)
    m.background_tasks.set_function(lambda: state.background.pending)
    m.request_deadline.set(state.settings.request_deadline)
    m.log_dropped.set_function(lambda: float(dropped_lines()))
    # A tier's writes have their own breaker ("<tier>-writes"): a full disk stops writes only.
    breakers = [(tier.name, tier.breaker) for tier in state.tiers]
    breakers += [(f"{tier.name}-writes", tier.write_breaker) for tier in state.tiers]
    breakers.append(("origin", state.readthrough.origin_breaker))
    for name, breaker in breakers:
        m.breaker_open.labels(name).set_function(_breaker_open(breaker))
        for breaker_state in BREAKER_STATES:
            m.breaker_state.labels(name, breaker_state).set_function(
                _breaker_in(breaker, breaker_state)
            )
    for tier in state.tiers:
        for tier_state in ("up", "degraded", "breaker-open", "unavailable"):
            m.tier_state.labels(tier.name, tier_state).set_function(_state_is(tier, tier_state))
    for tier_state in ("up", "degraded", "breaker-open"):
        m.tier_state.labels("origin", tier_state).set_function(
            _health_is(state.readthrough.origin_breaker, tier_state)
        )
    for tier in state.tiers:
        # Read at scrape time: learned with TIERPROXY_ADAPTIVE_TIMEOUTS=on, else the setting.
        m.tier_timeout.labels(tier.name).set_function(_lookup_timeout(tier))
        tier.watch(m)
    m.tier_timeout.labels("origin").set(state.settings.origin_timeout)


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """Open every resource before serving; on the way out drain, then close (in that order)."""
    state = app[STATE]
    settings = state.settings
    opened: list[GuardedTier] = []
    try:
        await state.origin.open()
        for tier in state.tiers:
            await tier.open()
            opened.append(tier)
    except BaseException:
        for tier in opened:
            await tier.close()
        await state.origin.close()
        raise
    if settings.redis_url is None:
        log.info("L2 off: TIERPROXY_REDIS_URL is unset")
    else:
        l2 = state.tier("l2")
        assert l2 is not None
        state.invalidation.start()  # the replicas' purge channel
        if state.readthrough.cluster is not None:
            state.readthrough.cluster.start()  # TIERPROXY_COALESCE=cluster: the lease channel
        try:
            if await l2.ping(max(1.0, settings.l2_timeout)):
                log.info("L2 Redis reachable")
            else:
                log.warning(
                    "L2 Redis did not answer PING at start-up; serving without it until it does"
                )
            # Subscribing clears L1 (it may have missed purges): do it before serving.
            if not await state.invalidation.wait_subscribed(max(1.0, settings.l2_write_timeout)):
                log.warning(
                    "not yet subscribed to the replicas' purge channel; L1 will be "
                    "cleared when it is"
                )
        except Exception as exc:  # noqa: BLE001 - start anyway: L2 is a cache, its breaker handles it
            log.warning(
                "L2 Redis not reachable at start-up (%r); serving without it until it is", exc
            )
    if settings.sqlite_path is None:
        log.info("L3 off: TIERPROXY_SQLITE_PATH=off")
    if settings.l1_max_bytes == 0:
        log.info("L1 off: TIERPROXY_L1_MAX_BYTES=0")
    state.access_log.start()  # decided once: the hot path checks one attribute
    # Tiers whose lookups' breaker opens are probed in the background (tierproxy.probes).
    prober = Prober(state.tiers, settings.breaker_cooldown)
    prober.start()
    state.ready = True
    try:
        yield
    finally:
        state.ready = False
        await prober.stop()  # its probes read the tiers: stopped before they close
        # Backfills write to the tiers: let them finish (bounded) before the tiers close - and
        # before this replica leaves the replicas' registry: its L2 writes land only while it
        # holds its purge lease (a PURGE meanwhile still waits for its ack), so leaving first
        # would drop every L2 backfill still pending.
        # From here on the subscriber's purges run their required work inline (drained lanes
        # take no new tasks), so nothing is left behind when it stops.
        await state.background.drain(settings.shutdown_timeout)
        # Its purges write to L1/L3: stop listening before the tiers close.
        await state.invalidation.stop()
        if state.readthrough.cluster is not None:
            await state.readthrough.cluster.stop()
        for tier in state.tiers:
            try:
                await tier.close()
            except Exception as exc:  # noqa: BLE001 - one tier's close must not stop the rest
                log.warning("closing %s: %r", tier.name, exc)
        await state.origin.close()


def build_app(
    settings: Settings, metrics: Metrics | None = None, *, clock: Clock = SYSTEM
) -> web.Application:
    """The proxy listener's app. Nothing is opened until the app starts.

    ``clock`` is the wall and monotonic time every component reads (tierproxy.clock): a
    test passes one it advances.
    """
    metrics = metrics or Metrics()
    keys = KeySpace(settings.origin, query=settings.query)
    tiers = make_tiers(settings, metrics, keys, clock=clock)
    discarded = metrics.origin_connections_discarded
    origin = OriginClient(
        settings.origin,
        max_connections=settings.origin_max_connections,
        read_timeout=settings.origin_timeout,
        queue_timeout=settings.origin_queue_timeout,
        discarded=lambda reason: discarded.labels(reason).inc(),
        clock=clock,
    )
    # Origin fetches run in the background only while a client holding a stale copy stopped
    # waiting for them (TIERPROXY_STALE_DEADLINE): at most one per key, each holding or
    # awaiting one of the origin's connections, so a few times the pool bounds them.
    background = BackgroundTasks(
        settings.backfill_max_tasks, metrics, fetch_limit=4 * settings.origin_max_connections
    )
    readthrough = ReadThrough(settings, tiers, origin, background, metrics, clock=clock, keys=keys)
    invalidation = Invalidation(settings, tiers, readthrough, metrics, keys, clock=clock)
    state = ProxyState(
        settings,
        metrics,
        tiers,
        origin,
        background,
        readthrough,
        AccessLog(settings.access_log),
        invalidation,
        keys,
        clock,
    )
    _register_gauges(state)

    app = web.Application(
        client_max_size=max(1, settings.max_body_bytes),
        middlewares=[unrouted_targets],
        # Request limits every runner applies; the ProxyRunner `tierproxy serve` runs
        # (make_runner) adds the header read timeout and answers 414/431.
        handler_args=handler_args(settings),
    )
    app[STATE] = state
    app.cleanup_ctx.append(_resources)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def make_runner(
    app: web.Application, *, client_connections: int | None = None, **kwargs: Any
) -> ProxyRunner[Handover]:
    """The runner ``tierproxy serve`` uses for ``app`` (see :func:`build_app`).

    Its connections are hardened (:mod:`tierproxy.aiohttp_internals`) and answer fresh hits
    themselves (:mod:`tierproxy.hits`), at most ``client_connections`` at once (default:
    :func:`~tierproxy.listener.client_connection_cap` of the current descriptor limit);
    ``kwargs`` go to ``web.AppRunner``.
    """
    state = app[STATE]
    return ProxyRunner(
        app,
        header_timeout=state.settings.header_timeout,
        send_timeout=state.settings.send_timeout,
        handler_args=handler_args(state.settings),
        hits=HitPath(state, state.tier("l1")) if state.tiers else None,
        allow_unhardened=state.settings.allow_unhardened,
        # Client connections bounded below the descriptor limit (TIERPROXY_MAX_CLIENT_CONNECTIONS).
        cap=counted_cap(
            state.metrics, client_connections or client_connection_cap(state.settings), "proxy"
        ),
        **kwargs,
    )
