"""L2: Redis, shared by every replica. One pool per process.

Every Redis name this process uses is built from :attr:`RedisTier.prefix`, which is
``TIERPROXY_KEY_PREFIX`` + ``"tierproxy:"``: entries ``<prefix><CacheKey.digest>`` (the digest
covers the origin's identity, the entry format version and the key material, see
tierproxy.keys), tag sets ``<prefix>tag:<KeySpace.tag_id(tag)>``, the replicas' purge channel
``<prefix>invalidate``. Operators sharing one Redis between environments give each its own
prefix; deployments of different origins never share an entry or a tag set even without one.

Lookups (GET) go over one pipelined connection (:mod:`tierproxy.tiers.redis_reads`); writes,
scripts, purges and pub/sub use redis-py. redis-py's defaults would break the tier budget
(since 8.x: 5 s socket and connect timeouts plus retries with backoff): socket timeouts are set to the tier's write budget, retries are off, and every
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
it was not given in KEYS: fine on a single Redis (and under Sentinel, a single master).

Redis Cluster (``redis+cluster://``, see tierproxy.redis_url): no command or script touches
two keys that may sit in different slots. An entry and its tag sets hash to different slots in
general, so a tagged write is one script on the entry key alone followed by one small script
per tag set (add the digest, raise its TTL, and return a sample of members to prune once it is
large; the prune is then one EXISTS per member, each on its own slot). The entry comes first so
that a concurrent prune never drops a member whose entry is still to be written; when a tag
cannot be indexed, the entry is deleted again (a purge by tag could not find it). The write
is fenced by this replica's lease end as the purge log's node last confirmed it (passed to the
script, compared with the entry node's clock: the nodes' clocks are assumed to agree within the
write budget). Purges delete entries and tag sets key by key (redis-py groups them per slot).
The purge log's keys (stream, leases, acks, loss mark) share one slot through a hash tag,
``<prefix>{<origin id>}:...``, as its scripts touch several of them; on one Redis they keep
their plain names. Lookups go through redis-py's cluster client (the pipelined reader speaks
to one server), as they do under Sentinel, where the master moves.

Withdrawn writes: a write whose reply never came back (it timed out, was cancelled, its
connection failed) may still land at any later moment - the command can sit in a socket buffer
or be retransmitted - and a delete sent on another connection is not ordered with it. Every
write therefore carries a token and is refused by Redis once the marker
``<entry name>:withdrawn:<token>`` exists; :meth:`RedisTier.delete` of a key with such writes
outstanding sets their markers (for :data:`WITHDRAWN_TTL` at least) and deletes the entry in
one script, so whichever of the two runs first, the entry is not there afterwards. (On a
cluster the marker shares the entry's slot through a hash tag.)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from .. import redis_url
from ..entry import Entry
from ..keys import CacheKey, KeySpace
from . import redis_reads
from .base import Blob, BytesBackend, Configured, TierUnavailable, mark_stale_encoded
from .purge_log import REPLICAS, PurgeLog
from .redis_clients import Clients, RedisClient, Subscriber

if TYPE_CHECKING:
    from ..clock import Clock
    from ..config import Settings
    from ..metrics import Metrics

__all__ = ["NAME_ROOT", "WITHDRAWN_TTL", "RedisTier", "configured", "link_retry"]

# What follows TIERPROXY_KEY_PREFIX in every Redis name (see RedisTier.prefix).
NAME_ROOT = "tierproxy:"

# Batches keep every single command (and its reply) small; bounded loops over them.
_BATCH = 500
_SOFT_BATCH = 16
_MAX_SCAN_ROUNDS = 100_000
#: How long (s, at least) a withdrawn write's marker refuses it (see the module docstring): far
#: longer than a command that was sent can take to reach Redis over a live connection.
WITHDRAWN_TTL = 120.0
# Writes without a reply remembered per process (oldest forgotten first past this).
_MAX_UNSETTLED = 10_000
# Lookups' encoded GET commands, by entry digest (emptied when full): a key asked for again
# is sent as it was, not named and encoded anew at every lookup.
_MAX_GET_COMMANDS = 4096

# KEYS[1] entry key, KEYS[2] the replicas' leases (zset), KEYS[3] this write's withdrawal
# marker, KEYS[4..] tag set keys; ARGV: value, TTL ms, digest, entry key prefix, the writing
# replica's id ('' = no fence: a RedisTier used without replicas), the end of the lease it
# held when it sent the write (ms, Redis's clock; '' = not known yet). The write happens only
# while that replica's lease, as Redis has it, holds: a replica that was paused or cut off past
# its lease (a PURGE then stopped waiting for it and counted it fenced) cannot land a copy
# that may have been purged, however late its write arrives. Nor once the lease it was sent
# under has ended, though the replica renewed its lease since: a write held up on its way
# (a socket buffer, retransmissions) longer than a lease - and so, perhaps, longer than its
# withdrawal marker lives - does not land. Nor once the write was withdrawn (see the module
# docstring). Returns 0 when refused for the lease, 2 when withdrawn.
_SET_FENCED = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 2 end
if ARGV[5] ~= '' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local lease = redis.call('ZSCORE', KEYS[2], ARGV[5])
  if not lease or tonumber(lease) < now then return 0 end
  if ARGV[6] ~= '' and tonumber(ARGV[6]) < now then return 0 end
end
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
for i = 4, #KEYS do
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

# Cluster: KEYS[1] entry key, KEYS[2] this write's withdrawal marker (same slot; none when the
# entry's name allows no such name, see RedisTier._marker); ARGV:
# value, TTL ms, the writing replica's lease end on the purge log's node clock (ms; '' = no
# fence). Returns 0 when refused for the lease, 2 when withdrawn.
_SET_FENCED_ONE = """
if #KEYS > 1 and redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
if ARGV[3] ~= '' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if tonumber(ARGV[3]) < now then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
return 1
"""

# Cluster: KEYS[1] a tag set; ARGV: digest, TTL ms. Adds the digest and raises the set's TTL;
# returns a sample of members to check (and prune) once the set is large, else nothing.
_TAG_ONE = """
local ttl = tonumber(ARGV[2])
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
if redis.call('SCARD', KEYS[1]) > 64 then return redis.call('SRANDMEMBER', KEYS[1], 8) end
return {}
"""

# KEYS[1] entry key, KEYS[2..] the withdrawal markers of its writes that got no reply (same
# slot); ARGV[1] the markers' TTL ms. Refuses those writes from now on, then deletes the entry
# (whichever ran first of a withdrawn write and this: the entry is not there afterwards).
_WITHDRAW = """
for i = 2, #KEYS do redis.call('SET', KEYS[i], '1', 'PX', tonumber(ARGV[1])) end
return redis.call('DEL', KEYS[1])
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


