"""L2: Redis, shared by every replica. One pool per process; keys ``tierproxy:<sha256>``.

Lookups (GET) go over one pipelined connection (:mod:`tierproxy.tiers.redis_reads`); writes,
scripts, purges and pub/sub use redis-py. redis-py's defaults would break the tier budget
(PITFALLS.md): socket timeouts are set to the tier's write budget, retries are off, and every
call still runs under ``asyncio.timeout`` in GuardedTier. Current redis-py disconnects a
connection whose command was cancelled, and the pipelined reader drops a cancelled GET's late
reply, so a cancelled command never leaves its reply for the next caller (tests/integration
keep a regression test for that).

Surrogate keys: a tagged entry is written by one Lua script (a single command, so there is no
pipeline to strand under a timeout) that also adds the entry's digest to one set per tag,
``tierproxy:tag:<sha256(tag)>``. A tag set's TTL is raised to the longest TTL of its members, so
it outlives every entry it indexes and then expires with them; members whose entry has gone
(expired, evicted, purged) are pruned by sampling on each tagged write, which keeps a set that
is written to for ever within a small factor of its live members. The script reads entry keys
it was not given in KEYS: fine on a single Redis, not on Redis Cluster (unsupported anyway).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from .. import codec
from ..entry import Entry
from ..keys import CacheKey
from . import redis_reads
from .base import Blob, BytesBackend, decode_unkeyed, mark_stale, tag_digest

__all__ = ["KEY_PREFIX", "TAG_PREFIX", "RedisTier", "link_retry", "redis_key", "tag_key"]

KEY_PREFIX = "tierproxy:"
TAG_PREFIX = KEY_PREFIX + "tag:"

# Batches keep every single command (and its reply) small; bounded loops over them.
_BATCH = 500
_SOFT_BATCH = 16
_MAX_SCAN_ROUNDS = 100_000

# KEYS[1] entry key, KEYS[2..] tag set keys; ARGV: value, TTL ms, digest, entry key prefix.
_SET_TAGGED = """
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
for i = 2, #KEYS do
  local tag = KEYS[i]
  redis.call('SADD', tag, ARGV[3])
  if redis.call('PTTL', tag) < ttl then redis.call('PEXPIRE', tag, ttl) end
  if redis.call('SCARD', tag) > 64 then
    for _, member in ipairs(redis.call('SRANDMEMBER', tag, 8)) do
      if redis.call('EXISTS', ARGV[4] .. member) == 0 then redis.call('SREM', tag, member) end
    end
  end
