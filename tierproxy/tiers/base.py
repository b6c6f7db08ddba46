"""The tier interface, and the one wrapper that gives every tier timeouts, a breaker and metrics.

A backend implements ``get``/``set``/``delete``/``close`` and nothing else. Timeouts, the
breaker, error -> miss mapping, corrupt-entry handling and metrics live in :class:`GuardedTier`,
once, so a new tier (memcached, S3) is one small module. Purging by key works for any backend
through ``get``/``set``/``delete``; purging by surrogate key (tag) needs the backend's own tag
index (``purge`` override), and a backend without one reports it as unsupported.

GuardedTier keeps two kinds of failure apart: the tier failing (timeouts, driver and I/O
errors: they count against its breaker) and one entry or request that cannot be encoded
(:class:`codec.Unencodable`: a bug, logged and counted, that request's miss; the tier is fine).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol

from multidict import CIMultiDictProxy

from .. import codec, variants
from ..clock import SYSTEM, Clock
from ..deadlines import LoopTimeout
from ..entry import Entry, Variant
from ..keys import CacheKey
from ..latency import AdaptiveTimeout, NearTimeout

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    from ..metrics import Metrics
    from .purge_log import PurgeLog
    from .redis_clients import Subscriber

__all__ = [
    "MISS_REASON",
    "Answered",
    "Blob",
    "Breaker",
    "BytesBackend",
    "Configured",
    "GuardedTier",
    "LocalTrust",
    "LookupDeadlines",
    "PurgeUnsupported",
    "Replicated",
    "StorageFull",
    "TierBackend",
    "TierLookup",
    "TierUnavailable",
    "decode_unkeyed",
    "lease_clock",
    "mark_stale",
    "mark_stale_encoded",
]

log = logging.getLogger("tierproxy.tiers")

# Variant indexes a purge reads at once (to find the variants of the URLs it purges).
_PURGE_READS = 64

# The least a lookup timer is armed again for after it fired (LookupDeadlines._fire).
_REARM_AFTER = 0.001

# The floor of an estimate kept only for hedging (its timeout is never used).
_DEFAULT_FLOOR = 0.002

#: Why the last lookup in this task (``GuardedTier.get`` / ``get_now``) returned None, for
#: the tier's RFC 9211 ``Cache-Status`` member: ``uri-miss`` (nothing for the key, or only an
#: expired copy), ``vary-miss`` (a copy for other Vary values), ``timeout``, ``error``,
#: ``breaker-open``, ``skipped`` (storage unavailable, no budget left) or ``corrupt``. Read
#: right after the lookup, in the same task (tierproxy.lookups); meaningless after a hit.
MISS_REASON: ContextVar[str] = ContextVar("tierproxy_miss_reason", default="uri-miss")


class Blob:
    """An entry's encoded bytes, encoded at most once however many tiers store it."""

    __slots__ = ("_data", "_entry")

    def __init__(self, entry: Entry) -> None:
        self._entry = entry
        self._data: bytes | None = None

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = codec.encode(self._entry)
        return self._data


_Fingerprint = tuple[float, float, float, int, str | None]


def lease_clock() -> float:
    """The clock purge leases run on: monotonic, and counting time the host spent suspended
    (CLOCK_BOOTTIME, Linux), which CLOCK_MONOTONIC does not - after a VM or laptop resumes, a
    lease that ran out meanwhile must not look held. Elsewhere, the monotonic clock.

    Not the injected :class:`~tierproxy.clock.Clock`, on purpose: a lease is real timing. Its
    end is registered in Redis and compared there with Redis's own clock (a PURGE waits for
    it to run out, and L2 writes are fenced by it), so it must run at the rate real time does.
    """
    return time.clock_gettime(time.CLOCK_BOOTTIME)


if not hasattr(time, "CLOCK_BOOTTIME"):  # pragma: no cover - not Linux
    lease_clock = time.monotonic


class LocalTrust:
    """Whether this replica may serve its local copies (L1, its own L3) as fresh.

    Only with several replicas (Redis): a purge elsewhere reaches this replica's local tiers
    over the purge channel, so while that channel is not confirmed this replica cannot know
    what it missed. Kept by :class:`tierproxy.invalidation.Invalidation`:

    * ``lease_until`` (:func:`lease_clock`): local copies are trusted only before it. It is
      renewed after each confirmation of the channel and registered in Redis, where a PURGE
      waits for this replica's acknowledgement or for this lease to run out. Checked on every
      would-be fresh hit (one clock read), so a replica whose loop stalled past its lease
      cannot answer one from L1 before its subscriber has caught up.
    * ``floor`` (wall clock): an L3 copy stored before it may have missed a purge that can no
      longer be replayed (after a restart, or a gap longer than the purge log keeps). A copy
      is known to be later when its ``Entry.stored_at`` is (never later than the time it was
      written here) or when this process wrote it after the floor rose (remembered for the
      last :data:`MAX_WRITTEN` keys: ``stored_at`` can predate the write by the origin's
      ``Age`` and its one-second ``Date``). L1 needs no floor: it is cleared when it rises.

    An untrusted copy is treated as stale as of now (:func:`mark_stale`): revalidated before it
    is served, still served - flagged stale - if the origin fails and the stale rules allow it,
    and never backfilled anywhere.
    """

    MAX_WRITTEN = 16384

    __slots__ = ("_written", "floor", "lease_until")

    def __init__(self) -> None:
        self.lease_until = -math.inf  # nothing is trusted before the channel is confirmed
        self.floor = 0.0
        self._written: dict[str, _Fingerprint] = {}

    def held(self) -> bool:
        return lease_clock() < self.lease_until

    def raise_floor(self, at: float) -> None:
        if at > self.floor:
            self.floor = at
            self._written.clear()

    def writing(self, material: str, entry: Entry) -> None:
        """This process is writing ``entry`` for ``material`` to a local tier, after the floor
        (a rise of the floor forgets it). Noted before the write begins, so a lookup that finds
        the copy as soon as it lands trusts it; it names that very copy (:func:`_fingerprint`),
        so an older copy under the key stays untrusted even if the write fails."""
        written = self._written
        written.pop(material, None)
        written[material] = _fingerprint(entry)
        if len(written) > self.MAX_WRITTEN:
            del written[next(iter(written))]

    def stored_after_floor(self, material: str, entry: Entry) -> bool:
        return entry.stored_at >= self.floor or self._written.get(material) == _fingerprint(entry)


def _fingerprint(entry: Entry) -> _Fingerprint:
    """What tells one stored response of a key from another (origin time, lifetimes, size,
    validator) without reading its body."""
    return (entry.stored_at, entry.fresh_until, entry.expires_at, len(entry.body), entry.etag)


class PurgeUnsupported(Exception):
    """The backend cannot do this kind of purge (e.g. it keeps no tag index)."""


class TierUnavailable(Exception):
    """The backend's storage cannot be used now (e.g. the L3 file is being reopened): the
    operation is skipped, not counted as a failure of the tier."""


class StorageFull(Exception):
    """A write found no room (disk full) even after the backend tried to make some: the
    write is skipped and counted; reads of what is stored go on."""


