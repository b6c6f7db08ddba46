"""Purges: applied to every tier here, then on every other replica, and never undone.

Replicas share L2 (Redis) but each has its own L1 (memory) and usually its own L3 (a file on
its host). A purge on one replica removes the entries from all of its tiers - L2 included, so
from every replica's L2 - and then reaches the other replicas' local tiers (L1, L3) like this:

* **Purge log.** Each purge message is appended to a capped Redis stream and published on the
  channel in one script, so both carry every purge in the same order and each message carries
  its log id. A replica remembers the last id it applied. Each time it (re)subscribes it
  replays the log after that id. When the log no longer holds that id (a gap longer than the
  log keeps, Redis lost its data) or it has none (it just started, its L3 file kept), it
  replays everything the log holds, clears its L1, and stops trusting L3 copies stored before
  the oldest entry left in the log (:class:`~tierproxy.tiers.base.LocalTrust` ``floor``): a
  purge only concerns copies stored before it, and every purge since then has been applied.
* **Lease (fencing).** A replica trusts its local copies only while its purge lease holds: it
  pings its subscription every lease/4; once the pong is back (every message before it was
  applied first) it registers its lease end and the last log id it applied in Redis, and
  renews its local lease from the moment it sent the ping. Without a renewal its local
  copies stop being fresh to it when the lease runs out - checked on every would-be fresh hit
  - and it stops writing to L2.
* **PURGE waits** after publishing until every other replica with a live lease has applied
  the purge (acked) or its lease has run out plus one L2 write timeout (fenced: it has
  stopped trusting its local copies, and a write it started before has landed). Then, when
  there are other replicas, L2 is purged once more (a write another replica landed there
  before it heard of the purge), and a second round - published and acknowledged the same
  way - purges every replica's L1 again (any replica may have read that copy from L2 into its
  L1 meanwhile). The purging replica stores no copy of a purged key until its second L2
  purge (:meth:`~tierproxy.purge.Purges.holding`). Then 200, with ``replicas_acked``
  (this replica included) and ``replicas_fenced``; a replica still live and silent at the
  end of a wait (about the lease plus the write timeout) makes it 503
  (``replicas_unconfirmed``), as does a tier or the log that could not be written.

An untrusted local copy is revalidated before it is served (and can still be served stale,
flagged, if the origin fails and the stale rules allow it); it is never backfilled anywhere.
While Redis is unreachable from a replica for longer than the lease, its local copies are
therefore revalidated with the origin - the price of knowing that nothing purged is served.

Without Redis (one replica) none of this applies: its own purges are all there is.

The subscriber is one owned task started and stopped by the app's cleanup_ctx. It reconnects
with capped exponential backoff and jitter; every wait in it is bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .backoff import SessionBackoff
from .clock import SYSTEM, Clock
from .keys import MAX_TARGET_LENGTH, CacheKey, KeySpace
from .policy import MAX_TAG_LENGTH
from .readthrough import ReadThrough
from .tiers.base import LocalTrust, Replicated, lease_clock
from .tiers.purge_log import PURGE_LOG_MAXLEN, PurgeLog, stream_id

if TYPE_CHECKING:
    from .config import Settings
    from .metrics import Metrics
    from .tiers.base import GuardedTier
    from .tiers.redis_clients import Clients

__all__ = ["Invalidation", "PurgeOrder", "PurgeOutcome"]

log = logging.getLogger("tierproxy.invalidation")

# 2: published as "<purge-log id> <JSON>"; version 1 replicas ignore these (counted invalid).
MESSAGE_VERSION = 2
_MAX_ITEMS_PER_MESSAGE = 1000  # keys or tags per published message
# What a published message is kept under (roughly): the log keeps PURGE_LOG_MAXLEN of them.
_TARGET_MESSAGE_BYTES = 64 * 1024
_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # larger received messages are ignored (and counted)
_REPLAY_BATCH = 100  # log entries read per command when catching up
_MAX_REPLAY_ROUNDS = PURGE_LOG_MAXLEN // _REPLAY_BATCH + 20  # past that: treated as a gap
_ACK_POLL_INTERVAL = 0.02  # a PURGE looks at the replicas' acknowledgements this often

# Subscriber timing (seconds).
_MAX_PONG_TIMEOUT = 2.0  # no pong this long after a ping (at most the lease): reconnect
_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 5.0
_STABLE_AFTER = 10.0  # a subscription that lived this long resets the backoff


@dataclass(frozen=True, slots=True)
class PurgeOrder:
    keys: tuple[str, ...]  # normalised key material ("/path?q")
    tags: tuple[str, ...]  # surrogate keys
    soft: bool = False
    at: float = 0.0  # wall clock: a soft purge marks entries stale as of this time
    #: The second round of a purge (see Invalidation.purge): only L1 is purged again.
    again: bool = False

    def chunks(self) -> Iterable[PurgeOrder]:
        """The order split into messages of bounded size (items and bytes)."""
        for field in ("keys", "tags"):
            batch: list[str] = []
            size = 0
            for item in getattr(self, field):
                if batch and (
                    len(batch) >= _MAX_ITEMS_PER_MESSAGE or size + len(item) > _TARGET_MESSAGE_BYTES
                ):
                    yield self._with(field, tuple(batch))
                    batch, size = [], 0
                batch.append(item)
                size += len(item) + 8
            if batch:
                yield self._with(field, tuple(batch))

    def _with(self, field: str, items: tuple[str, ...]) -> PurgeOrder:
        if field == "keys":
            return PurgeOrder(items, (), self.soft, self.at, self.again)
        return PurgeOrder((), items, self.soft, self.at, self.again)


async def apply_order(
    readthrough: ReadThrough, keyspace: KeySpace, order: PurgeOrder
) -> dict[str, int | str]:
    """Apply a purge heard from another replica or worker here: this process's own tiers only
    (the shared ones were purged by the sender), only L1 in a purge's second round."""
    return await readthrough.purges.purge(
        [keyspace.key(material) for material in order.keys],
        order.tags,
        order.at if order.soft else None,
        shared=False,
        synchronous_only=order.again,
    )


