"""A copy stored in one tier alone, read back by a proxy that holds it nowhere else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from support.fixture_types import MakeProxy
from support.origin import Origin
from support.proxy import ProxyHandle
from support.storage import redis_key, sqlite_row
from support.wait import wait_for_condition

__all__ = ["TIER_ONLY", "warm_in_tier"]

#: make_proxy settings that leave only the named tier on.
TIER_ONLY: dict[str, dict[str, Any]] = {
    "l1": {"REDIS_URL": None, "SQLITE_PATH": "off"},
    "l2": {"L1_MAX_BYTES": 0, "SQLITE_PATH": "off"},
    "l3": {"L1_MAX_BYTES": 0, "REDIS_URL": None},
}


async def warm_in_tier(
    tier: str,
    path: str,
    make_proxy: MakeProxy,
    origin: Origin,
    redis_client: Any,
    sqlite_path: Path,
) -> ProxyHandle:
    """Store ``path`` in ``tier`` alone; for L2/L3 return a new process (empty memory) that
    reads it back from there."""
    first = await make_proxy(**TIER_ONLY[tier])
    miss = await first.get(path)
    assert miss.status == 200 and miss.x_cache == "MISS", miss
    if tier == "l1":
        return first
    if tier == "l2":
        await wait_for_condition(
            lambda: redis_client.exists(redis_key(path, origin.url)), message="stored in Redis"
        )
    else:
        await wait_for_condition(
            lambda: sqlite_row(sqlite_path, path, origin.url), message="stored in SQLite"
        )
    await first.close()
    return await make_proxy(**TIER_ONLY[tier])
