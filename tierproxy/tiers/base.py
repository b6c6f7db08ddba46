"""The tier interface, and the one wrapper that gives every tier timeouts, a breaker and metrics.

A backend implements ``get``/``set``/``delete``/``close`` and nothing else. Timeouts, the
breaker, error -> miss mapping, corrupt-entry handling and metrics live in :class:`GuardedTier`,
once, so a new tier (memcached, S3) is one small module.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from .. import codec
from ..entry import Entry
from ..keys import CacheKey

if TYPE_CHECKING:
    from ..metrics import Metrics

__all__ = ["TierBackend", "BytesBackend", "GuardedTier", "Breaker", "Blob"]

log = logging.getLogger("tierproxy.tiers")


class Blob:
    """An entry's encoded bytes, encoded at most once however many tiers store it."""

    __slots__ = ("_entry", "_data")

    def __init__(self, entry: Entry) -> None:
        self._entry = entry
        self._data: bytes | None = None

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = codec.encode(self._entry)
        return self._data


class TierBackend(ABC):
    """A storage backend. Errors propagate; GuardedTier turns them into misses."""

    name: str
    #: True when ``get_now`` answers without awaiting (memory): no timeout needed.
    synchronous: bool = False

    def get_now(self, key: CacheKey) -> Entry | None:
        raise NotImplementedError

    def set_now(self, key: CacheKey, entry: Entry) -> bool:
        raise NotImplementedError

    def remove_now(self, key: CacheKey) -> bool:
        raise NotImplementedError

    @abstractmethod
    async def get(self, key: CacheKey) -> Entry | None: ...

    @abstractmethod
    async def set(self, key: CacheKey, entry: Entry, blob: Blob) -> None: ...

    @abstractmethod
    async def delete(self, key: CacheKey) -> bool: ...

    async def open(self) -> None:
        """Connect / create schema; called once before the first request."""

    @abstractmethod
    async def close(self) -> None: ...


class BytesBackend(TierBackend):
    """A backend that stores encoded entries; decoding and corrupt-entry handling live here."""

    @abstractmethod
    async def get_bytes(self, key: CacheKey) -> bytes | None: ...

    async def get(self, key: CacheKey) -> Entry | None:
        data = await self.get_bytes(key)
        if data is None:
            return None
        try:
            return codec.decode(data, key.material)
        except codec.CorruptEntry as exc:
            log.warning("corrupt entry in %s for %r (%s): deleted, treated as a miss",
                        self.name, key.material[:200], exc)
            await self.delete(key)
            raise


class Breaker:
    """Consecutive-failure circuit breaker: closed -> open -> (cooldown) -> one probe -> closed.

    Uses the monotonic clock; never crosses processes.
    """

    __slots__ = ("failures_to_open", "cooldown", "failures", "opened_at", "probing")

    def __init__(self, failures_to_open: int, cooldown: float) -> None:
        self.failures_to_open = failures_to_open
        self.cooldown = cooldown
        self.failures = 0
        self.opened_at: float | None = None
        self.probing = False

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        if self.probing or time.monotonic() - self.opened_at < self.cooldown:
            return False
        self.probing = True  # half-open: exactly one request finds out whether the tier is back
        return True

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.probing = False

    def failure(self) -> None:
        self.failures += 1
        self.probing = False
        if self.opened_at is not None or self.failures >= self.failures_to_open:
            self.opened_at = time.monotonic()

    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.probing else "open"


class GuardedTier:
    """A backend under read/write timeouts and a breaker; every outcome is counted."""

    def __init__(
        self,
        backend: TierBackend,
        read_timeout: float,
        write_timeout: float,
        breaker: Breaker,
        metrics: Metrics,
    ) -> None:
        self.backend = backend
        self.name = backend.name
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.breaker = breaker
        self.metrics = metrics
        self.synchronous = backend.synchronous
        self._lookup = metrics.tier_lookup_counters(self.name)
        self._latency = metrics.tier_latency(self.name)

    def get_now(self, key: CacheKey) -> Entry | None:
        """Synchronous lookup for in-memory tiers: nothing to time out, nothing to break."""
        entry = self.backend.get_now(key)
        self._lookup["hit" if entry is not None else "miss"].inc()
        return entry

    async def get(self, key: CacheKey, budget: float) -> Entry | None:
        """Look ``key`` up within ``budget`` seconds; any failure is a miss, never an error."""
        if not self.breaker.allow():
            self._lookup["skipped"].inc()
            return None
        if budget <= 0:
            self.breaker.probing = False
            self._lookup["skipped"].inc()
            return None
        started = time.perf_counter()
        try:
            async with asyncio.timeout(budget):
                entry = await self.backend.get(key)
        except TimeoutError:
            self._fail("timeout", key, "get")
            return None
        except codec.CorruptEntry:
            # The tier works (it answered); its content was bad and has been deleted.
            self.breaker.success()
            self._lookup["corrupt"].inc()
            return None
        except Exception as exc:  # a broken tier is a miss, whatever the driver raised
            self._fail("error", key, "get", exc)
            return None
        self._latency["get"].observe(time.perf_counter() - started)
        self.breaker.success()
        self._lookup["hit" if entry is not None else "miss"].inc()
        return entry

    async def set(self, key: CacheKey, entry: Entry, blob: Blob) -> bool:
        return await self._write("set", key, self.backend.set(key, entry, blob))

    async def delete(self, key: CacheKey) -> bool:
        return await self._write("delete", key, self.backend.delete(key))

    async def _write(self, op: str, key: CacheKey, call: Coroutine[Any, Any, object]) -> bool:
        if not self.breaker.allow():
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
        except Exception as exc:
            self._fail("error", key, op, exc)
            self.metrics.tier_write_outcomes.labels(self.name, op, "error").inc()
            return False
        self._latency[op].observe(time.perf_counter() - started)
        self.breaker.success()
        self.metrics.tier_write_outcomes.labels(self.name, op, "ok").inc()
        return True

    def _fail(self, outcome: str, key: CacheKey, op: str, exc: BaseException | None = None) -> None:
        was_open = self.breaker.is_open
        self.breaker.failure()
        if op == "get":
            self._lookup[outcome].inc()
        if self.breaker.is_open and not was_open:
            log.warning("%s breaker opened after %d consecutive failures (last: %s %s)",
                        self.name, self.breaker.failures, op, exc or outcome)
        else:
            log.debug("%s %s %s for %r: %r", self.name, op, outcome, key.material[:200], exc)

    async def close(self) -> None:
        await self.backend.close()