@dataclass(frozen=True, slots=True)
class PurgeOutcome:
    ok: bool  # every enabled tier purged and (with L2) the other replicas told
    body: dict[str, Any]


def _reached(applied: str, target: tuple[int, int]) -> bool:
    try:
        return stream_id(applied) >= target
    except ValueError:
        return False


class Invalidation:
    """Applies purges here, publishes them, and applies other replicas' purges (see module)."""

    def __init__(
        self,
        settings: Settings,
        tiers: Sequence[GuardedTier],
        readthrough: ReadThrough,
        metrics: Metrics,
        keys: KeySpace,
        *,
        clock: Clock = SYSTEM,
    ) -> None:
        self.settings = settings
        # Wall-clock readings compared with stored copies (trust floors, soft purge times).
        # Leases and the subscriber's timing are real time (lease_clock, the loop clock).
        self.clock = clock
        self.readthrough = readthrough
        self.metrics = metrics
        self.lease = settings.purge_lease
        #: Tells this replica's own messages apart when they come back on the channel.
        self.replica_id = secrets.token_hex(8)
        self._keys = keys
        self._l2: GuardedTier | None = None  # the shared tier that carries the purge log
        self._replicated: Replicated | None = None
        self._l1: GuardedTier | None = None  # memory: cleared at once when trust is lost
        for tier in tiers:
            replicated = tier.replicated()
            if replicated is not None:
                self._l2, self._replicated = tier, replicated
            elif tier.synchronous:
                self._l1 = tier
        self.state = "disabled" if self._l2 is None else "connecting"
        #: Set in a worker of a group (tierproxy.workers): without L2, takes a purge to the
        #: other workers' L1; returns (acknowledged, unconfirmed).
        self.siblings: Callable[[PurgeOrder], Awaitable[tuple[int, int]]] | None = None
        #: None without Redis: one replica's local copies are always its own to trust.
        self.trust: LocalTrust | None = None
        self._log: PurgeLog | None = None
        if self._replicated is not None:
            self._log = self._replicated.purge_log()
            self._replicated.fence(self.replica_id)  # L2 writes: only under our lease
            self.trust = LocalTrust()
            for tier in tiers:
                if not tier.shared:
                    tier.trust = self.trust
            readthrough.trust = self.trust
        readthrough.invalidate_everywhere = self.invalidate
        #: The last purge-log id applied here (None: none yet - everything local untrusted).
        self.last_id: str | None = None
        self._next_beat = 0.0
        self._ack_log: PurgeLog | None = None  # the subscriber's, while it runs
        self._ack_timeout = max(1.0, settings.l2_write_timeout)
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self.subscriptions = 0
        self._published = {
            outcome: metrics.invalidations_published.labels(outcome) for outcome in ("ok", "error")
        }
        self._received = {
            outcome: metrics.invalidations_received.labels(outcome)
            for outcome in ("applied", "replayed", "own", "invalid", "failed")
        }
        self._replicas = {
            outcome: metrics.purge_replicas.labels(outcome)
            for outcome in ("acked", "fenced", "unconfirmed")
        }
        metrics.invalidation_connected.set_function(lambda: float(self.state == "connected"))
        metrics.purge_lease_held.set_function(
            lambda: float(self.trust is not None and self.trust.held())
        )

    def trusted(self) -> bool:
        """Whether this replica's local copies may be served fresh right now."""
        return self.trust is None or self.trust.held()

    # ---- purging ---------------------------------------------------------------------------

    async def invalidate(self, keys: Sequence[CacheKey]) -> PurgeOutcome:
        """RFC 9111 §4.4 (a successful unsafe request): ``keys`` purged as a ``PURGE`` of them
        is, except that the other replicas are waited for at most the L2 write timeout - a
        replica slower than that applies it when it hears of it, or stops trusting its local
        copies when its lease runs out."""
        order = PurgeOrder(tuple(key.material for key in keys), (), False, self.clock.wall())
        return await self.purge(order, "unsafe-method", ack_within=self.settings.l2_write_timeout)

    async def purge(
        self, order: PurgeOrder, source: str, *, ack_within: float | None = None
    ) -> PurgeOutcome:
        """Purge everywhere: every tier here, then the other replicas' local tiers.
        ``ack_within``: wait at most this long for the other replicas (default: until each
        acknowledged or was fenced, about a lease).

        Two rounds when there are other replicas (or workers). In the first, a replica whose
        backfill into the shared tier (L2; a group's shared L3) was on its way when this
        purge went through that tier can land it there before it hears of the purge; any
        replica may read it from there meanwhile and store it in its L1. So once the first
        round is acknowledged (every such write has landed or been undone), the shared tier is
        purged once more, and a second round purges every replica's L1 again (and undoes any
        write of that copy still on its way). This replica holds the purge throughout the
        first round (:meth:`~tierproxy.purge.Purges.holding`): it stores no copy of a purged
        key meanwhile."""
        keys = [self._keys.key(material) for material in order.keys]
        soft_at = order.at if order.soft else None
        body: dict[str, Any] = {}
        replicas = ""
        again = False  # a second round is due
        with self.readthrough.purges.holding(keys, order.tags):
            tiers = await self.readthrough.purge(keys, order.tags, soft_at)
            ok = all(isinstance(count, int) for count in tiers.values())
            body.update(
                purged=sum(count for count in tiers.values() if isinstance(count, int)),
                tiers=tiers,
                soft=order.soft,
                keys=len(order.keys),
                tags=len(order.tags),
            )
            siblings_acked = siblings_unconfirmed = 0
            if self._l2 is None and self.siblings is not None:
                # Workers of one group without Redis: the supervisor's private channel takes
                # the purge to every other worker's L1 and L3 - the shared file: each sibling
                # purges it again, after any write of its own that landed there (tierproxy.workers).
                siblings_acked, siblings_unconfirmed = await self.siblings(order)
                again = siblings_acked > 0
            acked: int | None = None
            fenced: int | None = None
            unconfirmed: int | None = None
            if self._l2 is not None:
                published = await self._publish(order)
                if published is not None:
                    acked, fenced, unconfirmed, lost = await self._await_replicas(
                        published, ack_within
                    )
                    if acked or fenced or lost:
                        # Another replica may have written a copy to L2 after the purge above
                        # and before it applied this one (an acked replica: a backfill that
                        # landed in between; a fenced one: a write started before its lease
                        # ran out). Such a write has landed by now, and anything later is
                        # undone by the replica itself (its purge generation moved when it
                        # applied this): purge the shared tiers once more.
                        shared = await self.readthrough.purge(
                            keys, order.tags, soft_at, local=False
                        )
                        ok = ok and all(isinstance(count, int) for count in shared.values())
                        again = True
        if again:
            # Any replica may have stored such a copy in its L1 before the shared tier was
            # purged again: the second round (L1 only).
            second = dataclasses.replace(order, again=True)
            if self._l2 is None and self.siblings is not None:
                _, siblings_again = await self.siblings(second)
                siblings_unconfirmed = max(siblings_unconfirmed, siblings_again)
            elif self._l2 is not None:
                published = await self._publish(second)
                if published is None:
                    unconfirmed = None
                else:
                    _, _, unconfirmed_again, _ = await self._await_replicas(published, ack_within)
                    if unconfirmed is not None:
                        unconfirmed = (
                            None
                            if unconfirmed_again is None
                            else max(unconfirmed, unconfirmed_again)
                        )
        if self._l2 is None and self.siblings is not None:
            ok = ok and siblings_unconfirmed == 0
            body.update(workers_acked=siblings_acked + 1, workers_unconfirmed=siblings_unconfirmed)
            replicas = f", workers acked {siblings_acked + 1}, unconfirmed {siblings_unconfirmed}"
        if self._l2 is not None:
            if acked is not None:
                acked += 1  # this replica
            ok = ok and unconfirmed == 0
            body.update(
                replicas_acked=acked, replicas_fenced=fenced, replicas_unconfirmed=unconfirmed
            )
            replicas = f", replicas acked {acked}, fenced {fenced}, unconfirmed {unconfirmed}"
        self.metrics.purge_requests.labels(source, "ok" if ok else "partial").inc()
        log.log(
            logging.INFO if ack_within is None or not ok else logging.DEBUG,
            "purge from %s: %d keys, %d tags, soft=%s -> %s%s",
            source,
            len(order.keys),
            len(order.tags),
            order.soft,
            tiers,
            replicas,
        )
        return PurgeOutcome(ok, body)

    async def _publish(self, order: PurgeOrder) -> str | None:
        """Log and publish ``order``; the log id of its last message, or None when Redis could
        not be told."""
        assert self._l2 is not None and self._log is not None
        last: str | None = None
        try:
            for chunk in order.chunks():
                async with asyncio.timeout(max(self._l2.write_timeout, 1.0)):
                    last = await self._log.publish(self._message(chunk))
        except Exception as exc:  # noqa: BLE001 - TimeoutError included: the purge is reported as partial
            self._published["error"].inc()
            log.warning("purge not published to other replicas: %r", exc)
            return None
        self._published["ok"].inc()
        return last

    async def _await_replicas(
        self, published: str, within: float | None = None
    ) -> tuple[int, int, int | None, bool]:
        """Wait (bounded: ``within`` seconds, by default about a lease) until every other live
        replica applied the log up to ``published`` or was fenced; (acked, fenced, still
        unconfirmed - None if Redis never answered, whether it waited out leases a Redis that
        lost its data could not show)."""
        assert self._l2 is not None and self._log is not None
        target = stream_id(published)
        write_margin = self.settings.l2_write_timeout + 0.5
        margin_ms = int(write_margin * 1000)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.lease + write_margin + 1.0 if within is None else within)
        acked: set[str] = set()
        fenced: set[str] = set()
        seen: set[str] = set()
        pending: set[str] | None = None
        blind = False  # this Redis lost its registry too recently to know every lease
        waited_out_loss = False
        while True:  # bounded by the deadline
            try:
                async with asyncio.timeout(max(0.5, self._l2.write_timeout)):
                    now_ms, lost_ms, rows = await self._log.replicas(margin_ms)
            except Exception as exc:  # TimeoutError included  # noqa: BLE001 - any failure, timeouts included: poll again until the deadline
                log.warning("purge: cannot read the replicas' acknowledgements: %r", exc)
            else:
                pending = set()
                current: set[str] = set()
                for replica, lease_end, applied in rows:
                    if replica == self.replica_id:
                        continue
                    current.add(replica)
                    if _reached(applied, target):
                        acked.add(replica)
                    elif now_ms >= lease_end + margin_ms:
                        fenced.add(replica)
                    else:
                        pending.add(replica)
                fenced |= seen - current - acked  # its lease ended long enough ago to be gone
                seen |= current
                # A replica may hold a lease this Redis no longer knows of (it lost its data):
                # wait until any such lease has run out, then purge the shared tiers again.
                blind = bool(lost_ms) and now_ms < lost_ms + int(self.lease * 1000) + margin_ms
                waited_out_loss = waited_out_loss or blind
                if not pending and not blind:
                    break
            if loop.time() >= deadline:
                break
            await asyncio.sleep(_ACK_POLL_INTERVAL)
        fenced -= acked
        if blind:  # the deadline came first (it should not: it is longer than a lease)
            pending = set() if pending is None else pending
            pending.add("(leases this Redis lost)")
        unconfirmed = None if pending is None else len(pending)
        self._replicas["acked"].inc(len(acked))
        self._replicas["fenced"].inc(len(fenced))
        self._replicas["unconfirmed"].inc(unconfirmed or 0)
        if fenced and within is None:
            log.warning(
                "purge: %d replicas did not acknowledge within their lease and are "
                "fenced (they revalidate their local copies)",
                len(fenced),
            )
        if unconfirmed and within is None:
            log.warning(
                "purge: %d replicas neither acknowledged nor let their lease run out", unconfirmed
            )
        return len(acked), len(fenced), unconfirmed, waited_out_loss

    # ---- subscribing -----------------------------------------------------------------------

    def start(self) -> None:
        if self._l2 is None or self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="tierproxy-invalidation-subscriber"
        )

    async def wait_subscribed(self, timeout: float) -> bool:
        """Wait (bounded) for the first subscription and lease, so that the first requests
        can be answered from local copies and its L1 clear does not wipe what they stored."""
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
        assert self.trust is not None and self._log is not None
        # Shutting down (the backfills were drained first, under the lease): trust nothing
        # local and write nothing shared from now on, so that PURGEs need not wait for this
        # replica any more.
        self.trust.lease_until = -math.inf
        try:
            async with asyncio.timeout(1.0):
                await self._log.leave(self.replica_id)
        except Exception as exc:  # noqa: BLE001 - its lease then simply runs out
            log.debug("leaving the replicas' registry: %r", exc)
        task.cancel()
        try:
            async with asyncio.timeout(5.0):
                await task
        except (asyncio.CancelledError, TimeoutError):
            pass
        except Exception as exc:  # noqa: BLE001 - shutdown logs whatever the subscriber ended with
            log.warning("invalidation subscriber ended with %r", exc)

    async def _run(self) -> None:
        assert self._l2 is not None and self._log is not None
        assert self.settings.redis_url is not None
        timeout = max(1.0, self.settings.l2_write_timeout)
        # Its own small pool (redis_clients.Subscriber): a subscribed connection can run
        # nothing else, and the lease's heartbeats must not queue behind L2 writes. No
        # retries: a reconnect must go through _session (redis-py would resubscribe
        # silently, hiding the gap from the replay).
        assert self._replicated is not None
        clients = self._replicated.subscriber(timeout)
        purge_log = self._replicated.purge_log(clients.client)
        self._ack_log = purge_log
        loop = asyncio.get_running_loop()
        backoff = SessionBackoff(_BACKOFF_BASE, _BACKOFF_CAP, _STABLE_AFTER)
        try:
            while True:  # until cancelled; every pass waits a bounded, growing backoff
                self.state = "connecting"
                started = loop.time()
                try:
                    await self._session(clients, purge_log, timeout)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any channel failure means reconnect, never a dead subscriber
                    log.log(
                        logging.WARNING if backoff.attempt == 0 else logging.DEBUG,
                        "invalidation channel lost (%r); reconnecting (local copies are "
                        "revalidated once the %.1fs lease runs out)",
                        exc,
                        self.lease,
                    )
                self.state = "connecting"
                await asyncio.sleep(backoff.pause(loop.time() - started))
        finally:
            self.state = "disabled"
            try:
                await clients.aclose()
            except Exception as exc:  # noqa: BLE001 - closing is best effort
                log.debug("closing the invalidation client: %r", exc)

    async def _session(self, clients: Clients, purge_log: PurgeLog, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            pubsub, direct = await clients.pubsub_for(purge_log.log_key)
        try:
            async with asyncio.timeout(timeout):
                await pubsub.subscribe(purge_log.channel)
                for _ in range(100):  # the confirmation comes first; bounded anyway
                    message = await pubsub.get_message(timeout=timeout)
                    if message is not None and message.get("type") == "subscribe":
                        break
                else:
                    raise ConnectionError("no subscribe confirmation")
            # From here on every purge reaches this connection; what came before is in the log.
            subscribed_at = self.clock.wall()
            first = self.subscriptions == 0
            self.subscriptions += 1
            await self._catch_up(purge_log, subscribed_at, first, timeout)
            await self._beat(pubsub, purge_log, timeout)
            self.state = "connected"
            self._subscribed.set()
            log.info("subscribed to %s (purge log at %s)", purge_log.channel, self.last_id)
            while True:  # until the connection fails or the task is cancelled
                wait = self._next_beat - lease_clock()
                if wait > 0:
                    message = await pubsub.get_message(timeout=wait)
                    if message is not None:
                        await self._on_message(message)
                    continue
                await self._beat(pubsub, purge_log, timeout)
        finally:
            self.state = "connecting"
            try:
                async with asyncio.timeout(1.0):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
                    if direct is not None:
                        await direct.aclose()
            except Exception as exc:  # noqa: BLE001 - closing is best effort
                log.debug("closing the pub/sub connection: %r", exc)

    async def _beat(self, pubsub: Any, purge_log: PurgeLog, timeout: float) -> None:
        """Confirm the subscription (ping, apply what comes before the pong), then register
        the lease and what was applied; the local lease runs from the ping."""
        assert self.trust is not None
        sent = lease_clock()
        async with asyncio.timeout(timeout):
            await pubsub.ping()
        pong_by = sent + min(_MAX_PONG_TIMEOUT, self.lease)
        for _ in range(100_000):  # bounded by pong_by as well
            left = pong_by - lease_clock()
            if left <= 0:
                raise ConnectionError("no reply to ping: subscription presumed dead")
            message = await pubsub.get_message(timeout=left)
            if message is None:
                continue
            if message.get("type") == "pong":
                break
            await self._on_message(message)
        else:
            raise ConnectionError("no pong among the messages")
        lease_ms = int((self.lease - (lease_clock() - sent)) * 1000)
        if lease_ms > 0:
            async with asyncio.timeout(timeout):
                await purge_log.heartbeat(self.replica_id, lease_ms, self.last_id or "0-0")
            self.trust.lease_until = max(self.trust.lease_until, sent + self.lease)
        self._next_beat = sent + self.lease / 4

    async def _catch_up(
        self, purge_log: PurgeLog, subscribed_at: float, first: bool, timeout: float
    ) -> None:
        """Apply every purge this replica may have missed.

        With a last id still in the log: replay what follows it. Otherwise (this process just
        started, or the log no longer holds that id): replay everything the log holds, and
        distrust local copies stored before its oldest entry - a purge older than that cannot
        be known, and a purge only concerns copies stored before it. L1 is cleared then.
        """
        start = self.last_id
        if start is not None:
            for _ in range(_MAX_REPLAY_ROUNDS):
                async with asyncio.timeout(timeout):
                    rows = await purge_log.read(start, _REPLAY_BATCH)
                if not rows or rows[0][0] != start:
                    break  # the entry last applied here is gone: a gap
                for entry_id, payload in rows[1:]:
                    await self._apply(payload, "replayed")
                    self.last_id = entry_id
                if len(rows) < _REPLAY_BATCH:
                    return  # caught up: nothing was missed that is not applied now
                start = rows[-1][0]
        async with asyncio.timeout(timeout):
            oldest = await purge_log.oldest()
            if oldest is None:  # an empty log (Redis lost it): its history starts now
                if self.last_id is not None:
                    # This Redis lost its data (restart, failover), the replicas' leases with
                    # it: other replicas may still hold one it does not know. PURGEs in the
                    # next lease wait them out (_await_replicas).
                    await purge_log.mark_lost(int((self.lease + self._ack_timeout) * 2000))
                oldest = await purge_log.publish(self._message(PurgeOrder((), ())))
            offset = await purge_log.clock_offset(self.clock.wall)
        # Local copies stored before the oldest purge the log holds may have missed one.
        floor = (stream_id(oldest)[0] + 1) / 1000 - offset
        reason = "connect" if first and self.last_id is None else "gap"
        self._distrust(min(floor, subscribed_at), reason)
        if reason == "gap":
            log.warning(
                "purge log gap (this replica missed purges the log no longer holds): "
                "L1 cleared, L3 copies stored before %.3f are revalidated",
                floor,
            )
        start, include = oldest, True
        for _ in range(_MAX_REPLAY_ROUNDS):
            async with asyncio.timeout(timeout):
                rows = await purge_log.read(start, _REPLAY_BATCH)
            if not include and (not rows or rows[0][0] != start):
                # The log was trimmed past where this replay had got to: purges were lost.
                self._distrust(subscribed_at, "gap")
                break
            for entry_id, payload in rows if include else rows[1:]:
                await self._apply(payload, "replayed")
                self.last_id = entry_id
            if len(rows) < _REPLAY_BATCH:
                break
            start, include = rows[-1][0], False
        else:
            self._distrust(subscribed_at, "gap")  # more than the log keeps: trust none of it
        if self.last_id is None:
            self.last_id = oldest

    def _distrust(self, at: float, reason: str) -> None:
        """Local copies stored before ``at`` may have missed purges: clear L1, distrust older
        L3 copies, and write back nothing read or fetched before now."""
        assert self.trust is not None
        self.trust.raise_floor(at)
        self.readthrough.distrust_local()
        self.metrics.local_distrusts.labels(reason).inc()
        self._clear_l1("connect" if reason == "connect" else "reconnect")

    def _message(self, order: PurgeOrder) -> bytes:
        return json.dumps(
            {
                "v": MESSAGE_VERSION,
                "from": self.replica_id,
                "keys": list(order.keys),
                "tags": list(order.tags),
                "soft": order.soft,
                "at": order.at,
                **({"again": True} if order.again else {}),
            }
        ).encode()

    def _clear_l1(self, reason: str) -> None:
        if self._l1 is None:
            return
        dropped = self._l1.clear()
        self.metrics.l1_clears.labels(reason).inc()
        if dropped:
            log.info("L1 cleared (%d entries): %s", dropped, reason)

    async def _on_message(self, message: dict[str, Any]) -> None:
        if message.get("type") != "message":
            return
        data = message.get("data")
        entry_id, _, payload = data.partition(b" ") if isinstance(data, bytes) else (b"", b"", b"")
        try:
            position = stream_id(entry_id.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            self._received["invalid"].inc()
            return
        if self.last_id is not None and position <= stream_id(self.last_id):
            return  # already applied from the log
        await self._apply(payload, "applied")
        self.last_id = entry_id.decode("ascii")
        if self._ack_log is not None:  # a PURGE waits on this: tell it at once
            async with asyncio.timeout(self._ack_timeout):
                await self._ack_log.ack(self.replica_id, self.last_id)

    async def _apply(self, data: bytes, outcome: str) -> None:
        order = self._parse(data)
        if order is None:
            self._received["invalid"].inc()
            return
        if order == "anchor":  # a replica's first entry in an empty log: nothing to purge
            return
        if isinstance(order, str):  # "own": this replica's message, already applied
            self._received["own"].inc()
            return
        results = await apply_order(self.readthrough, self._keys, order)
        ok = all(isinstance(count, int) for count in results.values())
        self._received[outcome if ok else "failed"].inc()
        if not ok:
            # Not applied everywhere here: what this replica stored so far can't be trusted.
            log.warning(
                "purge from another replica not applied here (%s): local copies "
                "stored before now are revalidated",
                results,
            )
            self._distrust(self.clock.wall(), "purge-failed")
        log.debug(
            "purge from another replica: %d keys, %d tags -> %s",
            len(order.keys),
            len(order.tags),
            results,
        )

    def _parse(self, data: object) -> PurgeOrder | str | None:
        if not isinstance(data, bytes) or len(data) > _MAX_MESSAGE_BYTES:
            return None
        try:
            fields = json.loads(data)
        except ValueError:
            return None
        if not isinstance(fields, dict) or fields.get("v") != MESSAGE_VERSION:
            return None
        keys, tags = fields.get("keys"), fields.get("tags")
        if keys == [] and tags == []:
            return "anchor"
        if fields.get("from") == self.replica_id:
            return "own"
        soft, at, again = fields.get("soft"), fields.get("at"), fields.get("again", False)
        if not isinstance(keys, list) or not isinstance(tags, list) or not isinstance(soft, bool):
            return None
        if not isinstance(again, bool):
            return None
        if not all(
            isinstance(k, str) and k.startswith("/") and len(k) <= MAX_TARGET_LENGTH for k in keys
        ):
            return None
        if not all(isinstance(t, str) and 0 < len(t) <= MAX_TAG_LENGTH for t in tags):
            return None
        if not isinstance(at, (int, float)) or isinstance(at, bool):
            return None
        # A soft purge from a replica whose clock runs ahead must not mark later copies stale.
        return PurgeOrder(tuple(keys), tuple(tags), soft, min(float(at), self.clock.wall()), again)
