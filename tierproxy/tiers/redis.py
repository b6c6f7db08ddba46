"""L2: Redis, shared by every replica. One pool per process; keys ``tierproxy:<sha256>``.

redis-py's defaults would break the tier budget (PITFALLS.md): socket timeouts are set to the
tier's write budget, retries are off, and every call still runs under ``asyncio.timeout`` in
GuardedTier. Current redis-py disconnects a connection whose command was cancelled, so a
cancelled GET never leaves its reply for the next caller (tests/integration keep a regression
test for that).
"""

from __future__ import annotations

import time

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..entry import Entry
from ..keys import CacheKey
from .base import Blob, BytesBackend

__all__ = ["RedisTier", "KEY_PREFIX"]

KEY_PREFIX = "tierproxy:"


def redis_key(key: CacheKey) -> str:
    return KEY_PREFIX + key.digest


class RedisTier(BytesBackend):
    name = "l2"

    def __init__(self, url: str, *, socket_timeout: float, max_connections: int) -> None:
        self.url = url
        self._pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=socket_timeout,  # waiting for a pooled connection is bounded too
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self.client: Redis = Redis(connection_pool=self._pool, retry=Retry(NoBackoff(), 0))

    async def get_bytes(self, key: CacheKey) -> bytes | None:
        value = await self.client.get(redis_key(key))
        return value if isinstance(value, bytes) else None

    async def set(self, key: CacheKey, entry: Entry, blob: Blob) -> None:
        # The Redis TTL is the time until the entry may no longer be served at all.
        ttl_ms = int((entry.expires_at - time.time()) * 1000)
        if ttl_ms <= 0:
            return
        await self.client.set(redis_key(key), blob.data, px=ttl_ms)

    async def delete(self, key: CacheKey) -> bool:
        return bool(await self.client.delete(redis_key(key)))

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()
        await self._pool.disconnect()
