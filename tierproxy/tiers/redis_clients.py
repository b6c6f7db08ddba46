"""redis-py clients for each topology TIERPROXY_REDIS_URL names (tierproxy.redis_url).

* One Redis: a blocking pool from the URL, as always.
* Sentinel: redis-py's asyncio ``Sentinel`` and ``master_for``. Each new connection asks the
  sentinels where the master is, and a connection to a master that died or was demoted fails
  (redis-py turns a READONLY reply into a connection error), so after a failover the next
  connection goes to the promoted master without a restart. Commands in between fail - L2
  misses, which the tier's breaker and budgets already handle.
* Cluster: redis-py's asyncio ``RedisCluster``, which follows the slot map (MOVED/ASK).

Every client gets the tier's socket timeouts and at most one immediate retry on a connection
error (see tierproxy.tiers.redis.link_retry); the purge subscriber's get none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from ..redis_url import CLUSTER, SENTINEL, RedisTarget

if TYPE_CHECKING:
    from redis.asyncio.client import PubSub

__all__ = ["Clients", "RedisClient", "Subscriber"]

#: What the tier and the purge log talk to: one Redis (or a Sentinel-managed master) or a
#: cluster. Both take the same single-key commands and scripts.
RedisClient = Redis | RedisCluster


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's master pool that waits (bounded) for a free connection when all are busy,
    as the one-Redis pool does, instead of failing the command at once."""


class Clients:
    """The data client for ``target`` and whatever it needs closing (the sentinels)."""

    def __init__(
        self,
        target: RedisTarget,
        *,
        socket_timeout: float,
        max_connections: int,
        retry: Retry,
        blocking: bool = True,
    ) -> None:
        self.target = target
        self._sentinel: Sentinel | None = None
        self._pool: BlockingConnectionPool | None = None
        common: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            "health_check_interval": 0,
        }
        self.client: RedisClient
        if target.kind == CLUSTER:
            self.client = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                max_connections=max_connections,  # per node
                retry=retry,
                username=target.username,
                password=target.password,
                require_full_coverage=False,
                **common,
            )
        elif target.kind == SENTINEL:
            self._sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
                list(target.nodes),
                sentinel_kwargs={
                    "socket_timeout": socket_timeout,
                    "socket_connect_timeout": socket_timeout,
                    "retry": Retry(NoBackoff(), 0),
                },
            )
            pool: dict[str, Any] = (
                {"connection_pool_class": _BlockingSentinelPool, "timeout": socket_timeout}
                if blocking
                else {}
            )
            self.client = self._sentinel.master_for(
                target.service,
                **pool,
                db=target.db,
                username=target.username,
                password=target.password,
                max_connections=max_connections,
                retry=retry,
                **common,
            )
        elif blocking:
            extra: dict[str, Any] = {}
            if target.password is not None:  # the URL's own password wins in redis-py
                extra["password"] = target.password
            self._pool = BlockingConnectionPool.from_url(
                target.url,
                max_connections=max_connections,
                timeout=socket_timeout,  # waiting for a pooled connection is bounded too
                retry=retry,
                **common,
                **extra,
            )
            self.client = Redis(connection_pool=self._pool, retry=retry)
        else:
            extra = {"password": target.password} if target.password is not None else {}
            self.client = Redis.from_url(
                target.url, max_connections=max_connections, retry=retry, **common, **extra
            )
        self._common = common

    async def pubsub_for(self, key: str) -> tuple[PubSub, Redis | None]:
        """A pub/sub session that hears every PUBLISH, and a client to close after it.
        On a cluster: a plain connection to the node serving ``key`` (PUBLISH reaches every
        node of a cluster, so any would do; this one is where the purge log is)."""
        if not isinstance(self.client, RedisCluster):
            return self.client.pubsub(), None
        await self.client.initialize()
        node = self.client.get_node_from_key(key)
        if node is None:
            raise ConnectionError("no cluster node serves the purge log's slot")
        direct = Redis(
            host=node.host,
            port=int(node.port),
            username=self.target.username,
            password=self.target.password,
            retry=Retry(NoBackoff(), 0),
            max_connections=1,
            **self._common,
        )
        return direct.pubsub(), direct

    async def aclose(self) -> None:
        await self.client.aclose()
        if self._pool is not None:
            await self._pool.disconnect()
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                await sentinel.aclose()


class Subscriber(Clients):
    """The purge subscriber's own small client: a subscribed connection can run nothing else,
    and the lease's heartbeats must not queue behind L2 writes. No retries: a reconnect must
    go through the subscriber (redis-py would resubscribe silently, hiding the gap from the
    replay)."""

    def __init__(self, target: RedisTarget, *, socket_timeout: float) -> None:
        super().__init__(
            target,
            socket_timeout=socket_timeout,
            max_connections=2,
            retry=Retry(NoBackoff(), 0),
            blocking=False,
        )
