"""The proxy process's shared state: what every listener (proxy, admin) and the hit path read.

One :class:`ProxyState` per proxy app, stored on the app under :data:`STATE`; built and wired
by the composition root (:mod:`tierproxy.server`). This module sits low in the import order:
it imports the components' types only, so the admin listener can read the proxy's state
without importing the proxy app (no module imports one above it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from .clock import SYSTEM, Clock

if TYPE_CHECKING:
    from .background import BackgroundTasks
    from .config import Settings
    from .invalidation import Invalidation
    from .keys import KeySpace
    from .logs import AccessLog
    from .metrics import Metrics
    from .origin import OriginClient
    from .readthrough import ReadThrough
    from .tiers.base import GuardedTier

__all__ = ["INFO", "STATE", "ProxyState", "RequestInfo"]


@dataclass(slots=True)
class ProxyState:
    settings: Settings
    metrics: Metrics
    tiers: list[GuardedTier]
    origin: OriginClient
    background: BackgroundTasks
    readthrough: ReadThrough
    access_log: AccessLog
    invalidation: Invalidation
    keys: KeySpace  # request target -> CacheKey in this origin's namespace
    clock: Clock = SYSTEM  # wall time for ages and freshness (tierproxy.clock)
    ready: bool = False
    inflight: int = 0
    notes: list[str] = field(default_factory=list)

    def tier(self, name: str) -> GuardedTier | None:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        return None


STATE = web.AppKey("tierproxy_state", ProxyState)


class RequestInfo:
    """What the access log needs from deeper down: the request id and the tier timings."""

    __slots__ = ("rid", "timings")

    def __init__(self, rid: str, timings: dict[str, float] | None = None) -> None:
        self.rid = rid
        self.timings: dict[str, float] = {} if timings is None else timings


INFO = web.RequestKey("tierproxy_request_info", RequestInfo)
