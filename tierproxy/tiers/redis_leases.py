"""Fetch leases in Redis: one origin fetch per key across the replicas (TIERPROXY_COALESCE=cluster).

Used by :mod:`tierproxy.cluster_coalesce`; this module is the only one that talks to Redis
for it. Names, under the L2 tier's per-origin prefix (``<TIERPROXY_KEY_PREFIX>tierproxy:
<origin id>:``, like the purge log's):

* ``fetch-lease:<sha256(flight name)>`` - a string holding the leaseholder's token
  (``<replica id>:<n>``), set by a script as ``SET NX PX`` would, except that a lease held
  under the replica's own id is its own (the lease runs out by itself if its holder dies);
* ``fetched`` - the channel a leaseholder publishes ``<lease name> stored|unstored`` on
  after it released its lease.

Every command names at most one key (Redis Cluster safe); the release is a compare-and-delete
script (only the holder's own lease, by its token, goes). Every call is bounded by the L2 write timeout and
never raises: a failure is ``None`` (the caller then behaves as without cluster coalescing).
One pub/sub connection per process listens on the channel and wakes the local waiters of the
lease named in each message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..backoff import SessionBackoff
from .redis import RedisTier
from .redis_clients import Subscriber

if TYPE_CHECKING:
    from .base import GuardedTier

__all__ = ["LOST", "STORED", "UNSTORED", "FetchLeases", "LeaseNote", "for_tier"]

log = logging.getLogger("tierproxy.tiers.leases")

STORED = "stored"
UNSTORED = "unstored"
#: Not a message: the channel was lost, so a message may be (the waiter looks again).
LOST = "lost"

# KEYS[1] the lease; ARGV[1] the new holder's token; ARGV[2] its length in ms; ARGV[3] this
# process's id. Taken when free, or when held under this process's id (a lease of its own
# left behind: never waited on), under the new token (a late release of the old one misses).
_ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, string.len(ARGV[3])) ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS[1] the lease; ARGV[1] the holder's token. Deletes it only while it is still that one's.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_BACKOFF_BASE = 0.1
_BACKOFF_CAP = 5.0
_STABLE_AFTER = 10.0  # a subscription that lasted this long resets the reconnect backoff


def for_tier(tier: GuardedTier, timeout: float) -> FetchLeases | None:
    """Fetch leases in ``tier``'s Redis, or None when it is not the Redis tier."""
    backend = tier.backend
    return FetchLeases(backend, timeout=timeout) if isinstance(backend, RedisTier) else None


class LeaseNote:
    """What a waiter hears about one lease: set once, with ``stored`` or ``unstored`` (or
    ``lost``), until :meth:`clear`."""

    __slots__ = ("event", "what")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.what = ""

    def tell(self, what: str) -> None:
        if not self.event.is_set():
            self.what = what
            self.event.set()

    def clear(self) -> None:
        self.what = ""
        self.event.clear()