def mark_stale(entry: Entry, at: float) -> Entry | None:
    """A soft purge: the entry stops being fresh at ``at`` (and gets no stale-while-revalidate
    window after it), but keeps its validators and its stale-if-error limit, so the next
    request revalidates and an origin failure can still be answered with it.
    None when the entry is already stale by then (nothing to change)."""
    if entry.fresh_until <= at and entry.swr_until <= at:
        return None
    return dataclasses.replace(
        entry, fresh_until=min(entry.fresh_until, at), swr_until=min(entry.swr_until, at)
    )


def mark_stale_encoded(
    data: bytes, material: str | None, digest: str, namespace: str, at: float
) -> bytes | None:
    """A soft purge of an encoded entry (L2, L3): the entry re-encoded as :func:`mark_stale`
    leaves it, or None when there is nothing to change - it is already stale by then, or it
    cannot be decoded (a lookup will find and delete it). ``material`` is the key material
    when the entry was found by key; None when only its ``digest`` is known (a tag index)."""
    try:
        entry = (
            codec.decode(data, material)
            if material is not None
            else decode_unkeyed(data, digest, namespace)
        )
    except codec.CorruptEntry:
        return None
    marked = mark_stale(entry, at)
    return None if marked is None else codec.encode(marked)


def decode_unkeyed(data: bytes, digest: str, namespace: str) -> Entry:
    """Decode an entry found through an index that holds only its digest (tag purges).

    The key material is read from the entry and, in ``namespace`` (this process's
    :class:`~tierproxy.keys.KeySpace`), must hash to ``digest``; everything else is checked by
    :func:`codec.decode` as for a keyed lookup.
    """
    fields = codec.unpack(data)
    material = fields[1] if isinstance(fields, tuple) and len(fields) > 1 else None
    if not isinstance(material, str) or CacheKey(material, namespace).digest != digest:
        raise codec.CorruptEntry("entry does not belong to this digest")
    return codec.decode(data, material)


def _record_key(key: CacheKey, vid: str) -> CacheKey:
    """The key of one variant's record of the URL ``key``."""
    return CacheKey(variants.variant_material(key.material, vid), key.namespace)


def _index_entry(material: str, listed: tuple[Variant, ...], now: float) -> Entry:
    """A URL's variant index: no response of its own, kept while a variant it lists is."""
    return Entry(
        key=material,
        status=200,
        headers=(),
        body=b"",
        stored_at=now,
        fresh_until=now,
        stale_until=now,
        swr_until=now,
        expires_at=max(variant.expires_at for variant in listed),
        variants=listed,
    )


class Replicated(Protocol):
    """What the replicas' purge fan-out (:mod:`tierproxy.invalidation`) needs from the tier
    every replica shares (Redis): its purge log and channel, and fencing its writes by this
    replica's purge lease."""

    def purge_log(self, client: Redis | RedisCluster | None = None) -> PurgeLog: ...

    def fence(self, replica_id: str) -> None: ...

    def subscriber(self, socket_timeout: float) -> Subscriber: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Configured:
    """A backend the settings enable, with its lookup and write budgets (each backend
    module's ``configured(settings, metrics, keys, *, clock)``; see tierproxy.tiers)."""

    backend: TierBackend
    read_timeout: float
    write_timeout: float


class TierBackend(ABC):
    """A storage backend. Errors propagate; GuardedTier turns them into misses."""

    name: str
    #: True when ``get_now`` answers without awaiting (memory): no timeout needed.
    synchronous: bool = False
    #: True when every replica reads the same storage (Redis): a purge message from another
    #: replica need not be applied to it again. Local tiers (memory, a per-host SQLite file)
    #: apply every purge they hear about.
    shared: bool = False
    #: False while the backend's storage cannot be used at all (it says why in its log and
    #: recovers by itself): lookups and writes are skipped, readiness says ``unavailable``.
    available: bool = True

    def storage_present(self) -> bool:
        """For readiness (not the request path): False when the backend can tell its storage
        is gone even before ``available`` says so (e.g. the L3 file was deleted)."""
        return True

    def get_now(self, key: CacheKey) -> Entry | None:
        raise NotImplementedError

    def set_now(self, key: CacheKey, entry: Entry) -> bool:
        raise NotImplementedError

    def remove_now(self, key: CacheKey) -> bool:
        raise NotImplementedError

    def lookups_soon(self) -> bool:
        """Whether a lookup can start now with no task: the backend is a
        :class:`BytesBackend` whose :meth:`~BytesBackend.get_bytes_soon` gives a future
        (:meth:`GuardedTier.lookup_soon`). False: lookups await :meth:`get`."""
        return False

    @abstractmethod
    async def get(self, key: CacheKey) -> Entry | None: ...

    @abstractmethod
    async def set(self, key: CacheKey, entry: Entry, blob: Blob) -> None: ...

    @abstractmethod
    async def delete(self, key: CacheKey) -> bool: ...

    async def open(self) -> None:
        """Connect / create schema; called once before the first request."""

    async def ping(self) -> bool:
        """Whether the storage answers now (a start-up check; the request path never pings)."""
        return True

    def clear(self) -> int:
        """Drop every entry at once (a local tier that may have missed purges); how many."""
        raise NotImplementedError

    def watch(self, metrics: Metrics) -> None:
        """Register the backend's own gauges (read at scrape time); none by default."""

    def replicated(self) -> Replicated | None:
        """The replicas' purge log this backend carries (a shared tier: Redis), else None."""
        return None

    def write_may_land(self, key: CacheKey) -> bool:
        """Whether a write of ``key`` that failed may still land later (it got no reply, and
        a delete sent now would not be ordered after it). None by default: SQLite runs its
        statements in order on one writer thread."""
        return False

    async def purge(
        self, keys: Sequence[CacheKey], tags: Sequence[str], soft_at: float | None
    ) -> int:
        """Remove the entries for ``keys`` and ``tags``; with ``soft_at``, mark them stale as of
        that wall-clock time instead (see :func:`mark_stale`). Returns how many entries changed.

        This default handles keys through ``get``/``set``/``delete``; tags need an index.
        """
        if tags:
            raise PurgeUnsupported(f"{self.name} keeps no surrogate-key index")
        changed = 0
        for key in keys:
            if soft_at is None:
                changed += bool(await self.delete(key))
                continue
            entry = await self.get(key)
            marked = mark_stale(entry, soft_at) if entry is not None else None
            if marked is not None:
                await self.set(key, marked, Blob(marked))
                changed += 1
        return changed

    @abstractmethod
    async def close(self) -> None: ...