def _batches(items: Sequence[str], size: int = _BATCH) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def configured(
    settings: Settings, metrics: Metrics, keys: KeySpace, *, clock: Clock | None = None
) -> Configured | None:
    """L2, when TIERPROXY_REDIS_URL is set. (Entries' Redis TTLs are real time: Redis expires
    them, and a copy it keeps longer than the proxy's clock allows is classified expired.)"""
    if not settings.redis_url:
        return None
    backend = RedisTier(
        settings.redis_url,
        keys=keys,
        key_prefix=settings.key_prefix,
        socket_timeout=max(settings.l2_timeout, settings.l2_write_timeout),
        max_connections=settings.redis_max_connections,
        password=settings.redis_password,
    )
    return Configured(backend, settings.l2_timeout, settings.l2_write_timeout)


class RedisTier(BytesBackend):
    name = "l2"
    shared = True

    def __init__(
        self,
        url: str,
        *,
        socket_timeout: float,
        max_connections: int,
        keys: KeySpace,
        key_prefix: str = "",
        password: str | None = None,
    ) -> None:
        self.url = url
        #: The topology (one Redis, Sentinel, Cluster) and credentials; see tierproxy.redis_url.
        self.target = redis_url.parse(url, password)
        self.cluster = self.target.kind == redis_url.CLUSTER
        self.keys = keys
        #: The start of every Redis name this process uses (entries, tag sets, channels, and
        #: anything added later): build names as ``self.prefix + ...``, never from scratch.
        self.prefix = key_prefix + NAME_ROOT
        self._tag_prefix = self.prefix + "tag:"
        self._socket_timeout = socket_timeout
        self._clients = Clients(
            self.target,
            socket_timeout=socket_timeout,
            max_connections=max_connections,
            retry=link_retry(),
        )
        self.client: RedisClient = self._clients.client
        self._set_fenced = self.client.register_script(_SET_FENCED)
        self._set_fenced_one = self.client.register_script(_SET_FENCED_ONE)
        self._tag_one = self.client.register_script(_TAG_ONE)
        self._withdraw = self.client.register_script(_WITHDRAW)
        # Writes sent without a reply (see the module docstring): entry name -> {withdrawal
        # marker name: when (monotonic)}; bounded (_MAX_UNSETTLED, oldest dropped first).
        self._unsettled: dict[str, dict[str, float]] = {}
        self._get_commands: dict[str, bytes] = {}
        self._tokens = (f"{secrets.token_hex(6)}.{n}" for n in itertools.count())
        self._withdrawn_ttl = max(WITHDRAWN_TTL, 4 * socket_timeout)
        # The replicas' purge channel, log and leases: per origin (PurgeLog). On a cluster
        # they share one slot (a hash tag): the purge log's scripts touch several of them.
        if self.cluster:
            self._log_prefix = f"{self.prefix}{{{keys.origin_id}}}:"
        else:
            self._log_prefix = f"{self.prefix}{keys.origin_id}:"
        self._leases_name = self._log_prefix + REPLICAS
        #: This replica's lease end (ms, the purge log's Redis clock) from its last heartbeat;
        #: every write carries it and is refused once it has passed. None: not yet known.
        self._lease_end_ms: int | None = None
        #: This replica's id in the purge lease registry (set by tierproxy.invalidation, which
        #: every proxy with Redis runs): every write is then fenced by that lease
        #: (_SET_FENCED). None: unfenced (a RedisTier used on its own).
        self.fence_id: str | None = None
        # Lookups: one pipelined connection for all of them (tiers/redis_reads.py); on
        # Sentinel and Cluster through redis-py (the server to ask is not fixed).
        self.reads = (
            redis_reads.for_url(
                url,
                connect_timeout=socket_timeout,
                stale_after=socket_timeout,
                password=self.target.password,
            )
            if self.target.kind == redis_url.SINGLE
            else None
        )

    def entry_name(self, key: CacheKey) -> str:
        return self.prefix + key.digest

    def tag_name(self, tag: str) -> str:
        return self._tag_prefix + self.keys.tag_id(tag)

    def lookups_soon(self) -> bool:
        # On the pipelined connection, once connected (connecting is awaited: get_bytes).
        return self.reads is not None and self.reads.connected

    def get_bytes_soon(self, key: CacheKey) -> asyncio.Future[bytes | None]:
        assert self.reads is not None
        # (the entry's name is the fixed prefix and the digest: entry_name)
        digest = key.digest
        commands = self._get_commands
        command = commands.get(digest)
        if command is None:
            if len(commands) >= _MAX_GET_COMMANDS:
                commands.clear()
            command = commands[digest] = redis_reads.get_command(self.entry_name(key).encode())
        # (GET's reply is a bulk string or nil; an error reply fails the future)
        return self.reads.send_get_soon(command)

    async def get_bytes(self, key: CacheKey) -> bytes | None:
        if self.reads is not None:
            return await self.reads.get(self.entry_name(key).encode())
        value = await self.client.get(self.entry_name(key))
        return value if isinstance(value, bytes) else None

    async def set(self, key: CacheKey, entry: Entry, blob: Blob) -> None:
        # The Redis TTL is the time until the entry may no longer be served at all.
        ttl_ms = int((entry.expires_at - time.time()) * 1000)
        if ttl_ms <= 0:
            return
        name = self.entry_name(key)
        marker = self._marker(name)
        if marker is None:  # (a cluster, and a prefix with a stray '}')
            await self._set_on_cluster(key, entry, blob, ttl_ms, None)
            return
        with self._outstanding(name, marker):
            if self.cluster:
                await self._set_on_cluster(key, entry, blob, ttl_ms, marker)
                return
            written = await self._set_fenced(
                keys=[
                    name,
                    self._leases_name,
                    marker,
                    *(self.tag_name(tag) for tag in entry.tags),
                ],
                args=[
                    blob.data,
                    ttl_ms,
                    key.digest,
                    self.prefix,
                    self.fence_id or "",
                    "" if self._lease_end_ms is None else str(self._lease_end_ms),
                ],
            )
        _check_written(written)

    def _marker(self, name: str) -> str | None:
        """A new write's withdrawal marker: on a cluster in its entry's slot (a hash tag).
        None when there is no such name (a cluster, and a key prefix with a stray '}')."""
        suffix = ":withdrawn:" + next(self._tokens)
        if not self.cluster or _hash_tag(name) is not None:
            return name + suffix
        if "}" in name:
            return None
        return "{" + name + "}" + suffix

    @contextlib.contextmanager
    def _outstanding(self, name: str, marker: str) -> Iterator[None]:
        """Remember ``marker``'s write unless its reply comes back (see :meth:`delete`)."""
        now = time.monotonic()
        unsettled = self._unsettled
        unsettled.setdefault(name, {})[marker] = now
        try:
            yield
        except BaseException as exc:
            if isinstance(exc, TierUnavailable | ResponseError):
                _forget(unsettled, name, marker)  # Redis answered: nothing is on its way
            raise
        else:
            _forget(unsettled, name, marker)
        finally:
            if len(unsettled) > _MAX_UNSETTLED:
                self._prune(now)

    def _prune(self, now: float) -> None:
        horizon = now - self._withdrawn_ttl
        for name in list(self._unsettled):
            markers = self._unsettled[name]
            for marker, when in list(markers.items()):
                if when < horizon:
                    del markers[marker]
            if not markers:
                del self._unsettled[name]
        while len(self._unsettled) > _MAX_UNSETTLED:
            del self._unsettled[next(iter(self._unsettled))]

    def write_may_land(self, key: CacheKey) -> bool:
        """Whether a write of ``key`` got no reply: it may still land (see :meth:`delete`)."""
        return self.entry_name(key) in self._unsettled

    async def _set_on_cluster(
        self, key: CacheKey, entry: Entry, blob: Blob, ttl_ms: int, marker: str | None
    ) -> None:
        """``set`` on a cluster: every command on one key (see the module docstring)."""
        fence = ""
        if self.fence_id is not None:
            if self._lease_end_ms is None:
                raise TierUnavailable("L2 write refused: this replica holds no purge lease yet")
            fence = str(self._lease_end_ms)
        name = self.entry_name(key)
        written = await self._set_fenced_one(
            keys=[name] if marker is None else [name, marker], args=[blob.data, ttl_ms, fence]
        )
        _check_written(written)
        try:
            for tag in entry.tags:
                sample = await self._tag_one(keys=[self.tag_name(tag)], args=[key.digest, ttl_ms])
                if sample:
                    members = [m.decode() if isinstance(m, bytes) else str(m) for m in sample]
                    gone = [
                        m
                        for m in members
                        if m != key.digest and not await self.client.exists(self.prefix + m)
                    ]
                    if gone:
                        await self.client.srem(self.tag_name(tag), *gone)
        except BaseException:
            # Not indexed under every tag: a purge by tag could miss it. Take it out again
            # (bounded, whatever cancelled this write).
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._socket_timeout):
                    await asyncio.shield(self.client.delete(name))
            raise

    def _on_lease(self, lease_end_ms: int | None) -> None:
        """The purge log registered (or, None, ended) this replica's lease."""
        self._lease_end_ms = lease_end_ms

    async def delete(self, key: CacheKey) -> bool:
        """Delete ``key``'s entry - and withdraw its writes that got no reply (see the module
        docstring), so that none of them lands afterwards."""
        name = self.entry_name(key)
        markers = self._unsettled.get(name)
        if not markers:
            return bool(await self.client.delete(name))
        withdrawn = list(markers)
        removed = await self._withdraw(
            keys=[name, *withdrawn], args=[int(self._withdrawn_ttl * 1000)]
        )
        for marker in withdrawn:  # refused from now on
            _forget(self._unsettled, name, marker)
        return bool(removed)

    async def tag_members(self, tag: str) -> list[str]:
        """Digests indexed under ``tag`` (SSCAN: no single huge reply)."""
        name = self.tag_name(tag)
        members: set[str] = set()
        cursor = 0
        for _ in range(_MAX_SCAN_ROUNDS):
            cursor, batch = await self.client.sscan(name, cursor, count=1000)
            members.update(m.decode() if isinstance(m, bytes) else str(m) for m in batch)
            if int(cursor) == 0:
                break
        return sorted(members)

    async def purge(
        self, keys: Sequence[CacheKey], tags: Sequence[str], soft_at: float | None
    ) -> int:
        # Digest -> key material when known (purge by key), else None (found through a tag).
        targets: dict[str, str | None] = {key.digest: key.material for key in keys}
        for tag in tags:
            for digest in await self.tag_members(tag):
                targets.setdefault(digest, None)
        digests = list(targets)
        if soft_at is None:
            removed = 0
            for batch in _batches(digests):
                removed += int(await self.client.delete(*(self.prefix + d for d in batch)))
            for tag_batch in _batches([self.tag_name(tag) for tag in tags]):
                await self.client.delete(*tag_batch)
            return removed
        # Soft: rewrite each entry marked stale, keeping its TTL. Read-modify-write without a
        # transaction (no WATCH under timeouts): a backfill racing with it can be overwritten
        # by the stale-marked copy, which only costs one extra revalidation.
        changed = 0

        async def rewrite(name: str, data: bytes) -> bool:
            return bool(await self.client.set(name, data, xx=True, keepttl=True))

        for batch in _batches(digests, _SOFT_BATCH):  # few at a time: entries can be large
            names = [self.prefix + d for d in batch]
            if isinstance(self.client, RedisCluster):
                values = await self.client.mget_nonatomic(names)  # one MGET per slot
            else:
                values = await self.client.mget(names)
            writes: list[tuple[str, bytes]] = []
            for digest, data in zip(batch, values, strict=True):
                if not isinstance(data, bytes):
                    continue
                marked = mark_stale_encoded(
                    data, targets[digest], digest, self.keys.namespace, soft_at
                )
                if marked is not None:
                    writes.append((self.prefix + digest, marked))
            changed += sum(await asyncio.gather(*(rewrite(n, d) for n, d in writes)))
        return changed

    def replicated(self) -> RedisTier:
        return self

    def fence(self, replica_id: str) -> None:
        """Write only while ``replica_id``'s purge lease holds (see :attr:`fence_id`)."""
        self.fence_id = replica_id

    def purge_log(self, client: RedisClient | None = None) -> PurgeLog:
        """The purge log over ``client`` (default: this tier's pool), under this tier's prefix
        and this origin's id: replicas of another origin sharing the Redis are not ours."""
        return PurgeLog(
            self.client if client is None else client,
            self._log_prefix,
            on_lease=self._on_lease,
        )

    def subscriber(self, socket_timeout: float) -> Subscriber:
        """The purge subscriber's own connections to this tier's Redis (tierproxy.invalidation)."""
        return Subscriber(self.target, socket_timeout=socket_timeout)

    async def ping(self) -> bool:
        """Both connections answer: redis-py's (writes) and the pipelined one (lookups)."""
        if self.reads is not None and not await self.reads.ping():
            return False
        return bool(await self.client.ping())

    async def close(self) -> None:
        if self.reads is not None:
            await self.reads.close()
        await self._clients.aclose()


def _check_written(written: object) -> None:
    if written == 2:
        raise TierUnavailable("L2 write refused: it was withdrawn")
    if not written:
        raise TierUnavailable("L2 write refused: this replica's purge lease has lapsed")


def _forget(unsettled: dict[str, dict[str, float]], name: str, marker: str) -> None:
    markers = unsettled.get(name)
    if markers is not None:
        markers.pop(marker, None)
        if not markers:
            del unsettled[name]


def _hash_tag(name: str) -> str | None:
    """The hash tag Redis Cluster slots ``name`` by, or None (the whole name)."""
    start = name.find("{")
    if start < 0:
        return None
    end = name.find("}", start + 1)
    if end <= start + 1:
        return None
    return name[start + 1 : end]