class FetchLeases:
    """Fetch leases and their notifications for one L2 tier (see module)."""

    def __init__(self, tier: RedisTier, *, timeout: float) -> None:
        self.timeout = timeout
        self._tier = tier
        self.client = tier.client
        base = f"{tier.prefix}{tier.keys.origin_id}:"  # as the purge log's names
        self._lease_prefix = base + "fetch-lease:"
        self.channel = base + "fetched"
        #: This process's id as a leaseholder; each lease it takes holds ``<owner>:<n>``.
        self.owner = secrets.token_hex(8)
        self._taken = itertools.count()
        self._acquire = self.client.register_script(_ACQUIRE)
        self._release = self.client.register_script(_RELEASE)
        # Local waiters per lease name: one note per waiter, bounded by the waiting requests.
        self._waiters: dict[str, set[LeaseNote]] = {}
        #: True while the channel is subscribed (a waiter is only woken while it is).
        self.connected = False
        self._task: asyncio.Task[None] | None = None

    def lease_name(self, flight: str) -> str:
        return self._lease_prefix + hashlib.sha256(flight.encode()).hexdigest()

    def token(self) -> str:
        """A new holder token of this process (the value a lease it takes holds)."""
        return f"{self.owner}:{next(self._taken)}"

    async def acquire(
        self, lease: str, token: str, ms: int, *, timeout: float | None = None
    ) -> bool | None:
        """Take ``lease`` for ``ms`` under ``token``: True when taken (it was free, or held
        under this process's id), False when another process holds it, None when Redis failed
        or did not answer within the timeout (or ``timeout`` when shorter) - the SET may
        still have landed: release ``token`` then."""
        limit = self.timeout if timeout is None else min(self.timeout, timeout)
        try:
            async with asyncio.timeout(limit):
                return bool(await self._acquire(keys=[lease], args=[token, ms, self.owner]))
        except Exception as exc:  # noqa: BLE001 - Redis failing means coalescing locally
            log.debug("fetch lease %s not taken: %r", lease, exc)
            return None

    async def release(self, lease: str, token: str, what: str) -> bool:
        """Delete the lease if ``token`` still holds it, then publish ``what`` for its
        waiters - only if it did (a lease that ran out may be another replica's now, and its
        waiters wait for that one's word). False when Redis failed (the lease then runs out
        by itself)."""
        try:
            async with asyncio.timeout(self.timeout):
                if await self._release(keys=[lease], args=[token]) == 1:
                    await self.client.publish(self.channel, f"{lease} {what}")
        except Exception as exc:  # noqa: BLE001 - the lease expires by itself
            log.debug("fetch lease %s not released: %r", lease, exc)
            return False
        return True

    @contextlib.contextmanager
    def watch(self, lease: str) -> Iterator[LeaseNote]:
        """A note told what the leaseholder of ``lease`` published (registered before the
        caller looks at the lease, so no message after that is missed)."""
        note = LeaseNote()
        self._waiters.setdefault(lease, set()).add(note)
        try:
            yield note
        finally:
            notes = self._waiters.get(lease)
            if notes is not None:
                notes.discard(note)
                if not notes:
                    del self._waiters[lease]

    def _tell(self, data: object) -> None:
        text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
        lease, _, what = text.rpartition(" ")
        for note in self._waiters.get(lease, ()):
            note.tell(what if what in (STORED, UNSTORED) else UNSTORED)

    def _wake_all(self) -> None:
        """The channel was lost: a message may be too, so each waiter looks again (the lease,
        L2) and goes on waiting, on the fallback re-check until the channel is back."""
        for notes in self._waiters.values():
            for note in notes:
                note.tell(LOST)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="tierproxy-fetch-lease-subscriber"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        self.connected = False

    async def _run(self) -> None:
        # Its own small client (a subscribed connection can run nothing else), for whatever
        # Redis topology the tier uses, with its credentials: the tier's subscriber clients.
        clients = self._tier.subscriber(self.timeout)
        loop = asyncio.get_running_loop()
        backoff = SessionBackoff(_BACKOFF_BASE, _BACKOFF_CAP, _STABLE_AFTER)
        try:
            while True:  # until cancelled; each pass waits a bounded, growing backoff
                started = loop.time()
                try:
                    await self._session(clients)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any channel failure means reconnect
                    log.log(
                        logging.WARNING if backoff.attempt == 0 else logging.DEBUG,
                        "fetch-lease channel lost (%r); coalescing per replica until it is back",
                        exc,
                    )
                finally:
                    self.connected = False
                    self._wake_all()
                await asyncio.sleep(backoff.pause(loop.time() - started))
        finally:
            with contextlib.suppress(Exception):
                await clients.aclose()

    async def _session(self, clients: Subscriber) -> None:
        async with asyncio.timeout(self.timeout):
            # On a cluster: a plain connection to one node (PUBLISH reaches every node).
            pubsub, direct = await clients.pubsub_for(self.channel)
        try:
            async with asyncio.timeout(self.timeout):
                await pubsub.subscribe(self.channel)
                for _ in range(100):  # the confirmation comes first; bounded anyway
                    message = await pubsub.get_message(timeout=self.timeout)
                    if message is not None and message.get("type") == "subscribe":
                        break
                else:
                    raise ConnectionError("no subscribe confirmation")
            self.connected = True
            while True:  # until the connection fails or the task is cancelled
                # A PING every few seconds: a dead connection is found, not waited on forever.
                message = await pubsub.get_message(timeout=2.0)
                if message is None:
                    async with asyncio.timeout(self.timeout):
                        await pubsub.ping()
                    continue
                if message.get("type") == "message":
                    self._tell(message.get("data"))
        finally:
            self.connected = False
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
                    if direct is not None:
                        await direct.aclose()