end
return 1
"""


def link_retry() -> Retry:
    """One immediate retry, on a connection error only.

    A pooled connection whose socket was reset while it sat idle (Redis restarted, a proxy or
    load balancer dropped it) fails the first command sent on it; redis-py's check at checkout
    does not see every such socket. One retry on a fresh connection makes that command succeed.
    Timeouts are never retried (a frozen Redis would double the tier budget), and every call
    still runs under the caller's ``asyncio.timeout``, so a retry can't outlive the budget.
    """
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


def redis_key(key: CacheKey) -> str:
    return KEY_PREFIX + key.digest


def tag_key(tag: str) -> str:
    return TAG_PREFIX + tag_digest(tag)


def _batches(items: Sequence[str], size: int = _BATCH) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class RedisTier(BytesBackend):
    name = "l2"
    shared = True

    def __init__(self, url: str, *, socket_timeout: float, max_connections: int) -> None:
        self.url = url
        self._pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=socket_timeout,  # waiting for a pooled connection is bounded too
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=link_retry(),
            health_check_interval=0,
        )
        self.client: Redis = Redis(connection_pool=self._pool, retry=link_retry())
        self._set_tagged = self.client.register_script(_SET_TAGGED)
        # Lookups: one pipelined connection for all of them (tiers/redis_reads.py).
        self.reads = redis_reads.for_url(url, connect_timeout=socket_timeout,
                                         stale_after=socket_timeout)

    async def get_bytes(self, key: CacheKey) -> bytes | None:
        if self.reads is not None:
            return await self.reads.get(redis_key(key).encode())
        value = await self.client.get(redis_key(key))
        return value if isinstance(value, bytes) else None

    async def set(self, key: CacheKey, entry: Entry, blob: Blob) -> None:
        # The Redis TTL is the time until the entry may no longer be served at all.
        ttl_ms = int((entry.expires_at - time.time()) * 1000)
        if ttl_ms <= 0:
            return
        if not entry.tags:
            await self.client.set(redis_key(key), blob.data, px=ttl_ms)
            return
        await self._set_tagged(
            keys=[redis_key(key), *(tag_key(tag) for tag in entry.tags)],
            args=[blob.data, ttl_ms, key.digest, KEY_PREFIX],
        )

    async def delete(self, key: CacheKey) -> bool:
        return bool(await self.client.delete(redis_key(key)))

    async def tag_members(self, tag: str) -> list[str]:
        """Digests indexed under ``tag`` (SSCAN: no single huge reply)."""
        name = tag_key(tag)
        members: set[str] = set()
        cursor = 0
        for _ in range(_MAX_SCAN_ROUNDS):
            cursor, batch = await self.client.sscan(name, cursor, count=1000)
            members.update(m.decode() if isinstance(m, bytes) else str(m) for m in batch)
            if int(cursor) == 0:
                break
        return sorted(members)

    async def purge(self, keys: Sequence[CacheKey], tags: Sequence[str], soft_at: float | None) -> int:
        # Digest -> key material when known (purge by key), else None (found through a tag).
        targets: dict[str, str | None] = {key.digest: key.material for key in keys}
        for tag in tags:
            for digest in await self.tag_members(tag):
                targets.setdefault(digest, None)
        digests = list(targets)
        if soft_at is None:
            removed = 0
            for batch in _batches(digests):
                removed += int(await self.client.delete(*(KEY_PREFIX + d for d in batch)))
            for tag_batch in _batches([tag_key(tag) for tag in tags]):
                await self.client.delete(*tag_batch)
            return removed
        # Soft: rewrite each entry marked stale, keeping its TTL. Read-modify-write without a
        # transaction (no WATCH under timeouts): a backfill racing with it can be overwritten
        # by the stale-marked copy, which only costs one extra revalidation.
        changed = 0

        async def rewrite(name: str, data: bytes) -> bool:
            return bool(await self.client.set(name, data, xx=True, keepttl=True))

        for batch in _batches(digests, _SOFT_BATCH):  # few at a time: entries can be large
            values = await self.client.mget([KEY_PREFIX + d for d in batch])
            writes: list[tuple[str, bytes]] = []
            for digest, data in zip(batch, values, strict=True):
                if not isinstance(data, bytes):
                    continue
                material = targets[digest]
                try:
                    entry = (codec.decode(data, material) if material is not None
                             else decode_unkeyed(data, digest))
                except codec.CorruptEntry:
                    continue  # a lookup will find and delete it
                marked = mark_stale(entry, soft_at)
                if marked is not None:
                    writes.append((KEY_PREFIX + digest, codec.encode(marked)))
            changed += sum(await asyncio.gather(*(rewrite(n, d) for n, d in writes)))
        return changed

    async def publish(self, channel: str, message: bytes) -> int:
        """Publish on a pub/sub channel; returns how many subscribers received it."""
        return int(await self.client.publish(channel, message))

    async def ping(self) -> bool:
        """Both connections answer: redis-py's (writes) and the pipelined one (lookups)."""
        if self.reads is not None and not await self.reads.ping():
            return False
        return bool(await self.client.ping())

    async def close(self) -> None:
        if self.reads is not None:
            await self.reads.close()
        await self.client.aclose()
        await self._pool.disconnect()