class BytesBackend(TierBackend):
    """A backend that stores encoded entries; decoding and corrupt-entry handling live here."""

    @abstractmethod
    async def get_bytes(self, key: CacheKey) -> bytes | None: ...

    def get_bytes_soon(self, key: CacheKey) -> asyncio.Future[bytes | None]:
        """``get_bytes`` started now, its outcome a future, for a backend whose
        :meth:`lookups_soon` is true. Cancelling the future abandons the read (its answer is
        dropped). May raise at once what ``get_bytes`` would."""
        raise NotImplementedError

    async def get(self, key: CacheKey) -> Entry | None:
        data = await self.get_bytes(key)
        if data is None:
            return None
        try:
            return self.decoded(key, data)
        except codec.CorruptEntry:
            await self.delete(key)
            raise

    def decoded(self, key: CacheKey, data: bytes) -> Entry:
        """``data``, read for ``key``, decoded; a corrupt record is logged (the caller
        deletes it) and raises :class:`codec.CorruptEntry`."""
        try:
            return codec.decode(data, key.material)
        except codec.CorruptEntry as exc:
            log.warning(
                "corrupt entry in %s for %r (%s): deleted, treated as a miss",
                self.name,
                key.material[:200],
                exc,
            )
            raise


class Breaker:
    """Consecutive-failure circuit breaker: closed -> open -> (cooldown) -> one probe -> closed.

    Cool-downs run on the clock's monotonic reading; never crosses processes.
    """

    __slots__ = (
        "clock",
        "cooldown",
        "failures",
        "failures_to_open",
        "opened_at",
        "probation",
        "probe_at",
        "probing",
    )

    def __init__(self, failures_to_open: int, cooldown: float, *, clock: Clock = SYSTEM) -> None:
        self.clock = clock
        self.failures_to_open = failures_to_open
        self.cooldown = cooldown
        self.failures = 0
        self.opened_at: float | None = None
        self.probing = False
        # Closed by a background probe, not yet confirmed by a real operation: the first
        # failure reopens it at once (a tier whose PING answers while its lookups fail must
        # not cost BREAKER_FAILURES failed lookups per probe).
        self.probation = False
        self.probe_at = 0.0

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        now = self.clock.monotonic()
        if now - self.opened_at < self.cooldown:
            return False
        # A probe that never reported (its request was cancelled mid-call) must not keep the
        # breaker half-open for ever: after another cooldown, the next request probes instead.
        if self.probing and now - self.probe_at < self.cooldown:
            return False
        self.probing = True  # half-open: one request at a time finds out whether it is back
        self.probe_at = now
        return True

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.probing = False
        self.probation = False

    def close_after_probe(self) -> None:
        """A background probe answered: closed now, on probation until an operation succeeds."""
        self.success()
        self.probation = True

    def rearm(self) -> None:
        """A background probe found the tier still down: the cool-down starts again, so no
        request is let through as the half-open probe while the probes keep failing."""
        if self.opened_at is not None and not self.probing:
            self.opened_at = self.clock.monotonic()

    def failure(self) -> None:
        self.failures += 1
        self.probing = False
        if self.probation or self.opened_at is not None or self.failures >= self.failures_to_open:
            self.probation = False
            self.opened_at = self.clock.monotonic()

    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.probing else "open"

    def health(self) -> str:
        """Readiness state: ``up``, ``degraded`` (recent failures, breaker still closed) or
        ``breaker-open`` (open or probing)."""
        if self.opened_at is not None:
            return "breaker-open"
        return "degraded" if self.failures else "up"


#: Where a lookup's outcome goes (:meth:`GuardedTier.lookup_soon`): the copy and "", or None
#: and why (a :data:`MISS_REASON` value).
Answered = Callable[["Entry | None", str], object]


def _ignore(entry: Entry | None, why: str) -> None:
    """Where a lookup's outcome goes once it is over (nowhere: it was given already)."""


def _resolve(
    future: asyncio.Future[tuple[Entry | None, str]], entry: Entry | None, why: str
) -> None:
    if not future.done():
        future.set_result((entry, why))


