"""The cache tiers, fastest first, each behind :class:`~tierproxy.tiers.base.GuardedTier`.

A tier is one backend module - a :class:`~tierproxy.tiers.base.TierBackend` and a
``configured(settings, metrics, keys, *, clock)`` that says whether the settings enable it -
plus one line in :data:`_TIERS`. Nothing outside this package names a backend class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..clock import SYSTEM, Clock
from . import memory, redis, sqlite
from .base import Breaker, GuardedTier

if TYPE_CHECKING:
    from ..config import Settings
    from ..keys import KeySpace
    from ..metrics import Metrics

__all__ = ["make_tiers"]

# Lookup order: the fastest first.
_TIERS = (
    memory.configured,  # L1: in-process memory
    redis.configured,  # L2: Redis, shared by the replicas
    sqlite.configured,  # L3: a SQLite file on this host
)


def make_tiers(
    settings: Settings, metrics: Metrics, keys: KeySpace, *, clock: Clock = SYSTEM
) -> list[GuardedTier]:
    """The tiers ``settings`` enable, in lookup order, each under its budgets and breakers."""
    tiers: list[GuardedTier] = []
    for configure in _TIERS:
        made = configure(settings, metrics, keys, clock=clock)
        if made is not None:
            breaker = Breaker(settings.breaker_failures, settings.breaker_cooldown, clock=clock)
            tiers.append(
                GuardedTier(
                    made.backend,
                    made.read_timeout,
                    made.write_timeout,
                    breaker,
                    metrics,
                    clock=clock,
                    adaptive_floor=settings.adaptive_floor if settings.adaptive_timeouts else None,
                    estimate=settings.hedge,
                    max_variants=settings.max_variants,
                )
            )
    return tiers
