"""The cache tiers, fastest first, each behind :class:`~tierproxy.tiers.base.GuardedTier`.

A tier is one backend module (:class:`~tierproxy.tiers.base.TierBackend`) plus one line in
:func:`make_tiers`; nothing outside this package names a backend class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..clock import SYSTEM, Clock
from .base import Breaker, GuardedTier, TierBackend
from .memory import MemoryTier
from .redis import RedisTier
from .sqlite import SQLiteTier

if TYPE_CHECKING:
    from ..config import Settings
    from ..keys import KeySpace
    from ..metrics import Metrics

__all__ = ["make_tiers"]


def make_tiers(
    settings: Settings, metrics: Metrics, keys: KeySpace, *, clock: Clock = SYSTEM
) -> list[GuardedTier]:
    """The tiers ``settings`` enable, in lookup order: L1 memory, L2 Redis, L3 SQLite."""

    def guarded(backend: TierBackend, read_timeout: float, write_timeout: float) -> GuardedTier:
        breaker = Breaker(settings.breaker_failures, settings.breaker_cooldown, clock=clock)
        return GuardedTier(backend, read_timeout, write_timeout, breaker, metrics, clock=clock)

    tiers: list[GuardedTier] = []
    if settings.l1_max_bytes > 0:
        tiers.append(guarded(MemoryTier(settings.l1_max_bytes, clock=clock),
                             settings.l1_timeout, settings.l1_timeout))
    if settings.redis_url:
        tiers.append(guarded(RedisTier(
            settings.redis_url, keys=keys, key_prefix=settings.key_prefix,
            socket_timeout=max(settings.l2_timeout, settings.l2_write_timeout),
            max_connections=settings.redis_max_connections,
        ), settings.l2_timeout, settings.l2_write_timeout))
    if settings.sqlite_path:
        tiers.append(guarded(SQLiteTier(
            settings.sqlite_path, max_bytes=settings.l3_max_bytes, metrics=metrics, keys=keys,
            read_timeout=settings.l3_timeout, write_timeout=settings.l3_write_timeout,
            retry_max=settings.breaker_cooldown,
            check_interval=min(1.0, settings.breaker_cooldown / 2),
        ), settings.l3_timeout, settings.l3_write_timeout))
    return tiers