class LookupDeadlines:
    """The timeouts of one tier's lookups in flight (:class:`TierLookup`), on one loop timer.

    A timer per lookup costs a timer handle created and cancelled per lookup (about 3 us on
    uvloop, where a hit costs tens). A tier's lookups mostly share one timeout, so their
    deadlines arrive in the order they began: they wait in a FIFO, and one timer is armed,
    for the oldest deadline; when it fires, every lookup past its deadline times out and the
    timer is armed again for the next. A lookup that ends first is only marked over and
    dropped when it reaches the front. A deadline earlier than the last one queued (the
    request's deadline cut the budget, or the learned timeout went down) gets a timer of its
    own, so no lookup ever times out late. Bounded by the lookups begun within one timeout.
    """

    __slots__ = ("_armed_at", "_loop", "_queue", "_timer")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: collections.deque[tuple[float, TierLookup]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = math.inf  # when the timer fires

    def add(
        self, lookup: TierLookup, at: float, loop: asyncio.AbstractEventLoop
    ) -> asyncio.TimerHandle | None:
        """Time ``lookup`` out at ``at`` (loop time); returns the lookup's own timer when it
        needs one (cancel it when the lookup ends), else None."""
        queue = self._queue
        if loop is not self._loop:  # (a new loop: what the old one held can never fire)
            self._loop = loop
            queue.clear()
            self._timer = None
        while queue and queue[0][1].over:
            queue.popleft()
        if queue and at < queue[-1][0]:
            return loop.call_at(at, lookup.timed_out)
        queue.append((at, lookup))
        timer = self._timer
        if timer is None or at < self._armed_at:
            # (armed for a lookup over and gone, later than this one: armed again for this)
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(at, self._fire)
            self._armed_at = at
        return None

    def _fire(self) -> None:
        self._timer = None
        self._armed_at = math.inf
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        queue = self._queue
        due: list[TierLookup] = []
        while queue:
            at, lookup = queue[0]
            if lookup.over:
                queue.popleft()
            elif at <= now:
                queue.popleft()
                due.append(lookup)
            else:
                # Armed for the next one before any lookup's callbacks run (they may start
                # lookups on this tier: add() then sees the timer as it is). At least 1 ms
                # on: uvloop's clock has ms resolution and fires a timer up to half a ms
                # early, so a nearer deadline would make the loop spin until its ms ticks
                # (a timeout is never early, at most a ms late).
                when = max(at, now + _REARM_AFTER)
                self._timer = loop.call_at(when, self._fire)
                self._armed_at = when
                break
        for lookup in due:
            try:
                lookup.timed_out()
            except Exception:  # (a bug downstream must not strand the others' timeouts)
                log.exception("a lookup's timeout failed")

    @property
    def waiting(self) -> int:
        """Lookups queued (some may be over, dropped when they reach the front)."""
        return len(self._queue)


class TierLookup:
    """One lookup of a tier in flight with no task of its own (:meth:`GuardedTier.lookup_soon`):
    the backend's read is a future, the timeout a timer on the loop, and the outcome - counted
    by the tier exactly as :meth:`GuardedTier.get` counts it - goes to a callback. A URL that
    varies takes a second read (its index, then the chosen variant's record); a corrupt record
    is deleted before the lookup ends, as :meth:`BytesBackend.get` does it."""

    __slots__ = (
        "_answered",
        "_backend",
        "_headers",
        "_key",
        "_learned",
        "_loop",
        "_pending",
        "_started",
        "_tier",
        "_timeout",
        "_timer",
        "_varied",
        "over",
    )

    def __init__(
        self,
        tier: GuardedTier,
        key: CacheKey,
        headers: CIMultiDictProxy[str] | None,
        answered: Answered,
        timeout: float,
        learned: bool,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._tier = tier
        # (only a BytesBackend looks up soon; an annotation, not typing.cast: no call per lookup)
        self._backend: BytesBackend = tier.backend  # type: ignore[assignment]
        self._key = key
        self._headers = headers
        self._answered = answered
        self._timeout = timeout
        self._learned = learned
        self._loop = loop
        self._varied = False
        self._pending: asyncio.Future[Any] | None = None
        self._started = time.perf_counter()
        #: The outcome went to the callback, or the caller gave up: nothing more happens.
        self.over = False
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Send the read, its timeout on the tier's timer (:class:`LookupDeadlines`)."""
        loop = self._loop
        self._timer = self._tier.deadlines.add(self, loop.time() + self._timeout, loop)
        self._read(self._key)

    def start_awaited(self) -> None:
        """For a backend that only awaits (:meth:`TierBackend.lookups_soon` false: redis-py
        under TLS, Sentinel or Cluster, or the L2 reader while it reconnects): the whole
        :meth:`GuardedTier.get` - its checks, timeout and counting - in a task of its own."""
        tier = self._tier
        pending = self._loop.create_task(
            tier.get_with_reason(self._key, self._timeout, self._headers, self._loop)
        )
        self._pending = pending
        pending.add_done_callback(self._awaited)

    def _awaited(self, pending: asyncio.Future[tuple[Entry | None, str]]) -> None:
        if self.over or pending is not self._pending:
            return
        self._pending = None
        entry: Entry | None = None
        why = "error"  # (get() never raises; a bug in it is a miss, as a lookup's error is)
        if not pending.cancelled():
            failure = pending.exception()
            if failure is None:
                entry, why = pending.result()
            else:
                log.error("%s lookup failed", self._tier.name, exc_info=failure)
        answered = self._end()
        answered(entry, why)

    def cancel(self) -> None:
        """The caller gave up (a client gone): nothing is known about the tier - no failure,
        no latency sample, no outcome, and no answer. A probe that never reported must not
        keep the breaker half-open: the next lookup may probe."""
        if not self.over:
            self._tier.breaker.probing = False
            self._end()

    def _read(self, key: CacheKey) -> None:
        try:
            pending = self._backend.get_bytes_soon(key)
        except Exception as exc:  # noqa: BLE001 - a broken tier is a miss, whatever it raised
            self._fail(exc)
            return
        self._pending = pending
        pending.add_done_callback(self._got)

    def _got(self, pending: asyncio.Future[bytes | None]) -> None:
        if self.over or pending is not self._pending:
            return
        self._pending = None
        if pending.cancelled():
            self._fail(TierUnavailable(f"{self._tier.name} read abandoned"))
            return
        failure = pending.exception()
        if failure is not None:
            self._fail(failure)
            return
        data = pending.result()
        entry: Entry | None = None
        if data is not None:
            try:
                entry = self._backend.decoded(self._key, data)
            except codec.CorruptEntry as exc:
                self._drop_corrupt(exc)
                return
            except Exception as exc:  # noqa: BLE001 - as get(): a miss, counted as an error
                self._fail(exc)
                return
        if entry is not None and entry.variants and not self._varied:
            self._varied = True
            # A URL that varies: its index, then the chosen variant's own record.
            headers = self._headers
            chosen = variants.select(entry.variants, headers) if headers else None
            if chosen is not None:
                self._key = _record_key(self._key, chosen.vid)
                self._read(self._key)
                return
            entry = None
        found, why = self._tier._looked_up(
            self._key, entry, self._headers, self._started, self._timeout, self._varied
        )
        answered = self._end()
        answered(found, why)

    def _drop_corrupt(self, corrupt: codec.CorruptEntry) -> None:
        deleting = self._loop.create_task(self._backend.delete(self._key))
        self._pending = deleting
        deleting.add_done_callback(lambda task: self._dropped(task, corrupt))

    def _dropped(self, deleting: asyncio.Future[Any], corrupt: codec.CorruptEntry) -> None:
        if self.over or deleting is not self._pending:
            return
        self._pending = None
        failure = None if deleting.cancelled() else deleting.exception()
        self._fail(failure if failure is not None else corrupt)

    def timed_out(self) -> None:
        """The lookup's timeout passed (:class:`LookupDeadlines`)."""
        if self.over:
            return
        answered = self._end()
        answered(
            None, self._tier._timed_out(self._key, self._started, self._timeout, self._learned)
        )

    def _fail(self, failure: BaseException) -> None:
        tier = self._tier
        if isinstance(failure, TimeoutError):  # (a backend's own deadline: L3's)
            why = tier._timed_out(self._key, self._started, self._timeout, self._learned)
        else:
            if not isinstance(failure, Exception):
                failure = RuntimeError(f"lookup failed: {failure!r}")
            why = tier._failed(self._key, failure, self._started, self._timeout)
        answered = self._end()
        answered(None, why)

    def _end(self) -> Answered:
        """Over: the timer and the read in flight let go, and what the lookup held of its
        request released (it may wait in the tier's deadline queue a while); returns where
        the outcome goes."""
        self.over = True
        if self._timer is not None:
            self._timer.cancel()
        pending = self._pending
        if pending is not None:
            self._pending = None
            pending.cancel()  # an L2 reply or L3 row still due is dropped when it comes
        answered, self._answered = self._answered, _ignore
        self._headers = None
        return answered


class GuardedTier:
    """A backend under read/write timeouts and breakers; every outcome is counted.

    Reads and writes have separate breakers: a tier that cannot take writes (a full disk)
    keeps serving what it holds, so a failed write never stops lookups. ``breaker`` is the
    lookups' one; ``write_breaker`` (same threshold and cool-down) guards set/delete/purge.

    With ``adaptive_floor`` (``TIERPROXY_ADAPTIVE_TIMEOUTS=on``), lookups time out at
    :attr:`lookup_timeout`, learned from their recent latencies between that floor and
    ``read_timeout`` (:class:`tierproxy.latency.AdaptiveTimeout`); writes, deletes and purges
    keep their configured timeouts. Every operation that completes but uses more than 80% of
    its timeout is counted (:class:`tierproxy.latency.NearTimeout`). With ``estimate``
    (``TIERPROXY_HEDGE=on``) the same estimate is kept, for :attr:`hedge_after`, even when
    the timeout stays the configured one. A lookup cancelled by its caller is no outcome of
    the tier: no breaker failure, no latency sample, not counted.
    """

    def __init__(
        self,
        backend: TierBackend,
        read_timeout: float,
        write_timeout: float,
        breaker: Breaker,
        metrics: Metrics,
        *,
        clock: Clock = SYSTEM,
        adaptive_floor: float | None = None,
        estimate: bool = False,
        max_variants: int = 32,
    ) -> None:
        self.backend = backend
        #: Variants kept per URL that varies (TIERPROXY_MAX_VARIANTS), least recently used out.
        self.max_variants = max_variants
        # One update of a URL's variant index at a time in this process (read, change, write):
        # a lock per URL while one is being written, gone when none waits (bounded by them).
        self._index_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self.clock = clock
        self.name = backend.name
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.breaker = breaker
        self.write_breaker = Breaker(
            breaker.failures_to_open, breaker.cooldown, clock=breaker.clock
        )
        self.metrics = metrics
        self.synchronous = backend.synchronous
        #: Set on local tiers when replicas share Redis (see :class:`LocalTrust`); None = this
        #: tier's copies are always trusted (a shared tier, or a single replica).
        self.trust: LocalTrust | None = None
        self._lookup = metrics.tier_lookup_counters(self.name)
        self._latency = metrics.tier_latency(self.name)
        #: The lookups' latency estimate, kept with adaptive timeouts (``adaptive_floor``) or
        #: hedged lookups (``estimate``); None otherwise. Not for a synchronous tier (memory:
        #: nothing to time out, nothing to hedge).
        self.estimator: AdaptiveTimeout | None = (
            AdaptiveTimeout(
                read_timeout,
                min(_DEFAULT_FLOOR if adaptive_floor is None else adaptive_floor, read_timeout),
            )
            if (adaptive_floor is not None or estimate) and not self.synchronous
            else None
        )
        #: The lookups' learned timeout (the estimator, used as the timeout); None = fixed at
        #: ``read_timeout``.
        self.adaptive: AdaptiveTimeout | None = (
            self.estimator if adaptive_floor is not None else None
        )
        self.near_timeout = NearTimeout(self.name, metrics, clock)
        #: The timeouts of the lookups in flight (:meth:`lookup_soon`), on one timer.
        self.deadlines = LookupDeadlines()
        # When the last lookup that timed out at a learned timeout and counted against the
        # breaker ended (perf_counter): one that began before it was in flight with it.
        self._timeout_counted_at = -math.inf

    def _classify(
        self, key: CacheKey, entry: Entry | None, headers: CIMultiDictProxy[str] | None
    ) -> tuple[Entry | None, str]:
        """Count one lookup as hit, stale or miss; a copy for other Vary values is a miss.
        The copy and "", or None and why (a :data:`MISS_REASON` value).

        A copy this replica may not trust (:class:`LocalTrust`) is returned stale as of now.
        """
        if entry is not None:
            now = self.clock.wall()
            if now < entry.expires_at and (
                not entry.vary or (headers is not None and variants.entry_matches(entry, headers))
            ):
                trust = self.trust
                if (
                    trust is not None
                    and (now < entry.fresh_until or now < entry.swr_until)
                    and (
                        not trust.held()
                        or (
                            not self.synchronous
                            and not trust.stored_after_floor(key.material, entry)
                        )
                    )
                ):
                    entry = mark_stale(entry, now) or entry
                self._lookup["hit" if now < entry.fresh_until else "stale"].inc()
                return entry, ""
            why = "vary-miss" if now < entry.expires_at else "uri-miss"
        else:
            why = "uri-miss"
        self._lookup["miss"].inc()
        return None, why

    @property
    def lookup_timeout(self) -> float:
        """The timeout a lookup gets now (before the request's deadline cuts it): learned
        (``TIERPROXY_ADAPTIVE_TIMEOUTS=on``) or the configured read timeout."""
        adaptive = self.adaptive
        return self.read_timeout if adaptive is None else adaptive.current

    @property
    def hedge_after(self) -> float | None:
        """How long a lookup may take before a hedged lookup asks the next tier too: the
        recent p95 of this tier's lookups; None while there is no warm estimate."""
        estimator = self.estimator
        return None if estimator is None else estimator.p95

    @property
    def shared(self) -> bool:
        """Every replica reads this tier's storage (see :attr:`TierBackend.shared`)."""
        return self.backend.shared

    async def open(self) -> None:
        """Open the backend (connect, create its schema); once, before the first request."""
        await self.backend.open()

    async def ping(self, timeout: float) -> bool:
        """Whether the tier answers within ``timeout`` (a start-up check). Raises what the
        backend raised, TimeoutError included: the caller logs why."""
        async with asyncio.timeout(timeout):
            return await self.backend.ping()

    def probe_due(self) -> bool:
        """Whether a background probe would help: the lookups' breaker is open and the
        storage is there to ask (an unavailable L3 file is reopened by its backend)."""
        return self.breaker.is_open and self.backend.available

    async def probe(self) -> str:
        """One background health probe (:mod:`tierproxy.probes`) while the lookups' breaker
        is open: the backend's ``ping`` under the configured read timeout. When it answers,
        the breaker closes at once (said once in the log), so no client request pays for
        finding out - on probation: the first lookup that fails reopens it. When it does not,
        the breaker's cool-down starts again (:meth:`Breaker.rearm`). With adaptive
        timeouts, an answer in ``L`` seconds lifts the learned lookup timeout to at least
        ``1.5 * L`` (:meth:`AdaptiveTimeout.observe_probe`; a slow answer is checked by a
        second ping, the faster one counts), so a tier that slowed down is not locked below
        its latency. Returns the outcome,
        counted in ``tierproxy_tier_probes_total``: ``ok``, ``failed`` (answered no),
        ``timeout``, ``error`` or ``skipped`` (the storage is unavailable, e.g. the L3 file
        being reopened)."""
        outcome, took, failure = await self._ping_timed()
        adaptive = self.adaptive
        if outcome == "ok" and adaptive is not None:
            # The probe's answer lifts a learned timeout it would not fit in (a tier that
            # slowed down must not stay locked below its latency; tierproxy.latency). A late
            # answer may only be a PING that waited out a freeze that just ended: asked again
            # at once, the faster answer is the tier's latency.
            if took * 1.5 > adaptive.current:
                again, retook, failure = await self._ping_timed()
                if again == "ok":
                    took = min(took, retook)
                else:
                    outcome = again
            if outcome == "ok":
                adaptive.observe_probe(took)
        self.metrics.tier_probes.labels(self.name, outcome).inc()
        if outcome == "ok" and self.breaker.is_open:
            # Closed, on probation: a probe's PING is not a lookup, so the first lookup that
            # fails again reopens it at once (Breaker.close_after_probe).
            self.breaker.close_after_probe()
            log.warning(
                "%s breaker closed: a background probe answered in %.1f ms",
                self.name,
                took * 1000,
            )
        else:
            if outcome != "skipped":
                self.breaker.rearm()
            log.debug("%s probe: %s %r", self.name, outcome, failure)
        return outcome

    async def _ping_timed(self) -> tuple[str, float, BaseException | None]:
        """The backend's ``ping`` under the configured read timeout: outcome (see
        :meth:`probe`), seconds taken, what it raised."""
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            async with asyncio.timeout(self.read_timeout):
                outcome = "ok" if await self.backend.ping() else "failed"
        except TimeoutError:
            outcome = "timeout"
        except TierUnavailable:
            outcome = "skipped"
        except Exception as exc:  # noqa: BLE001 - a probe that fails is an outcome, not an error
            outcome, failure = "error", exc
        return outcome, time.perf_counter() - started, failure

    def watch(self, metrics: Metrics) -> None:
        """Register the backend's own gauges (L1/L3 size) with ``metrics``."""
        self.backend.watch(metrics)

    def replicated(self) -> Replicated | None:
        """The replicas' purge log and write fencing, when this tier carries them (Redis)."""
        return self.backend.replicated()

    def write_may_land(self, key: CacheKey) -> bool:
        """Whether a failed write of ``key`` may still land (see the backend's)."""
        return self.backend.write_may_land(key)

    # ---- the synchronous fast path (a tier with ``synchronous``: memory) ----------------

    def set_now(self, key: CacheKey, entry: Entry) -> bool:
        """Store ``entry`` now (a backfill into memory: nothing to time out); a variant as
        :meth:`set` stores one."""
        backend = self.backend
        if not entry.vary:
            return backend.set_now(key, entry)
        record_key = _record_key(key, variants.variant_id(entry.vary))
        if entry.key != record_key.material:
            entry = dataclasses.replace(entry, key=record_key.material)
        current = backend.get_now(key)
        now = self.clock.wall()
        listed = current.variants if current is not None else ()
        kept, dropped = variants.remember(
            listed, variants.variant_of(entry), self.max_variants, now
        )
        if not backend.set_now(record_key, entry):
            return False
        backend.set_now(key, _index_entry(key.material, kept, now))
        for variant in dropped:
            backend.remove_now(_record_key(key, variant.vid))
        return True

    def remove_now(self, key: CacheKey) -> bool:
        """Remove ``key`` now (an invalidation's first step, in memory), every variant too."""
        backend = self.backend
        current = backend.get_now(key)
        removed = backend.remove_now(key)
        for variant in current.variants if current is not None else ():
            removed = backend.remove_now(_record_key(key, variant.vid)) or removed
        return removed

    def clear(self) -> int:
        """Drop every entry now (a local tier that may have missed purges); how many."""
        return self.backend.clear()

    def get_now(self, key: CacheKey, headers: CIMultiDictProxy[str] | None = None) -> Entry | None:
        """Synchronous lookup for in-memory tiers: nothing to time out, nothing to break.

        Returns only a copy usable for ``headers`` (its Vary values match) and not expired.
        """
        started = time.perf_counter()
        entry = self.backend.get_now(key)
        varied = entry is not None and bool(entry.variants)
        if entry is not None and varied:
            key, entry = self._variant_now(key, entry, headers)
        self._latency["get"].observe(time.perf_counter() - started)
        found, why = self._classify(key, entry, headers)
        if found is None:
            # (an index with no variant for these headers: a vary-miss)
            MISS_REASON.set("vary-miss" if varied else why)
        return found

    def _variant_now(
        self, key: CacheKey, index: Entry, headers: CIMultiDictProxy[str] | None
    ) -> tuple[CacheKey, Entry | None]:
        """The variant ``index`` lists for ``headers``, read now (memory), made its URL's most
        recently used; (its record's key, its record or None)."""
        chosen = variants.select(index.variants, headers) if headers is not None else None
        if chosen is None:
            return key, None
        record_key = _record_key(key, chosen.vid)
        entry = self.backend.get_now(record_key)
        if entry is not None:
            touched = variants.touch(index.variants, chosen.vid)
            if touched is not None:
                self.backend.set_now(key, dataclasses.replace(index, variants=touched))
        return record_key, entry

    def peek_fresh(self, key: CacheKey, headers: CIMultiDictProxy[str], now: float) -> Entry | None:
        """A fresh copy usable for ``headers``, else None; counts nothing.

        For the connection handler's hit path (:mod:`tierproxy.hits`): when it answers with
        the copy it calls :meth:`count_hit`; otherwise the request takes the full path, whose
        :meth:`get_now` counts that lookup once.
        """
        entry = self.backend.get_now(key)
        if entry is not None and entry.variants:
            entry = self._variant_now(key, entry, headers)[1]
        if (
            entry is None
            or now >= entry.fresh_until
            or (entry.vary and not variants.entry_matches(entry, headers))
        ):
            return None
        trust = self.trust
        if trust is not None and lease_clock() >= trust.lease_until:
            return None  # the full path revalidates it (see LocalTrust)
        return entry

    def count_hit(self, seconds: float) -> None:
        """Count one lookup answered from :meth:`peek_fresh`, which took ``seconds``."""
        self._latency["get"].observe(seconds)
        self._lookup["hit"].inc()

    async def get(
        self,
        key: CacheKey,
        budget: float,
        headers: CIMultiDictProxy[str] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Entry | None:
        """Look ``key`` up within ``budget`` seconds; any failure is a miss, never an error.

        Like :meth:`get_now`, returns only a copy usable for ``headers``; why there is none
        is left in :data:`MISS_REASON`. ``loop``: the running loop, when the caller holds it
        (spares a system call on Python 3.11, see :mod:`tierproxy.deadlines`).

        A backend that looks up through futures (:meth:`BytesBackend.get_bytes_soon`) is
        asked as :meth:`lookup_soon` asks it - the same lookup, awaited here.
        """
        if loop is None:
            loop = asyncio.get_running_loop()
        if self.backend.lookups_soon():
            answered: asyncio.Future[tuple[Entry | None, str]] = loop.create_future()
            lookup = self.lookup_soon(
                key, budget, headers, loop, functools.partial(_resolve, answered)
            )
            try:
                entry, why = await answered
            except asyncio.CancelledError:
                if lookup is not None:
                    lookup.cancel()
                raise
            if entry is None:
                MISS_REASON.set(why)
            return entry
        return await self._get_awaited(key, budget, headers, loop)

    def lookup_soon(
        self,
        key: CacheKey,
        budget: float,
        headers: CIMultiDictProxy[str] | None,
        loop: asyncio.AbstractEventLoop,
        answered: Answered,
    ) -> TierLookup | None:
        """Start looking ``key`` up within ``budget`` seconds, with no task: ``answered``
        gets ``(copy, "")`` or ``(None, why)`` (a :data:`MISS_REASON` value), once - at once
        when the tier is skipped. Returns the lookup in flight (cancel it when its caller
        gives up: no outcome is counted), or None when it was answered at once.

        The outcomes, metrics, breaker and timeouts are those of :meth:`get`. A backend whose
        :meth:`~TierBackend.lookups_soon` is false now is awaited in a task instead
        (:meth:`TierLookup.start_awaited`)."""
        if not self.backend.lookups_soon():
            # (its timeout is get()'s own, within ``budget``)
            awaited = TierLookup(self, key, headers, answered, budget, False, loop)
            awaited.start_awaited()
            return awaited
        why = self._skipped(budget)
        if why is not None:
            answered(None, why)
            return None
        timeout, learned = self._timeout_for(budget)
        lookup = TierLookup(self, key, headers, answered, timeout, learned, loop)
        lookup.start()
        return None if lookup.over else lookup

    def _skipped(self, budget: float) -> str | None:
        """Why a lookup is not sent at all (counted as skipped), or None: send it."""
        if not self.backend.available or not self.breaker.allow():
            self._lookup["skipped"].inc()
            return "skipped" if not self.backend.available else "breaker-open"
        if budget <= 0:
            self.breaker.probing = False
            self._lookup["skipped"].inc()
            return "skipped"
        return None

    def _timeout_for(self, budget: float) -> tuple[float, bool]:
        """A lookup's timeout within ``budget`` (already at most the configured timeout; the
        learned one may be less), and whether it is the learned one."""
        adaptive = self.adaptive
        if adaptive is not None and adaptive.current <= budget:
            return adaptive.current, True
        return budget, False

    def _looked_up(
        self,
        key: CacheKey,
        entry: Entry | None,
        headers: CIMultiDictProxy[str] | None,
        started: float,
        timeout: float,
        varied: bool,
    ) -> tuple[Entry | None, str]:
        """A lookup the tier answered (``entry``, None for nothing there): counted, then
        classified for ``headers``; the copy, or None and why."""
        elapsed = time.perf_counter() - started
        self._latency["get"].observe(elapsed)
        estimator = self.estimator
        if estimator is not None:
            estimator.observe(elapsed)
        self.near_timeout.observe(elapsed, timeout)
        self.breaker.success()
        found, why = self._classify(key, entry, headers)
        if found is None and varied:
            why = "vary-miss"  # the URL's index, but no variant for these headers
        return found, why

    def _timed_out(self, key: CacheKey, started: float, timeout: float, learned: bool) -> str:
        """A lookup that took its whole ``timeout``: counted; why it found nothing."""
        # Only a timeout the estimate gave feeds the estimate; one the request's deadline
        # cut short is not the tier's latency (it still counts against the breaker, as a
        # fixed timeout always has). Lookups that timed out together at a learned timeout
        # are one failure of the tier, not one each: only a lookup that began after the
        # last counted timeout ended counts, so a stall of the loop that times out every
        # lookup in flight must not open the breaker, while a frozen tier opens it after
        # BREAKER_FAILURES lookups that each waited the learned timeout.
        adaptive, estimator = self.adaptive, self.estimator
        if learned and adaptive is not None:
            adaptive.observe_timeout(timeout)
            if started < self._timeout_counted_at:
                self.breaker.probing = False
                self._lookup["timeout"].inc()
                return "timeout"
            self._timeout_counted_at = time.perf_counter()
        elif adaptive is None and estimator is not None and timeout >= self.read_timeout:
            estimator.sample(timeout)  # the configured timeout, not the deadline's cut
        self._fail("timeout", key, "get")
        return "timeout"

    def _failed(self, key: CacheKey, exc: Exception, started: float, timeout: float) -> str:
        """A lookup that raised ``exc`` (not a timeout): counted; why it found nothing."""
        if isinstance(exc, TierUnavailable):
            self.breaker.probing = False
            self._lookup["skipped"].inc()
            return "skipped"
        if isinstance(exc, codec.CorruptEntry):
            # The tier works (it answered); its content was bad and has been deleted.
            if self.estimator is not None:
                self.estimator.observe(time.perf_counter() - started)
            self.breaker.success()
            self._lookup["corrupt"].inc()
            return "corrupt"
        if isinstance(exc, codec.Unencodable):  # this request's key, not the tier
            self.breaker.probing = False
            self._unencodable(key, "get", exc)
            self._lookup["miss"].inc()
            return "error"
        elapsed = time.perf_counter() - started
        if self.estimator is not None:
            self.estimator.observe_error(elapsed)
        self.near_timeout.observe(elapsed, timeout)
        self._fail("error", key, "get", exc)
        return "error"

    async def get_with_reason(
        self,
        key: CacheKey,
        budget: float,
        headers: CIMultiDictProxy[str] | None,
        loop: asyncio.AbstractEventLoop,
    ) -> tuple[Entry | None, str]:
        """:meth:`get` of a backend that only awaits, and why it found nothing (the
        :data:`MISS_REASON` it left in its own task's context), for a caller in another."""
        entry = await self._get_awaited(key, budget, headers, loop)
        return entry, "" if entry is not None else MISS_REASON.get()

    async def _get_awaited(
        self,
        key: CacheKey,
        budget: float,
        headers: CIMultiDictProxy[str] | None,
        loop: asyncio.AbstractEventLoop,
    ) -> Entry | None:
        """:meth:`get` of a backend that looks up only by awaiting its ``get``."""
        why = self._skipped(budget)
        if why is not None:
            MISS_REASON.set(why)
            return None
        timeout, learned = self._timeout_for(budget)
        task = asyncio.current_task(loop)
        assert task is not None, "a lookup runs in a task"
        started = time.perf_counter()
        varied = False
        try:
            with LoopTimeout(loop, task, loop.time() + timeout):
                entry = await self.backend.get(key)
                if entry is not None and entry.variants:
                    varied = True
                    # A URL that varies: its index, then the chosen variant's own record.
                    chosen = variants.select(entry.variants, headers) if headers else None
                    entry = None
                    if chosen is not None:
                        key = _record_key(key, chosen.vid)
                        entry = await self.backend.get(key)
        except asyncio.CancelledError:
            # The caller gave up (a hedged lookup's loser, a client gone): nothing is known
            # about the tier - no failure, no latency sample, no outcome. A probe that never
            # reported must not keep the breaker half-open: the next lookup may probe.
            self.breaker.probing = False
            raise
        except TimeoutError:
            MISS_REASON.set(self._timed_out(key, started, timeout, learned))
            return None
        except Exception as exc:  # noqa: BLE001 - a broken tier is a miss, whatever the driver raised
            MISS_REASON.set(self._failed(key, exc, started, timeout))
            return None
        found, why = self._looked_up(key, entry, headers, started, timeout, varied)
        if found is None:
            MISS_REASON.set(why)
        return found

    async def set(self, key: CacheKey, entry: Entry, blob: Blob) -> bool:
        if isinstance(self.backend, BytesBackend):
            # Encode before the tier is involved: an entry that cannot be encoded is that
            # entry's problem (not stored here), never a failure of the tier.
            try:
                blob.data  # noqa: B018 - encodes once, kept for the other tiers
            except codec.Unencodable as exc:
                self._unencodable(key, "set", exc)
                return False
        if entry.vary:
            record_key = _record_key(key, variants.variant_id(entry.vary))
            if entry.key != record_key.material:  # (built for the URL: its record's own key)
                entry = dataclasses.replace(entry, key=record_key.material)
                blob = Blob(entry)
            if self.trust is not None:
                self.trust.writing(record_key.material, entry)
            return await self._write("set", key, self._set_variant(key, record_key, entry, blob))
        if self.trust is not None:
            self.trust.writing(key.material, entry)
        return await self._write("set", key, self.backend.set(key, entry, blob))

    async def _set_variant(
        self, key: CacheKey, record_key: CacheKey, entry: Entry, blob: Blob
    ) -> None:
        """Store one variant of a URL that varies: its record, then its URL's index listing
        it as the most recently used; the variants the bound drops are deleted last. (Not
        atomic between replicas: a lost update of the index costs a variant a miss, never
        a wrong answer - a record is checked against the request it is served to.)"""
        async with self._index_lock(key.material):
            try:
                current = await self.backend.get(key)
            except codec.CorruptEntry:  # (deleted by the backend)
                current = None
            listed = current.variants if current is not None else ()
            kept, dropped = variants.remember(
                listed, variants.variant_of(entry), self.max_variants, self.clock.wall()
            )
            await self.backend.set(record_key, entry, blob)
            index = _index_entry(key.material, kept, self.clock.wall())
            await self.backend.set(key, index, Blob(index))
            for variant in dropped:
                await self.backend.delete(_record_key(key, variant.vid))

    @contextlib.asynccontextmanager
    async def _index_lock(self, material: str) -> AsyncIterator[None]:
        locks = self._index_locks
        lock, users = locks.get(material) or (asyncio.Lock(), 0)
        locks[material] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = locks[material]
            if users <= 1:
                del locks[material]
            else:
                locks[material] = (lock, users - 1)

    async def delete(self, key: CacheKey) -> bool:
        return await self._write("delete", key, self._delete_all(key))

    async def _delete_all(self, key: CacheKey) -> bool:
        """Delete ``key``'s entry and, when it is a variant index, every variant it lists."""
        async with self._index_lock(key.material):
            try:
                current = await self.backend.get(key)
            except codec.CorruptEntry:
                current = None
            removed = await self.backend.delete(key)
            for variant in current.variants if current is not None else ():
                removed = await self.backend.delete(_record_key(key, variant.vid)) or removed
            return removed

    async def _with_variants(self, keys: Sequence[CacheKey]) -> list[CacheKey]:
        """``keys`` and the records of the variants their indexes list here (the indexes read
        a batch at a time). An index that cannot be read now is still purged: its variants
        are then never found again (a record is only reached through its index, and is
        rewritten before it is listed anew)."""
        expanded = list(keys)

        async def index_of(key: CacheKey) -> Entry | None:
            try:
                return await self.backend.get(key)
            except Exception as exc:  # noqa: BLE001 - the purge itself reports what failed
                log.debug("%s purge: index of %r unread: %r", self.name, key.material[:200], exc)
                return None

        for start in range(0, len(keys), _PURGE_READS):
            batch = keys[start : start + _PURGE_READS]
            for key, current in zip(
                batch, await asyncio.gather(*map(index_of, batch)), strict=True
            ):
                if current is not None:
                    expanded.extend(_record_key(key, v.vid) for v in current.variants)
        return expanded

    async def _write(self, op: str, key: CacheKey, call: Coroutine[Any, Any, object]) -> bool:
        # A removal (an invalidation, or undoing a write a purge overtook) is tried even while
        # the writes' breaker is open, as purges are: lookups go on while writes fail (e.g. a
        # full disk), so a removal skipped here would leave an invalidated copy being served.
        if op != "delete" and not self.write_breaker.allow():
            call.close()
            self.metrics.tier_write_outcomes.labels(self.name, op, "skipped").inc()
            return False
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.write_timeout):
                await call
        except TimeoutError:
            self._fail("timeout", key, op)
            self.metrics.tier_write_outcomes.labels(self.name, op, "timeout").inc()
            return False
        except TierUnavailable:
            self.write_breaker.probing = False
            self.metrics.tier_write_outcomes.labels(self.name, op, "skipped").inc()
            return False
        except StorageFull as exc:
            self._fail("full", key, op, exc)
            self.metrics.tier_write_outcomes.labels(self.name, op, "full").inc()
            return False
        except codec.Unencodable as exc:
            self.write_breaker.probing = False
            self._unencodable(key, op, exc)
            return False
        except Exception as exc:  # noqa: BLE001 - a failed write is counted, never raised to the request
            self.near_timeout.observe(time.perf_counter() - started, self.write_timeout)
            self._fail("error", key, op, exc)
            self.metrics.tier_write_outcomes.labels(self.name, op, "error").inc()
            return False
        elapsed = time.perf_counter() - started
        self._latency[op].observe(elapsed)
        self.near_timeout.observe(elapsed, self.write_timeout)
        self.write_breaker.success()
        self.metrics.tier_write_outcomes.labels(self.name, op, "ok").inc()
        return True

    async def purge(
        self, keys: Sequence[CacheKey], tags: Sequence[str], soft_at: float | None, timeout: float
    ) -> int:
        """Purge keys and tags in this tier (see :meth:`TierBackend.purge`).

        Unlike lookups, a purge is tried even while the breaker is open - an operator asked
        for it and needs to know whether it happened - but its outcome still feeds the
        breaker. Raises on failure so the caller can report the tier as not purged.
        """
        mode = "soft" if soft_at is not None else "hard"
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                changed = await self.backend.purge(await self._with_variants(keys), tags, soft_at)
        except PurgeUnsupported:
            self.metrics.tier_write_outcomes.labels(self.name, "purge", "unsupported").inc()
            raise
        except TierUnavailable:  # not done (the caller reports it), but not a failure either
            self.metrics.tier_write_outcomes.labels(self.name, "purge", "skipped").inc()
            raise
        except TimeoutError:
            self.write_breaker.failure()
            self.metrics.tier_write_outcomes.labels(self.name, "purge", "timeout").inc()
            raise
        except Exception:
            self.write_breaker.failure()
            self.metrics.tier_write_outcomes.labels(self.name, "purge", "error").inc()
            raise
        elapsed = time.perf_counter() - started
        self._latency["purge"].observe(elapsed)
        self.near_timeout.observe(elapsed, timeout)
        self.write_breaker.success()
        self.metrics.tier_write_outcomes.labels(self.name, "purge", "ok").inc()
        if changed:
            self.metrics.purged_entries.labels(self.name, mode).inc(changed)
        return changed

    def state(self) -> str:
        """Readiness state: ``unavailable`` (the backend's storage cannot be used at all, see
        ``TierBackend.available``), else the lookups' :meth:`Breaker.health`, except that a
        tier whose lookups are up but whose writes fail is ``degraded``."""
        if not self.backend.available or not self.backend.storage_present():
            return "unavailable"
        health = self.breaker.health()
        if health == "up" and self.write_breaker.health() != "up":
            return "degraded"
        return health

    def _unencodable(self, key: CacheKey, op: str, exc: codec.Unencodable) -> None:
        """An entry or key that cannot be encoded: a bug in tierproxy, not a tier failure.
        Logged (one line per occurrence, key truncated) and counted; the breaker is untouched."""
        log.error(
            "bug: %s %s for %r skipped, cannot encode it: %s",
            self.name,
            op,
            key.material[:200],
            exc,
        )
        self.metrics.tier_write_outcomes.labels(self.name, op, "unencodable").inc()

    def _fail(self, outcome: str, key: CacheKey, op: str, exc: BaseException | None = None) -> None:
        breaker = self.breaker if op == "get" else self.write_breaker
        was_open = breaker.is_open
        breaker.failure()
        if op == "get":
            self._lookup[outcome].inc()
        if breaker.is_open and not was_open:
            log.warning(
                "%s %sbreaker opened after %d consecutive failures (last: %s %s)",
                self.name,
                "" if op == "get" else "write ",
                breaker.failures,
                op,
                exc or outcome,
            )
        else:
            log.debug("%s %s %s for %r: %r", self.name, op, outcome, key.material[:200], exc)

    async def close(self) -> None:
        await self.backend.close()
