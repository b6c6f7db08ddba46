"""Purges: applied to every tier here, then told to every other replica over Redis pub/sub.

Replicas share L2 (Redis) but each has its own L1 (memory) and usually its own L3 (a file on
its host). A purge on one replica removes the entries from all of its tiers - L2 included, so
from every replica's L2 - and publishes a message on ``<KEY_PREFIX>tierproxy:invalidate``; every other
replica's subscriber applies it to its local tiers (L1, L3).

Pub/sub delivers at most once: a replica whose subscription was down (Redis restarted, network
cut, a silent dead connection found by the ping check) may have missed messages, so each time it
(re)subscribes it clears its whole L1 before serving from it again. L3 is not cleared (it is the
copy that keeps serving while Redis is away); a purge missed while disconnected can survive in a
replica's own L3 until the entry expires - purge again after an outage if that matters.

The subscriber is one owned task started and stopped by the app's cleanup_ctx. It reconnects
with capped exponential backoff and jitter; every wait in it is bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .keys import MAX_TARGET_LENGTH, KeySpace
from .readthrough import MAX_TAG_LENGTH, ReadThrough
from .tiers.memory import MemoryTier
from .tiers.redis import RedisTier

if TYPE_CHECKING:
    from .config import Settings
    from .metrics import Metrics
    from .tiers.base import GuardedTier

__all__ = ["Invalidation", "PurgeOrder", "PurgeOutcome"]

log = logging.getLogger("tierproxy.invalidation")

MESSAGE_VERSION = 1
_MAX_ITEMS_PER_MESSAGE = 1000  # keys or tags per published message
_TARGET_MESSAGE_BYTES = 512 * 1024  # what a published message is kept under (roughly)
_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # larger received messages are ignored (and counted)

# Subscriber timing (seconds).
_PING_INTERVAL = 1.0  # ping the subscription after this long without any traffic...
_PONG_TIMEOUT = 2.0  # ...and reconnect if nothing at all arrives this long after the ping
_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 5.0
_STABLE_AFTER = 10.0  # a subscription that lived this long resets the backoff


@dataclass(frozen=True, slots=True)
class PurgeOrder:
    keys: tuple[str, ...]  # normalised key material ("/path?q")
    tags: tuple[str, ...]  # surrogate keys
    soft: bool = False
    at: float = 0.0  # wall clock: a soft purge marks entries stale as of this time

    def chunks(self) -> Iterable[PurgeOrder]:
        """The order split into messages of bounded size (items and bytes)."""
        for field in ("keys", "tags"):
            batch: list[str] = []
            size = 0
            for item in getattr(self, field):
                if batch and (len(batch) >= _MAX_ITEMS_PER_MESSAGE
                              or size + len(item) > _TARGET_MESSAGE_BYTES):
                    yield self._with(field, tuple(batch))
                    batch, size = [], 0
                batch.append(item)
                size += len(item) + 8
            if batch:
                yield self._with(field, tuple(batch))

    def _with(self, field: str, items: tuple[str, ...]) -> PurgeOrder:
        if field == "keys":
            return PurgeOrder(items, (), self.soft, self.at)
        return PurgeOrder((), items, self.soft, self.at)


@dataclass(frozen=True, slots=True)
class PurgeOutcome:
    ok: bool  # every enabled tier purged and (with L2) the other replicas told
    body: dict[str, Any]


def _backoff(attempt: int) -> float:
    """Capped exponential backoff with jitter: half fixed, half random (no thundering herd)."""
    ceiling = min(_BACKOFF_CAP, _BACKOFF_BASE * float(1 << min(attempt, 16)))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class Invalidation:
    """Applies purges here, publishes them, and listens for other replicas' purges."""

    def __init__(
        self,
        settings: Settings,
        tiers: Sequence[GuardedTier],
        readthrough: ReadThrough,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.readthrough = readthrough
        self.metrics = metrics
        #: Tells this replica's own messages apart when they come back on the channel.
        self.replica_id = secrets.token_hex(8)
        self._keys = KeySpace(settings.origin)
        self._l2: GuardedTier | None = None
        self._l1: MemoryTier | None = None
        #: The replicas' channel: RedisTier.prefix + "invalidate" (TIERPROXY_KEY_PREFIX first).
        self.channel = ""
        for tier in tiers:
            if isinstance(tier.backend, RedisTier):
                self._l2 = tier
                self.channel = tier.backend.invalidate_channel
            elif isinstance(tier.backend, MemoryTier):
                self._l1 = tier.backend
        self.state = "disabled" if self._l2 is None else "connecting"
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self.subscriptions = 0
        self._published = {
            outcome: metrics.invalidations_published.labels(outcome)
            for outcome in ("ok", "error")
        }
        self._received = {
            outcome: metrics.invalidations_received.labels(outcome)
            for outcome in ("applied", "own", "invalid", "failed")
        }
        metrics.invalidation_connected.set_function(lambda: float(self.state == "connected"))

    # ---- purging ---------------------------------------------------------------------------

    async def purge(self, order: PurgeOrder, source: str) -> PurgeOutcome:
        """Purge everywhere: every tier here, then the other replicas' local tiers."""
        keys = [self._keys.key(material) for material in order.keys]
        soft_at = order.at if order.soft else None
        tiers = await self.readthrough.purge(keys, order.tags, soft_at)
        ok = all(isinstance(count, int) for count in tiers.values())
        body: dict[str, Any] = {
            "purged": sum(count for count in tiers.values() if isinstance(count, int)),
            "tiers": tiers,
            "soft": order.soft,
            "keys": len(order.keys),
            "tags": len(order.tags),
        }
        if self._l2 is not None:
            receivers = await self._publish(order)
            body["replicas_notified"] = receivers
            ok = ok and receivers is not None
        self.metrics.purge_requests.labels(source, "ok" if ok else "partial").inc()
        log.info("purge from %s: %d keys, %d tags, soft=%s -> %s%s", source, len(order.keys),
                 len(order.tags), order.soft, tiers,
                 "" if self._l2 is None else f", replicas notified: {body['replicas_notified']}")
        return PurgeOutcome(ok, body)

    async def _publish(self, order: PurgeOrder) -> int | None:
        """Publish ``order``; how many subscribers got it (this replica's own included), or
        None when Redis could not be told."""
        assert self._l2 is not None and isinstance(self._l2.backend, RedisTier)
        backend = self._l2.backend
        receivers = 0
        try:
            for chunk in order.chunks():
                message = json.dumps({
                    "v": MESSAGE_VERSION, "from": self.replica_id, "keys": list(chunk.keys),
                    "tags": list(chunk.tags), "soft": chunk.soft, "at": chunk.at,
                }).encode()
                async with asyncio.timeout(max(self._l2.write_timeout, 1.0)):
                    receivers = max(receivers, await backend.publish(self.channel, message))
        except Exception as exc:  # TimeoutError included: the purge is reported as partial
            self._published["error"].inc()
            log.warning("purge not published to other replicas: %r", exc)
            return None
        self._published["ok"].inc()
        return receivers

    # ---- subscribing -----------------------------------------------------------------------

    def start(self) -> None:
        if self._l2 is None or self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="tierproxy-invalidation-subscriber"
        )

    async def wait_subscribed(self, timeout: float) -> bool:
        """Wait (bounded) for the first subscription, so that its L1 clear happens before the
        first request rather than wiping what the first requests stored."""
        if self._task is None:
            return False
        try:
            async with asyncio.timeout(timeout):
                await self._subscribed.wait()
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            async with asyncio.timeout(5.0):
                await task
        except (asyncio.CancelledError, TimeoutError):
            pass
        except Exception as exc:
            log.warning("invalidation subscriber ended with %r", exc)

    async def _run(self) -> None:
        assert self._l2 is not None and self.settings.redis_url is not None
        timeout = max(1.0, self.settings.l2_write_timeout)
        # Its own small pool: a subscribed connection can run nothing else.
        client = Redis.from_url(
            self.settings.redis_url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            max_connections=2,
        )
        loop = asyncio.get_running_loop()
        attempt = 0
        try:
            while True:  # until cancelled; every pass waits a bounded, growing backoff
                self.state = "connecting"
                started = loop.time()
                try:
                    await self._session(client, timeout)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.log(logging.WARNING if attempt == 0 else logging.DEBUG,
                            "invalidation channel lost (%r); reconnecting", exc)
                self.state = "connecting"
                if loop.time() - started >= _STABLE_AFTER:
                    attempt = 0
                await asyncio.sleep(_backoff(attempt))
                attempt += 1
        finally:
            self.state = "disabled"
            try:
                await client.aclose()
            except Exception as exc:
                log.debug("closing the invalidation client: %r", exc)

    async def _session(self, client: Redis, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        pubsub = client.pubsub()
        try:
            async with asyncio.timeout(timeout):
                await pubsub.subscribe(self.channel)
                for _ in range(100):  # the confirmation comes first; bounded anyway
                    message = await pubsub.get_message(timeout=timeout)
                    if message is not None and message.get("type") == "subscribe":
                        break
                else:
                    raise ConnectionError("no subscribe confirmation")
            # Messages published while we were not subscribed are lost: start from a clean L1.
            self._clear_l1("connect" if self.subscriptions == 0 else "reconnect")
            self.subscriptions += 1
            self._subscribed.set()
            self.state = "connected"
            log.info("subscribed to %s", self.channel)
            last_heard = loop.time()
            ping_sent = False
            while True:  # until the connection fails or the task is cancelled
                message = await pubsub.get_message(timeout=_PING_INTERVAL)
                now = loop.time()
                if message is not None:
                    last_heard = now
                    ping_sent = False
                    if message.get("type") == "message":
                        await self._apply(message.get("data"))
                    continue
                if now - last_heard >= _PING_INTERVAL + _PONG_TIMEOUT and ping_sent:
                    raise ConnectionError("no reply to ping: subscription presumed dead")
                if not ping_sent and now - last_heard >= _PING_INTERVAL:
                    async with asyncio.timeout(timeout):
                        await pubsub.ping()
                    ping_sent = True
        finally:
            self.state = "connecting"
            try:
                async with asyncio.timeout(1.0):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            except Exception as exc:
                log.debug("closing the pub/sub connection: %r", exc)

    def _clear_l1(self, reason: str) -> None:
        if self._l1 is None:
            return
        dropped = self._l1.clear()
        self.metrics.l1_clears.labels(reason).inc()
        if dropped:
            log.info("L1 cleared (%d entries): %s", dropped, reason)

    async def _apply(self, data: object) -> None:
        order = self._parse(data)
        if order is None:
            self._received["invalid"].inc()
            return
        if isinstance(order, str):  # "own": this replica's message, already applied
            self._received["own"].inc()
            return
        keys = [self._keys.key(material) for material in order.keys]
        results = await self.readthrough.purge(
            keys, order.tags, order.at if order.soft else None, shared=False
        )
        ok = all(isinstance(count, int) for count in results.values())
        self._received["applied" if ok else "failed"].inc()
        log.debug("purge from another replica: %d keys, %d tags -> %s",
                  len(order.keys), len(order.tags), results)

    def _parse(self, data: object) -> PurgeOrder | str | None:
        if not isinstance(data, bytes) or len(data) > _MAX_MESSAGE_BYTES:
            return None
        try:
            fields = json.loads(data)
        except ValueError:
            return None
        if not isinstance(fields, dict) or fields.get("v") != MESSAGE_VERSION:
            return None
        if fields.get("from") == self.replica_id:
            return "own"
        keys, tags = fields.get("keys"), fields.get("tags")
        soft, at = fields.get("soft"), fields.get("at")
        if not isinstance(keys, list) or not isinstance(tags, list) or not isinstance(soft, bool):
            return None
        if not all(isinstance(k, str) and k.startswith("/") and len(k) <= MAX_TARGET_LENGTH
                   for k in keys):
            return None
        if not all(isinstance(t, str) and 0 < len(t) <= MAX_TAG_LENGTH for t in tags):
            return None
        if not isinstance(at, (int, float)) or isinstance(at, bool):
            return None
        # A soft purge from a replica whose clock runs ahead must not mark later copies stale.
        return PurgeOrder(tuple(keys), tuple(tags), soft, min(float(at), time.time()))
