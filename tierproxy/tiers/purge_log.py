"""The replicas' purge log, channel and leases in Redis (used by tierproxy.invalidation).

Kept apart from the L2 tier (tierproxy.tiers.redis) so that the tier interface
(tierproxy.tiers.base) can name it without importing a concrete tier.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

__all__ = ["PURGE_LOG_MAXLEN", "REPLICAS", "PurgeLog", "stream_id"]

# The purge log (a capped stream) and the replicas' leases. See PurgeLog.
REPLICAS = "replicas"  # the leases' zset, after the purge log's prefix
PURGE_LOG_MAXLEN = 1024  # purge messages kept for replay (trimmed approximately, never fewer)
_PURGE_LOG_TTL_MS = 30 * 24 * 3600 * 1000  # with no purge for a month the log may go
_REPLICAS_TTL_MS = 24 * 3600 * 1000  # with no replica alive for a day the registry may go
_REPLICA_FORGET_MS = 600_000  # a lease that ended this long ago is forgotten
_MAX_REPLICAS = 1000  # replicas one PURGE waits for, at most

# KEYS[1] log; ARGV: message, channel, maxlen, ttl ms. XADD then PUBLISH "<id> <message>",
# atomically: the log and the channel carry every purge in the same order.
_PUBLISH_PURGE = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'm', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[2], id .. ' ' .. ARGV[1])
return id
"""

# KEYS[1] replicas (zset: id -> lease end, Redis clock ms), KEYS[2] applied (hash: id -> last
# purge-log id applied); ARGV: replica id, lease ms, applied id, forget ms, registry ttl ms.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[4]), 'LIMIT', 0, 100)
for _, id in ipairs(gone) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return now
"""

# KEYS as _HEARTBEAT, KEYS[3] the data-loss mark; ARGV: margin ms, limit. The Redis clock, when
# a replica found this Redis had lost the purge log (0: not seen), then id, lease end, applied
# id of every replica whose lease ended less than margin ago or has not ended.
_REPLICAS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rows = redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf',
                        'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
local out = {now, tonumber(redis.call('GET', KEYS[3]) or '0')}
for i = 1, #rows, 2 do
  out[#out + 1] = rows[i]
  out[#out + 1] = rows[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[2], rows[i]) or ''
end
return out
"""


def stream_id(value: str) -> tuple[int, int]:
    """A stream id ``"<ms>-<seq>"`` as a comparable pair; ValueError when it is not one."""
    ms, _, seq = value.partition("-")
    return int(ms), int(seq)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class PurgeLog:
    """The replicas' purge log, channel and leases in Redis, under one key prefix.

    * ``<prefix>purge-log`` - a stream capped at about :data:`PURGE_LOG_MAXLEN` entries, one
      per purge message, so a replica that was not subscribed can replay what it missed.
    * ``<prefix>invalidate`` - the pub/sub channel; each message is ``"<log id> <message>"``.
    * ``<prefix>replicas`` / ``<prefix>replicas:applied`` - each replica's lease end (Redis
      clock) and the last log id it applied: what a PURGE waits on.

    Every call is one command or one script (nothing to strand under a timeout). On Redis
    Cluster the prefix carries a hash tag (tierproxy.tiers.redis), so every key here is in one
    slot and the scripts run there; the channel is cluster-wide (PUBLISH reaches every node).
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        prefix: str,
        *,
        on_lease: Callable[[int | None], None] | None = None,
    ) -> None:
        self.client = client
        #: Told this replica's lease end (Redis clock ms) at each heartbeat, None when it
        #: leaves: the tier fences its writes by it (tierproxy.tiers.redis).
        self._on_lease = on_lease
        self.log_key = prefix + "purge-log"
        self.channel = prefix + "invalidate"
        self.replicas_key = prefix + REPLICAS
        self.applied_key = prefix + "replicas:applied"
        self.lost_key = prefix + "replicas:lost"
        self._publish = client.register_script(_PUBLISH_PURGE)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._replicas = client.register_script(_REPLICAS)

    async def publish(self, message: bytes) -> str:
        """Append ``message`` to the log and publish it; its log id."""
        return _text(
            await self._publish(
                keys=[self.log_key],
                args=[message, self.channel, PURGE_LOG_MAXLEN, _PURGE_LOG_TTL_MS],
            )
        )

    async def read(self, start: str, count: int) -> list[tuple[str, bytes]]:
        """Up to ``count`` log entries from id ``start`` on (``start`` included)."""
        rows = await self.client.xrange(self.log_key, min=start, max="+", count=count)
        out: list[tuple[str, bytes]] = []
        for entry_id, fields in rows or ():
            message = (fields or {}).get(b"m", b"")
            out.append((_text(entry_id), message if isinstance(message, bytes) else b""))
        return out

    async def oldest(self) -> str | None:
        rows = await self.client.xrange(self.log_key, min="-", max="+", count=1)
        return _text(rows[0][0]) if rows else None

    async def clock_offset(self, wall: Callable[[], float] = time.time) -> float:
        """Redis's wall clock minus ``wall`` (this process's), in seconds: the smallest the
        round trip allows, so that a time on Redis's clock turned into this process's is never
        too early (a trust floor computed with it errs towards distrust)."""
        seconds, micros = await self.client.time()
        return seconds + micros / 1e6 - wall()

    async def heartbeat(self, replica_id: str, lease_ms: int, applied: str) -> None:
        """Register this replica's lease (from now, Redis clock) and what it has applied."""
        now = await self._heartbeat(
            keys=[self.replicas_key, self.applied_key],
            args=[replica_id, max(0, lease_ms), applied, _REPLICA_FORGET_MS, _REPLICAS_TTL_MS],
        )
        if self._on_lease is not None:
            self._on_lease(int(now) + max(0, lease_ms))

    async def leave(self, replica_id: str) -> None:
        """Deregister: a PURGE no longer waits for this replica."""
        if self._on_lease is not None:
            self._on_lease(None)
        await self.client.zrem(self.replicas_key, replica_id)
        await self.client.hdel(self.applied_key, replica_id)

    async def ack(self, replica_id: str, applied: str) -> None:
        """Record what this replica has applied (its lease is renewed by heartbeats only)."""
        await self.client.hset(self.applied_key, replica_id, applied)

    async def replicas(self, margin_ms: int) -> tuple[int, int, list[tuple[str, int, str]]]:
        """(Redis clock ms, when a replica found this Redis had lost the log (0: never),
        [(replica id, lease end ms, applied id)]) for every replica whose lease has not ended
        or ended less than ``margin_ms`` ago."""
        reply = await self._replicas(
            keys=[self.replicas_key, self.applied_key, self.lost_key],
            args=[margin_ms, _MAX_REPLICAS],
        )
        now, lost = int(reply[0]), int(reply[1])
        rows = [
            (_text(reply[i]), int(float(_text(reply[i + 1]))), _text(reply[i + 2]))
            for i in range(2, len(reply) - 2, 3)
        ]
        return now, lost, rows

    async def mark_lost(self, keep_ms: int) -> None:
        """Record (Redis clock) that this Redis lost the purge log - and with it the replicas'
        leases: a PURGE in the next ``keep_ms`` waits out any lease it cannot see."""
        seconds, micros = await self.client.time()
        await self.client.set(self.lost_key, int(seconds * 1000 + micros // 1000), px=keep_ms)
