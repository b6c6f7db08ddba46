"""Helpers for tests where one proxy process reads L3 copies another one wrote, with Redis.

With Redis, a proxy that starts trusts L3 copies stored after the oldest purge the purge log
in Redis holds (tierproxy.invalidation). A test's Redis is empty, so the log begins when the
test's first proxy starts; a copy stored within that same second may carry a ``stored_at``
(from the origin's one-second ``Date``) before that moment, and a later process revalidates it
instead of serving it as an L3 hit. Tests that need such an L3 hit let that second pass first.

Real time, not the proxy's clock: both readings come from outside the proxy (the origin's
``Date`` and Redis's clock), so advancing a proxy's clock would not move either.
"""

from __future__ import annotations

from typing import Any

from .wait import wait_until_wallclock

__all__ = ["past_purge_log_start"]


async def past_purge_log_start(proxy: Any) -> None:
    """Return once copies stored from now on are trusted by proxies started later."""
    trust = proxy.state.invalidation.trust
    if trust is not None:
        await wait_until_wallclock(trust.floor + 1.1)
