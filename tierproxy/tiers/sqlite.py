"""L3: an SQLite file on local disk, through aiosqlite.

Two connections in WAL mode: a reader for lookups and a writer that every change goes through
(single writer path), so a slow write never queues in front of a read. Both run in autocommit
(``isolation_level=None``) and each change is one statement (the writes waiting together are
one multi-row statement, see :meth:`SQLiteTier._write_rows`), so a cancelled write cannot leave
a transaction - and its lock - open (aiosqlite runs each connection's statements in its own
thread, and a cancelled await does not stop them). The total size is kept in ``stats`` by
triggers, so it stays right when several processes share the file.

Surrogate keys: an entry row carries its tags (sha256 digests, a JSON array) and triggers keep
``tags(tag, key)`` in step with ``entries`` - rows appear with the entry, change when it is
overwritten, and go when it is deleted for any reason (purge, expiry sweep, eviction). The
index is therefore never out of date, and it is maintained by the single statement that writes
the entry (no multi-statement transaction to leave open on a cancel).

Schema versions (``PRAGMA user_version``): 1 had no tags. Opening a version-1 file adds the
column and drops its entries, whose tags were never indexed (a tag purge would miss them); a
cache file is disposable. A file from a newer tierproxy is moved aside like a corrupt one.

Faults (see :class:`SQLiteTier`): L3 degrades, it never takes the proxy down. A file that
cannot be opened (locked, unreadable, full disk) starts the proxy without L3 and is reopened
in the background; a file deleted, replaced or corrupted under the running proxy is noticed
(checked every second, and on any "not a database"/"malformed" error), a corrupt one moved
aside, and a new one created; a full disk makes writes evict, then skip (reads go on).
Lookups are bounded by a per-statement deadline checked by SQLite's progress handler, never
by ``interrupt()``, which stops whatever the shared reader connection runs at that moment -
another request's lookup as often as the late one.

Lookups that overlap share one trip to the reader's thread (a trip - a queue put, a thread
wake-up, a ``call_soon_threadsafe`` back to the loop - costs more than a point read). On an
idle tier a lookup is sent at once, alone; lookups begun while one is in flight wait and go
together as a batch (at most ``LOOKUP_BATCH`` a trip; the trips of a loop iteration are sent at
once, queued in the thread, none waiting for another's answer). In the thread each lookup of a batch keeps its own deadline - one found
past it is late (``TimeoutError``), and the progress handler interrupts a statement at the
deadline of the lookup it runs - and its own outcome: a DatabaseError fails that lookup only
(and is checked for corruption as before). What one stalled statement does to the others is
what it did before batching: they run after it, in the same thread, so a statement stalled
without executing instructions (a lock's retries never call the progress handler) holds
them until it returns, and they are then found late; their callers stop waiting at
GuardedTier's timeout either way. A caller that gives up drops its answer; lookups of a
caller gone before its batch is sent are not run. At most ``MAX_WAITING_LOOKUPS`` wait; more
are skipped at once (``TierUnavailable``: skipped, not a failure of the tier - the ones in
flight fail by timing out if the file is stuck). A file closed or replaced under a trip
fails all of its lookups with ``TierUnavailable``, as it did a single lookup.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import functools
import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import aiosqlite

from ..entry import Entry
from ..keys import CacheKey, KeySpace
from .base import (
    Blob,
    BytesBackend,
    Configured,
    StorageFull,
    TierUnavailable,
    mark_stale_encoded,
)

if TYPE_CHECKING:
    from ..clock import Clock
    from ..config import Settings
    from ..metrics import Metrics

__all__ = ["SQLiteOpenError", "SQLiteTier", "configured"]

log = logging.getLogger("tierproxy.tiers")

SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    size INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    accessed_at REAL NOT NULL,
    tags TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS entries_accessed ON entries (accessed_at);
CREATE INDEX IF NOT EXISTS entries_expires ON entries (expires_at);
CREATE TABLE IF NOT EXISTS stats (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL,
                                  entries INTEGER NOT NULL);
INSERT OR IGNORE INTO stats (id, bytes, entries)
    SELECT 0, COALESCE(SUM(size), 0), COUNT(*) FROM entries;
CREATE TRIGGER IF NOT EXISTS entries_ins AFTER INSERT ON entries BEGIN
    UPDATE stats SET bytes = bytes + new.size, entries = entries + 1 WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS entries_del AFTER DELETE ON entries BEGIN
    UPDATE stats SET bytes = bytes - old.size, entries = entries - 1 WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS entries_upd AFTER UPDATE OF size ON entries BEGIN
    UPDATE stats SET bytes = bytes - old.size + new.size WHERE id = 0;
END;
CREATE TABLE IF NOT EXISTS tags (tag TEXT NOT NULL, key TEXT NOT NULL,
                                 PRIMARY KEY (tag, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_key ON tags (key);
CREATE TRIGGER IF NOT EXISTS entries_tags_ins AFTER INSERT ON entries WHEN new.tags != '[]' BEGIN
    INSERT OR IGNORE INTO tags (tag, key) SELECT value, new.key FROM json_each(new.tags);
END;
CREATE TRIGGER IF NOT EXISTS entries_tags_upd AFTER UPDATE OF tags ON entries BEGIN
    DELETE FROM tags WHERE key = old.key;
    INSERT OR IGNORE INTO tags (tag, key) SELECT value, new.key FROM json_each(new.tags);
END;
CREATE TRIGGER IF NOT EXISTS entries_tags_del AFTER DELETE ON entries BEGIN
    DELETE FROM tags WHERE key = old.key;
END;
"""

_BATCH = 500  # keys per statement: well under SQLite's bound-parameter limit
_SOFT_BATCH = 16  # entries read and rewritten at a time by a soft purge (bounded memory)

# Touches (last-access times for LRU eviction) are batched: a read never writes.
_MAX_PENDING_TOUCHES = 10_000
_TOUCH_FLUSH_INTERVAL = 1.0
_EXPIRY_SWEEP_INTERVAL = 30.0
_EXPIRY_BATCH = 500  # expired rows deleted per statement (bounded WAL growth per write)
_EVICT_BATCH = 200  # most rows one eviction statement deletes
_EVICT_STATEMENTS = 8  # most eviction statements after one write (the next write goes on)

# The WAL's share of TIERPROXY_L3_MAX_BYTES: the main file is kept under the rest.
_WAL_SHARE = 8  # an eighth ...
_WAL_MIN = 256 * 1024  # ... but at least this (and at most _WAL_MAX)
_WAL_MAX = 64 * 1024 * 1024

# The writer's housekeeping after each write: bounded batches, through the indexes on
# expires_at and accessed_at (tests check the plans: never a scan of the whole table).
SWEEP_SQL = (
    "DELETE FROM entries WHERE key IN (SELECT key FROM entries"
    " WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)"
)
EVICT_SQL = (
    "DELETE FROM entries WHERE key IN (SELECT key FROM entries ORDER BY accessed_at LIMIT ?)"
)

# Every statement on the reader runs under a deadline its progress handler checks, every
# _PROGRESS_OPS virtual-machine instructions (see SQLiteTier._lookup).
_PROGRESS_OPS = 1000

# Health of the file under a running proxy (SQLiteTier._supervise).
_CHECK_INTERVAL = 1.0  # seconds between checks that the file is still the one opened
_RETRY_FIRST = 0.25  # first delay before opening an unavailable file again (then doubled)
_SQLITE_MAGIC = b"SQLite format 3\x00"
_LATE = object()  # a lookup that reached the reader's thread after its deadline

# Lookups that overlap share trips to the reader's thread (module docstring). A batch's
# statements run one after another in that thread and its callers are answered together, so
# a batch is kept bounded: 64 point reads of 1-KiB rows (about 5 us each) hold a batch's
# first caller about 0.3 ms longer than a trip of its own would, while saving 63 trips.
LOOKUP_BATCH = 64
#: Most rows one batch of writes carries (see SQLiteTier._write_rows): 768 parameters in its
#: one statement, under the 999 of SQLite before 3.32.
WRITE_BATCH = 128
#: Most writes waiting for a batch; more are skipped at once (TierUnavailable), as lookups
#: past MAX_WAITING_LOOKUPS are.
MAX_WAITING_WRITES = 1024
# What a row's own values can make a statement raise (a value SQLite cannot bind or a
# constraint it breaks): a batch that fails so is written again a row at a time.
_ROW_ERRORS = (
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    sqlite3.DataError,
    OverflowError,
)
# Rows of one key in one statement: the later updates the earlier (the last one wins).
_UPSERT = (
    "INSERT INTO entries (key, value, size, expires_at, accessed_at, tags) VALUES %s"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value, size = excluded.size,"
    " expires_at = excluded.expires_at, accessed_at = excluded.accessed_at, tags = excluded.tags"
)
# Lookups waiting for a trip; past this a lookup is skipped at once (TierUnavailable).
MAX_WAITING_LOOKUPS = 1024
# Opens in a row that fail before applying a single missed removal, after which the file is
# discarded instead (SQLiteTier._apply_missed).
_MAX_REPLAY_STALLS = 2
# Keys and tags of removals missed while the file was unusable that are remembered, to be
# applied when it is opened again; past this the file is discarded on reopen instead.
MAX_MISSED_REMOVALS = 1024


class _RowWrite:
    """A row waiting for its batch (SQLiteTier.set) and its caller's future; ``row`` is None
    once the caller gave up (its bytes are not held while it waits to be dropped)."""

    __slots__ = ("row", "written")

    def __init__(self, row: tuple[Any, ...], written: asyncio.Future[None]) -> None:
        self.row: tuple[Any, ...] | None = row
        self.written = written


def _own_copy(exc: Exception) -> Exception:
    """``exc`` for one of several callers it fails (a batch's writes, the lookups of one key
    sharing a read): a copy of its own, as each would have raised its own - one object raised
    in several coroutines collects each one's traceback and context."""
    try:
        return copy.copy(exc)
    except Exception:  # noqa: BLE001 - an exception type that cannot be copied is shared
        return exc


def _is_full(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF == sqlite3.SQLITE_FULL:
        return True
    return "database or disk is full" in str(exc)


def _settle_failed(answer: asyncio.Future[bytes | None], exc: Exception) -> None:
    """A lookup's outcome could not be handed over (a bug): its caller fails with it - never
    left waiting, nor the rest of its batch unanswered."""
    log.exception("L3 lookup outcome could not be handed over")
    if not answer.done():
        answer.set_exception(exc)


def _is_corrupt(exc: BaseException) -> bool:
    """The file is not (or no longer) a usable database: move it aside and start afresh."""
    if isinstance(exc, _NewerSchema):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return True
    text = str(exc)
    return "not a database" in text or "malformed" in text


def _inspect_file(path: str, identity: tuple[int, int] | None) -> str | None:
    """What is wrong with the file at ``path`` (blocking; run in a thread), or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    if identity is not None and (st.st_dev, st.st_ino) != identity:
        return "replaced"
    with open(path, "rb") as f:
        head = f.read(len(_SQLITE_MAGIC))
    # A new file in WAL mode may still be empty: its pages are in the WAL until a checkpoint.
    if head and head != _SQLITE_MAGIC:
        return "corrupt"
    return None


class _Deadline:
    """The deadline (monotonic) of the statement a reader connection's thread runs now, and
    that connection's SQLite progress handler: non-zero stops the statement that runs now -
    and only that one (unlike ``sqlite3.Connection.interrupt()``, which stops whatever the
    connection runs when it lands, another request's read included)."""

    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at = math.inf

    def passed(self) -> int:
        return 1 if time.monotonic() >= self.at else 0


def _file_bytes(path: str) -> float:
    """The file and its WAL on disk (a gauge, read at scrape time)."""
    total = 0
    for suffix in ("", "-wal"):
        try:
            total += os.stat(path + suffix).st_size
        except OSError:
            pass
    return float(total)


def configured(
    settings: Settings, metrics: Metrics, keys: KeySpace, *, clock: Clock | None = None
) -> Configured | None:
    """L3, unless TIERPROXY_SQLITE_PATH=off. (Expiry sweeps run on real time: they only drop
    rows; whether a copy is fresh, stale or expired is the proxy's clock's, in GuardedTier.)"""
    if not settings.sqlite_path:
        return None
    backend = SQLiteTier(
        settings.sqlite_path,
        max_bytes=settings.l3_max_bytes,
        metrics=metrics,
        keys=keys,
        read_timeout=settings.l3_timeout,
        write_timeout=settings.l3_write_timeout,
        retry_max=settings.breaker_cooldown,
        check_interval=min(1.0, settings.breaker_cooldown / 2),
    )
    return Configured(backend, settings.l3_timeout, settings.l3_write_timeout)


class SQLiteOpenError(RuntimeError):
    """TIERPROXY_SQLITE_PATH can never work as configured (its directory does not exist, or it
    is a directory); start-up stops with this message (exit status 2)."""


class _NewerSchema(sqlite3.DatabaseError):
    """The file was written by a newer tierproxy (treated like a file that is not a database)."""


class SQLiteTier(BytesBackend):
    """L3. ``available`` is False while the file cannot be used (locked, unreadable, on a
    full disk, deleted or corrupted under the running proxy): lookups and writes are then
    skipped, and a supervisor task opens it again - with backoff - without a restart.

    Size: ``max_bytes`` bounds the main file and its WAL together. The WAL gets a share of it
    (``journal_size_limit``, an automatic checkpoint at half that share, and a TRUNCATE
    checkpoint by the writer when it still grew past it); the main file's used pages are kept
    under the rest by least-recently-used eviction, a bounded number of statements per write,
    through the ``accessed_at`` index. Freed pages are reused, so the file stops growing.

    Lookups: ``read_hops`` counts the trips made to the reader's thread for them (a batch of
    overlapping lookups is one trip; module docstring), ``read_statements`` the point reads
    sent in them (the lookups of one key in a batch share one).
    """

    name = "l3"
    available = False

    def __init__(
        self,
        path: str,
        *,
        max_bytes: int,
        read_timeout: float,
        write_timeout: float,
        retry_max: float = 5.0,
        check_interval: float = _CHECK_INTERVAL,
        metrics: Metrics | None = None,
        keys: KeySpace,
    ) -> None:
        self.path = path
        # Rows are keyed by CacheKey.digest (origin + format version + material); tag rows by
        # this origin's tag ids: a file reused with another origin or format shares nothing.
        self.keys = keys
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.retry_max = max(retry_max, _RETRY_FIRST)
        self.check_interval = check_interval
        self.metrics = metrics
        self.wal_budget = min(_WAL_MAX, max(_WAL_MIN, max_bytes // _WAL_SHARE))
        # What the main file may use; a bound too small for any WAL share gets half of it.
        self.data_budget = max(max_bytes // 2, max_bytes - self.wal_budget)
        self._reader: aiosqlite.Connection | None = None
        self._writer: aiosqlite.Connection | None = None
        self._reader_raw: sqlite3.Connection | None = None
        # The deadline of the statement the reader's thread runs now: one per reader
        # connection (a reader replaced by a recovery gets its own, so the old one's last
        # lookup can neither lift nor shorten the new one's).
        self._read_deadline = _Deadline()
        # Lookups waiting for the next batch (digest, deadline, caller's future) and the task
        # that sends them, while any wait (see get_bytes).
        self._waiting: collections.deque[tuple[str, float, asyncio.Future[Any]]] = (
            collections.deque()
        )
        self._loop: asyncio.AbstractEventLoop | None = None  # set by open()
        self._batcher: asyncio.Handle | None = None  # a send of the waiting lookups is due
        self._trips: set[asyncio.Future[Any]] = set()  # batches sent, their answers awaited
        self._alone = False  # a lookup sent on its own is in flight
        self.read_hops = 0  # trips to the reader's thread made for lookups (batches)
        self.read_statements = 0  # point reads sent in those trips
        self._page_size = 4096
        self._identity: tuple[int, int] | None = None
        # Keys read since the last flush of read marks (_flush_touches stamps them all with
        # its own time).
        self._touched: set[str] = set()
        self._last_touch_flush = 0.0
        self._last_sweep = 0.0
        # Removals asked for while the file was unusable (keys, tags, soft purge time), applied
        # to the file when it is opened again; _missed_purge: more than MAX_MISSED_REMOVALS
        # were missed, so the file is discarded instead (see _removal_missed).
        self._missed: list[tuple[tuple[CacheKey, ...], tuple[str, ...], float | None]] = []
        self._missed_count = 0
        self._missed_purge = False
        # Opens in a row that failed before applying one missed removal (_apply_missed).
        self._replay_stalls = 0
        self._supervisor: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # Rows waiting to be written (row, caller's future) and the task writing them, while
        # any wait (see set); batches written and the rows in them.
        self._rows: collections.deque[_RowWrite] = collections.deque()
        self._row_writer: asyncio.Task[None] | None = None
        # Taken by each batch (by the row writer alone, so never waited for in itself; held
        # from outside, it delays the writes as a slow write before them would).
        self._write_lock = asyncio.Lock()
        self.write_batches = 0
        self.rows_written = 0
        self._suspect: str | None = None  # a statement failed as if the file were corrupt
        # Opening runs a handful of statements, each bounded by the busy timeout.
        self._open_timeout = max(5.0, 4 * write_timeout)
        self.bytes = 0
        self.entries = 0

    # -- opening, health and recovery -------------------------------------------------

    async def open(self) -> None:
        """Open the file, or start without it (``available`` False) and keep trying.

        Only a path that can never work as configured stops start-up (:class:`SQLiteOpenError`):
        its directory does not exist, or it is itself a directory. Anything else - a locked or
        unreadable file, a full disk - is a cache being unavailable for a while, not a reason
        to exit (a supervisor restarting the proxy would only loop).
        """
        self._check_path()
        try:
            async with asyncio.timeout(self._open_timeout):
                await self._open_or_replace()
        except SQLiteOpenError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: start degraded, retry
            self._went_unavailable(f"cannot open {self.path}: {exc!r}")
        else:
            self._became_available(first=True)
        # The loop the tier serves on, kept: asking for it per lookup costs a system call on
        # Python 3.11 (tierproxy.deadlines).
        self._loop = loop = asyncio.get_running_loop()
        self._supervisor = loop.create_task(self._supervise(), name="tierproxy-l3-supervisor")

    def _check_path(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise SQLiteOpenError(
                f"TIERPROXY_SQLITE_PATH={self.path!r}: directory {directory!r} does not exist"
            )
        if os.path.isdir(self.path):
            raise SQLiteOpenError(f"TIERPROXY_SQLITE_PATH={self.path!r} is a directory, not a file")

    async def _open_or_replace(self) -> None:
        """Open the file; one that is not a usable database is moved aside and replaced."""
        try:
            await self._open()
        except sqlite3.DatabaseError as exc:
            await self._close_connections()
            if not _is_corrupt(exc):
                raise
            self._move_aside(f"is not a usable database ({exc})")
            await self._open()
        except BaseException:
            await self._close_connections()
            raise

    def _move_aside(self, why: str) -> None:
        # A cache file is disposable: keep the bad one for inspection, start afresh.
        aside = f"{self.path}.corrupt-{int(time.time())}"
        log.warning("L3 file %s %s; moved to %s", self.path, why, aside)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path + suffix, aside + suffix)

    async def _open(self) -> None:
        self._check_path()
        discard = self._missed_purge
        if discard:
            # More purges were asked for while the file was unusable than are remembered: what
            # it holds may have been purged. A cache file is disposable: start with an empty one.
            log.warning("L3 missed purges while unavailable: its old file is discarded")
            self._missed, self._missed_count = [], 0
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path + suffix)
        elif not os.path.exists(self.path):
            # A WAL or shared-memory file without its database belongs to a file that is
            # gone: SQLite would replay it into the new one.
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path + suffix)
        # The busy timeout is the longest a locked file can hold the worker thread: keep it
        # within the tier's budget (the default is 5 s).
        self._writer = await aiosqlite.connect(
            self.path, timeout=self.write_timeout, isolation_level=None
        )
        await self._writer.execute("PRAGMA journal_mode=WAL")
        await self._writer.execute("PRAGMA synchronous=NORMAL")
        await self._migrate(self._writer)
        await self._writer.executescript(_SCHEMA)
        await self._writer.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        rows = await self._writer.execute_fetchall("PRAGMA page_size")
        self._page_size = int(next(iter(rows))[0]) if rows else 4096
        # The WAL's share of the bound (class docstring): SQLite truncates the WAL to this
        # size when a checkpoint resets it, and checkpoints by itself at half of it.
        await self._writer.execute(f"PRAGMA journal_size_limit={self.wal_budget}")
        await self._writer.execute(
            f"PRAGMA wal_autocheckpoint={max(1, self.wal_budget // 2 // self._page_size)}"
        )
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)
        self._reader = await aiosqlite.connect(
            self.path, timeout=self.read_timeout, isolation_level=None
        )
        await self._reader.execute("PRAGMA query_only=1")
        # A value that should be a BLOB but is TEXT (a damaged record header: the two serial
        # types differ in their lowest bit; or a foreign writer) comes back as bytes, not as
        # a str or a "Could not decode to UTF-8" error: it then fails its check and is dropped
        # as a corrupt copy. The reader reads nothing else that is TEXT.
        self._reader.text_factory = bytes
        self._read_deadline = deadline = _Deadline()
        await self._reader.set_progress_handler(deadline.passed, _PROGRESS_OPS)
        self._reader_raw = self._reader._connection  # for statements run in its thread
        await self._refresh_stats()
        self._last_sweep = 0.0
        await self._apply_missed()
        if self._missed_purge and not discard:
            # Too many purges came while this file was being opened: open it again, discarding it.
            raise TierUnavailable("L3 missed purges while it was being opened")
        self._missed_purge = False

    async def _apply_missed(self) -> None:
        """Apply the removals missed while the file was unusable (or while it was being
        opened) to the file as it is now - another worker may be filling it: it is kept, not
        discarded.

        Runs inside the open, under its timeout. Each removal is dropped from the list once
        applied, so an open that times out mid-replay (soft purges rewriting many entries, a
        slow disk) keeps what it did, and the next attempt goes on from there: undone whole
        and begun again, a replay longer than the timeout never ended and the tier stayed
        unavailable for good. Opens that fail twice in a row without applying one removal
        have the file discarded at the next, as when too many removals were missed."""
        writer = self._writer
        assert writer is not None
        applied = 0
        try:
            while self._missed and not self._missed_purge:
                removal = self._missed[0]
                keys, tags, soft_at = removal
                await self._purge(writer, keys, tags, soft_at)
                if self._missed and self._missed[0] is removal:
                    self._missed.pop(0)
                    self._missed_count -= len(keys) + len(tags)
                applied += 1
                self._replay_stalls = 0
        except BaseException:
            if applied == 0 and self._missed and not self._missed_purge:
                self._replay_stalls += 1
                if self._replay_stalls >= _MAX_REPLAY_STALLS:
                    log.warning(
                        "L3 could not apply a missed removal in %d opens: its file is discarded",
                        self._replay_stalls,
                    )
                    self._missed_purge = True
                    self._missed, self._missed_count = [], 0
            raise
        finally:
            if applied:
                log.info("L3 applied %d removal(s) it missed while unavailable", applied)
        self._replay_stalls = 0

    @staticmethod
    async def _migrate(writer: aiosqlite.Connection) -> None:
        rows = await writer.execute_fetchall("PRAGMA user_version")
        version = int(next(iter(rows))[0]) if rows else 0
        if version > SCHEMA_VERSION:
            raise _NewerSchema(f"schema version {version} is newer than {SCHEMA_VERSION}")
        columns = {row[1] for row in await writer.execute_fetchall("PRAGMA table_info(entries)")}
        if columns and "tags" not in columns:
            log.warning(
                "L3 file has schema version %d: adding the tag index and dropping its "
                "entries (their surrogate keys were never indexed)",
                version,
            )
            try:
                await writer.execute(
                    "ALTER TABLE entries ADD COLUMN tags TEXT NOT NULL DEFAULT '[]'"
                )
            except sqlite3.OperationalError as exc:  # another process migrated it first
                if "duplicate column" not in str(exc):
                    raise
            await writer.execute("DELETE FROM entries")

    def _went_unavailable(self, reason: str) -> None:
        was = self.available
        self.available = False
        if was or self._supervisor is None:  # said once per episode, not per retry
            log.warning(
                "L3 unavailable (%s); serving without it, retrying in the background", reason
            )

    def _became_available(self, *, first: bool = False) -> None:
        self.available = True
        self._suspect = None
        if not first:
            log.warning("L3 in use again: %s", self.path)

    def storage_present(self) -> bool:
        if os.path.exists(self.path):
            return True
        if self.available:
            self._wake.set()  # readiness noticed first: the supervisor recovers it now
        return False

    def _count_recovery(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.l3_recoveries.labels(reason).inc()

    def _report_corrupt(self, exc: BaseException) -> None:
        """A statement said the file is corrupt: the supervisor checks and replaces it now."""
        if _is_corrupt(exc) and self._suspect is None:
            self._suspect = str(exc)
            self._wake.set()

    async def _supervise(self) -> None:
        """Owned by the tier (cancelled in :meth:`close`): reopens an unavailable file with
        backoff, and checks an open one is still there and still a database."""
        delay = _RETRY_FIRST
        while True:
            if self.available:
                await self._sleep(self.check_interval)
                problem = "corrupt" if self._suspect is not None else await self._check_file()
                if problem is None:
                    continue
                self._went_unavailable(
                    f"file {self.path} {problem}" + (f": {self._suspect}" if self._suspect else "")
                )
                self._count_recovery(problem)
                await self._close_connections()
                if problem == "corrupt":
                    with contextlib.suppress(OSError):
                        self._move_aside("is corrupt")
                delay = _RETRY_FIRST
            try:
                async with asyncio.timeout(self._open_timeout):
                    await self._open_or_replace()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - still unavailable: try again later
                log.debug("L3 %s still unavailable: %r (next try in %.2fs)", self.path, exc, delay)
                await self._sleep(delay)
                delay = min(delay * 2, self.retry_max)
                continue
            delay = _RETRY_FIRST
            self._became_available()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        self._wake.clear()

    async def _check_file(self) -> str | None:
        try:
            async with asyncio.timeout(max(1.0, self.read_timeout)):
                return await asyncio.to_thread(_inspect_file, self.path, self._identity)
        except (OSError, TimeoutError) as exc:
            log.debug("L3 file check: %r", exc)
            return None  # cannot tell (a slow disk): the statements' errors will

    # -- reads ------------------------------------------------------------------------

    @staticmethod
    def _lookup(raw: sqlite3.Connection, current: _Deadline, digest: str, deadline: float) -> Any:
        """One lookup, run in the reader's thread, bounded by ``deadline`` (monotonic)."""
        if time.monotonic() >= deadline:
            return _LATE  # its caller timed out (or went away) while it was queued
        current.at = deadline
        try:
            return raw.execute(
                "SELECT value, expires_at FROM entries WHERE key = ?", (digest,)
            ).fetchone()
        finally:
            current.at = math.inf

    @staticmethod
    def _lookup_alone(
        raw: sqlite3.Connection, current: _Deadline, digest: str, deadline: float
    ) -> Any:
        """One lookup in a trip of its own: its outcome, as :meth:`_lookup_batch` gives it."""
        try:
            return SQLiteTier._lookup(raw, current, digest, deadline)
        except sqlite3.DatabaseError as exc:
            return exc

    @staticmethod
    def _lookup_batch(
        raw: sqlite3.Connection, current: _Deadline, batch: list[tuple[str, float]]
    ) -> list[Any]:
        """Many lookups in one trip to the reader's thread, each under its own deadline: a
        row (or None), ``_LATE``, or the DatabaseError its statement raised, in order."""
        outcomes: list[Any] = []
        for digest, deadline in batch:
            try:
                outcomes.append(SQLiteTier._lookup(raw, current, digest, deadline))
            except sqlite3.DatabaseError as exc:  # this lookup's; the others go on
                outcomes.append(exc)
        return outcomes

    def lookups_soon(self) -> bool:
        return self._loop is not None  # (opened; an unusable file raises TierUnavailable)

    async def get_bytes(self, key: CacheKey) -> bytes | None:
        return await self.get_bytes_soon(key)

    def get_bytes_soon(self, key: CacheKey) -> asyncio.Future[bytes | None]:
        loop = self._loop
        if loop is None or self._reader is None or self._reader_raw is None or not self.available:
            raise TierUnavailable("L3 file unavailable")
        # A lookup whose caller gives up (timeout, client gone) is not interrupted: it
        # finishes or hits its own deadline in the reader's thread, and its row is dropped.
        deadline = time.monotonic() + self.read_timeout
        digest = key.digest
        answer: asyncio.Future[bytes | None] = loop.create_future()
        if self._batcher is None and not self._alone:
            # Nothing in flight: sent at once, on its own (batching adds nothing when idle).
            # Lookups begun meanwhile wait, and go together when it is back.
            trip = self._trip(self._lookup_alone, digest, deadline)
            self.read_statements += 1
            self._alone = True
            trip.add_done_callback(
                functools.partial(self._alone_back, answer, self._reader, digest)
            )
            # Answered, or given up by its caller: the lookups begun meanwhile go then.
            answer.add_done_callback(self._alone_over)
            return answer
        if len(self._waiting) >= MAX_WAITING_LOOKUPS:
            # The reader's thread is far behind (a stalled statement, a flood): waiting
            # longer would only time out. Skipped, like an unavailable tier (a skipped
            # lookup is no failure for the breaker; the ones in flight time out and are).
            raise TierUnavailable("L3 lookup queue full")
        self._waiting.append((digest, deadline, answer))
        return answer

    def _alone_back(
        self,
        answer: asyncio.Future[bytes | None],
        reader: aiosqlite.Connection,
        digest: str,
        trip: asyncio.Future[Any],
    ) -> None:
        """A lookup sent on its own is back from the reader's thread: its answer settled."""
        if answer.done():
            return  # its caller went away: the outcome is dropped
        try:
            outcome = self._trip_outcome(trip, reader)
        except TierUnavailable as exc:
            answer.set_exception(exc)
            return
        try:
            self._settle(answer, digest, outcome)
        except Exception as exc:  # noqa: BLE001 - a bug: logged, its caller fails with it
            _settle_failed(answer, exc)

    def _alone_over(self, _: asyncio.Future[bytes | None]) -> None:
        """The lookup sent on its own is over for its caller: the lookups that began
        meanwhile are sent together (queued in the reader's thread behind it if it is still
        there)."""
        self._alone = False
        loop = self._loop
        if self._waiting and self._batcher is None and loop is not None:
            self._batcher = loop.call_soon(self._send_waiting)

    def _settle(self, answer: asyncio.Future[bytes | None], digest: str, outcome: Any) -> None:
        """A lookup's outcome from the reader's thread (:meth:`_lookup`) into its caller's
        future: the value of a live row, None, or what failed."""
        if isinstance(outcome, BaseException):
            if "interrupted" in str(outcome):
                answer.set_exception(TimeoutError("L3 lookup passed its deadline"))
                return
            self._report_corrupt(outcome)
            answer.set_exception(_own_copy(outcome) if isinstance(outcome, Exception) else outcome)
            return
        if outcome is _LATE:
            answer.set_exception(TimeoutError("L3 lookup waited past its deadline"))
            return
        if outcome is None:
            answer.set_result(None)
            return
        value, expires_at = outcome
        if type(value) is not bytes or not isinstance(expires_at, (int, float)):
            # Not a record (a number or NULL where the BLOB should be, a damaged row): handed
            # on as an empty one, which fails its check - deleted and counted as corrupt, as
            # any damaged copy is.
            answer.set_result(b"")
            return
        if expires_at <= time.time():
            answer.set_result(None)
            return
        if len(self._touched) < _MAX_PENDING_TOUCHES:
            self._touched.add(digest)
        answer.set_result(value)

    def _trip(self, lookup: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """One trip to the reader's thread, started now: ``lookup`` (:meth:`_lookup_alone` or
        :meth:`_lookup_batch`) run there with the reader, its deadline and ``args``; its
        outcome a future (see :meth:`_trip_outcome`).

        Queued on aiosqlite's own thread as its ``_execute`` queues a call, minus the
        coroutine (and its get_event_loop()): a lookup needs no task of its own."""
        reader, raw, current, loop = self._reader, self._reader_raw, self._read_deadline, self._loop
        if reader is None or raw is None or loop is None or not self.available:
            raise TierUnavailable("L3 file unavailable")
        if not reader._running or reader._connection is None:
            raise TierUnavailable("L3 file being reopened")  # closed (recovery, shutdown)
        self.read_hops += 1
        trip: asyncio.Future[Any] = loop.create_future()
        reader._tx.put_nowait((trip, functools.partial(lookup, raw, current, *args)))
        return trip

    def _trip_outcome(self, trip: asyncio.Future[Any], reader: aiosqlite.Connection) -> Any:
        """What a trip to ``reader``'s thread gave; TierUnavailable when it failed or the
        reader was closed or replaced under it by a recovery (the old file's answers are not
        trusted: it was deleted, replaced or corrupt)."""
        if trip.cancelled():
            raise TierUnavailable("L3 lookups stopped")
        failure = trip.exception()
        if failure is not None:
            raise TierUnavailable(f"L3 file being reopened ({failure!r})")
        if reader is not self._reader:
            raise TierUnavailable("L3 file being reopened")
        return trip.result()

    def _send_waiting(self) -> None:
        """Send the waiting lookups to the reader's thread, at most ``LOOKUP_BATCH`` a trip.

        Trips do not wait for each other: they queue in the thread, which runs them back to
        back, so lookups never wait on a busy event loop's turn to take a trip's answer
        before the next trip can go (under a stampede of thousands of lookups, one trip at a
        time held lookups for seconds). After a send this runs again on the next loop
        iteration: the callers just answered run first, and lookups they begin at once join
        that batch instead of one of them going alone and the rest waiting for it. When none
        waited, batching ends and the next lookup goes alone. No task: callbacks only."""
        self._batcher = None
        waiting = self._waiting
        loop = self._loop
        if not waiting or loop is None:
            return
        reader = self._reader
        while waiting:
            batch: list[tuple[str, float, asyncio.Future[Any]]] = []
            # One read a key (its callers would have read it one after another in this
            # trip): under the latest of their deadlines, each caller keeping its own.
            reads: dict[str, float] = {}
            while waiting and len(reads) < LOOKUP_BATCH:
                item = waiting.popleft()
                digest, deadline, future = item
                if not future.done():  # a caller already gone is not looked up
                    batch.append(item)
                    if reads.get(digest, -math.inf) < deadline:
                        reads[digest] = deadline
            if not batch:
                continue
            try:
                trip = self._trip(self._lookup_batch, list(reads.items()))
                self.read_statements += len(reads)
            except TierUnavailable as exc:
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(TierUnavailable(str(exc)))
                continue
            self._trips.add(trip)
            trip.add_done_callback(functools.partial(self._batch_back, batch, list(reads), reader))
        self._batcher = loop.call_soon(self._send_waiting)

    def _batch_back(
        self,
        batch: list[tuple[str, float, asyncio.Future[Any]]],
        digests: list[str],
        reader: aiosqlite.Connection | None,
        trip: asyncio.Future[Any],
    ) -> None:
        """A batch is back from the reader's thread (the outcomes of ``digests``, one read
        a key): each caller's future settled with its key's."""
        self._trips.discard(trip)
        gone: str | None = None  # why every caller of the batch fails (TierUnavailable)
        outcomes: dict[str, Any] = {}
        try:
            if reader is None:
                raise TierUnavailable("L3 file unavailable")
            outcomes = dict(zip(digests, self._trip_outcome(trip, reader), strict=True))
        except TierUnavailable as exc:
            gone = str(exc)
        for digest, _, future in batch:
            if future.done():
                continue  # its caller went away: the outcome is dropped
            if gone is not None:
                future.set_exception(TierUnavailable(gone))
            else:
                try:
                    self._settle(future, digest, outcomes[digest])
                except Exception as exc:  # noqa: BLE001 - a bug: logged, only this caller fails
                    _settle_failed(future, exc)

    async def ping(self) -> bool:
        """One read on the lookups' connection, as a lookup does it (a key never stored),
        under the same deadline: a background health probe (tierproxy.probes). Raises what
        a lookup would."""
        reader, raw, current = self._reader, self._reader_raw, self._read_deadline
        if reader is None or raw is None or not self.available:
            raise TierUnavailable("L3 file unavailable")
        deadline = time.monotonic() + self.read_timeout
        try:
            row = await reader._execute(  # type: ignore[no-untyped-call]
                self._lookup, raw, current, "", deadline
            )
        except ValueError:  # aiosqlite: the connection was closed (recovery, shutdown)
            raise TierUnavailable("L3 file being reopened") from None
        if row is _LATE:
            raise TimeoutError("L3 probe waited past its deadline")
        return True

    # -- writes -----------------------------------------------------------------------

    def _writer_conn(self) -> aiosqlite.Connection:
        if self._writer is None or not self.available:
            raise TierUnavailable("L3 file unavailable")
        return self._writer

    async def _on_writer(
        self,
        call: Callable[[aiosqlite.Connection], Any],
        writer: aiosqlite.Connection | None = None,
    ) -> Any:
        """``call`` on the writer connection; ``writer``: on that one only (a batch's steps
        stay on the file they began on: TierUnavailable once it was closed or replaced)."""
        if writer is None:
            writer = self._writer_conn()
        elif writer is not self._writer or not self.available:
            raise TierUnavailable("L3 file being reopened")
        try:
            return await call(writer)
        except sqlite3.DatabaseError as exc:
            if writer is not self._writer:
                raise TierUnavailable("L3 file being reopened") from None
            self._report_corrupt(exc)
            raise
        except ValueError:
            if writer is not self._writer:
                raise TierUnavailable("L3 file being reopened") from None
            raise

    async def set(self, key: CacheKey, entry: Entry, blob: Blob) -> None:
        """Store ``entry``: its row waits for the next batch (:meth:`_write_rows`) and this
        returns once the batch is written. A caller that gives up (its write timeout) before
        its batch's statement is queued on the writer's thread is not written, and its row
        is let go at once; once queued, the row is written all the same, as a statement
        queued there always was (a backfill a purge overtook deletes it afterwards, and that
        delete is queued after it). At most ``MAX_WAITING_WRITES`` wait; more are skipped at
        once (``TierUnavailable``)."""
        data = blob.data
        if len(data) > self.wal_budget // 2:
            return  # it could not be written without the WAL growing past its share
        self._writer_conn()  # (unavailable: TierUnavailable now, not after waiting)
        if len(self._rows) >= MAX_WAITING_WRITES:
            raise TierUnavailable(f"{len(self._rows)} L3 writes already waiting")
        tags = json.dumps([self.keys.tag_id(tag) for tag in entry.tags]) if entry.tags else "[]"
        row = (key.digest, data, len(data), entry.expires_at, time.time(), tags)
        loop = asyncio.get_running_loop()
        waiting = _RowWrite(row, loop.create_future())
        self._rows.append(waiting)
        if self._row_writer is None:
            self._row_writer = loop.create_task(self._write_rows())
        try:
            await waiting.written
        except asyncio.CancelledError:
            waiting.row = None  # given up: not written (if not queued yet), its bytes let go
            raise

    async def _write_rows(self) -> None:
        """Write the rows waiting (:meth:`set`) until none wait, a batch at a time: what
        waits when the writer is free goes together, at most ``WRITE_BATCH`` rows and a WAL
        share of bytes. A batch makes room for all of its rows, writes them in one
        multi-row statement and tidies up once (:meth:`_write_batch`), where each row took
        those steps on its own, one row at a time, and a loaded proxy's writes queued behind
        each other past their timeout. The statement runs in autocommit (a cancelled caller
        cannot leave a transaction open, module docstring), and rows of one key keep their
        order (the last one written wins). A batch that fails on one row's values is written
        again a row at a time, so that row fails alone."""
        rows = self._rows
        try:
            while rows:
                batch: list[_RowWrite] = []
                size = 0
                while rows and len(batch) < WRITE_BATCH:
                    waiting = rows[0]
                    row = waiting.row
                    if batch and row is not None and size + row[2] > self.wal_budget // 2:
                        break
                    rows.popleft()
                    if row is not None and not waiting.written.done():
                        batch.append(waiting)
                        size += row[2]
                if batch:
                    await self._write_settled(batch, size)
        finally:
            self._row_writer = None
            if rows:  # (stopped by a close: nothing waits for the rest)
                for waiting in rows:
                    if not waiting.written.done():
                        waiting.written.set_exception(TierUnavailable("L3 writes stopped"))
                rows.clear()

    async def _write_settled(self, batch: list[_RowWrite], size: int) -> None:
        """Write ``batch`` and give each caller still waiting the outcome. A batch of several
        that failed on a row's values is written again a row at a time, each its own outcome."""
        try:
            async with self._write_lock:
                written = await self._write_batch(batch, size)
        except _ROW_ERRORS as exc:
            if len(batch) == 1:
                self._settle_writes(batch, exc)
                return
            try:
                for waiting in batch:
                    if waiting.row is not None:
                        await self._write_settled([waiting], waiting.row[2])
            except BaseException:  # (the tier closing mid-way: the rest are not left waiting)
                self._settle_writes(batch, TierUnavailable("L3 writes stopped"))
                raise
        except Exception as exc:  # noqa: BLE001 - each caller gets it (and counts it)
            self._settle_writes(batch, exc)
        except BaseException:  # (the tier closing: what waits goes with it)
            self._settle_writes(batch, TierUnavailable("L3 writes stopped"))
            raise
        else:
            self.rows_written += written
            self._settle_writes(batch, None)

    @staticmethod
    def _settle_writes(batch: list[_RowWrite], failure: Exception | None) -> None:
        for waiting in batch:
            if not waiting.written.done():
                if failure is None:
                    waiting.written.set_result(None)
                else:
                    waiting.written.set_exception(_own_copy(failure))

    async def _write_batch(self, batch: list[_RowWrite], size: int) -> int:
        """Make room, write the rows of ``batch`` whose callers still wait, tidy up; all on
        one writer connection (a file reopened meanwhile is not written: TierUnavailable).
        Returns how many rows were written."""
        writer = self._writer_conn()
        now = time.time()
        count = 0

        async def insert(conn: aiosqlite.Connection) -> None:
            # The rows still wanted are chosen here, in the loop step that queues the
            # statement on the writer's thread: a caller that gave up before is not written,
            # and anything queued after (a purge's delete) runs after it. One statement for
            # the batch: the triggers index the tags with it (module docstring), and the
            # writer's thread takes the GIL back once for it, not once a row (under a
            # saturated event loop each take can wait a switch interval).
            nonlocal count
            rows = [w.row for w in batch if w.row is not None and not w.written.done()]
            count = len(rows)
            if rows:
                await conn.execute(
                    _UPSERT % ", ".join(["(?, ?, ?, ?, ?, ?)"] * len(rows)),
                    [value for row in rows for value in row],
                )

        self.write_batches += 1
        await self._on_writer(lambda w: self._make_room(w, size), writer)
        await self._insert(insert, size, writer)
        await self._on_writer(lambda w: self._maintain(w, now), writer)
        return count

    async def _insert(
        self,
        insert: Callable[[aiosqlite.Connection], Any],
        size: int,
        writer: aiosqlite.Connection,
    ) -> None:
        try:
            await self._on_writer(insert, writer)
        except sqlite3.OperationalError as exc:
            if not _is_full(exc):
                raise
            # The disk is full: make room (least recently used first), then try once more.
            try:
                await self._on_writer(lambda w: self._evict(w, size * 2), writer)
                await self._on_writer(insert, writer)
            except sqlite3.OperationalError as exc2:
                if _is_full(exc2):
                    raise StorageFull(f"L3 {self.path}: {exc2}") from None
                raise

    async def _make_room(self, writer: aiosqlite.Connection, size: int) -> None:
        excess = await self._used_bytes(writer) + size - self.data_budget
        if excess > 0:
            await self._evict(writer, excess + self.data_budget // 10)

    async def _maintain(self, writer: aiosqlite.Connection, now: float) -> None:
        if self._touched and now - self._last_touch_flush >= _TOUCH_FLUSH_INTERVAL:
            await self._flush_touches(writer, now)
        if now - self._last_sweep >= _EXPIRY_SWEEP_INTERVAL:
            self._last_sweep = now
            # Through the expires_at index, a bounded batch; a full batch sweeps again soon.
            cursor = await writer.execute(SWEEP_SQL, (now, _EXPIRY_BATCH))
            if cursor.rowcount >= _EXPIRY_BATCH:
                self._last_sweep = 0.0
            await cursor.close()
        await self._refresh_stats()
        await self._bound_wal(writer)

    async def _used_bytes(self, writer: aiosqlite.Connection) -> int:
        """Bytes of the main file's pages in use (free pages are reused before it grows)."""
        rows = list(
            await writer.execute_fetchall(
                "SELECT (SELECT page_count FROM pragma_page_count())"
                " - (SELECT freelist_count FROM pragma_freelist_count())"
            )
        )
        return int(rows[0][0]) * self._page_size if rows else 0

    async def _flush_touches(self, writer: aiosqlite.Connection, now: float) -> None:
        """Write when the entries read since the last flush were read (the order eviction
        goes by): ``now`` for all of them, a statement per ``_BATCH`` keys. Within one flush
        their order is not kept (read within a second or so of each other); against every
        other entry it is. One statement a key took the GIL back once a key in the writer's
        thread, which a saturated event loop makes wait up to a switch interval each."""
        touched, self._touched = self._touched, set()
        self._last_touch_flush = now
        keys = list(touched)
        try:
            for start in range(0, len(keys), _BATCH):
                chunk = keys[start : start + _BATCH]
                await writer.execute(
                    f"UPDATE entries SET accessed_at = ? WHERE key IN ({','.join('?' * len(chunk))})",
                    (now, *chunk),
                )
        except BaseException:
            # Not written (or not all): kept for the next flush, within the bound.
            for key in keys:
                if len(self._touched) >= _MAX_PENDING_TOUCHES:
                    break
                self._touched.add(key)
            raise

    async def _evict(self, writer: aiosqlite.Connection, need: int) -> None:
        """Delete least recently used entries worth about ``need`` bytes of pages; bounded
        statements, each through the accessed_at index. The reads not yet written go first:
        an entry read since the last flush is not among the least recently used."""
        if self._touched:
            try:
                await self._flush_touches(writer, time.time())
            except sqlite3.OperationalError as exc:
                if not _is_full(exc):
                    raise
                # A full disk: the marks wait (kept), and the eviction goes on - it is what
                # makes the room they need.
        for _ in range(_EVICT_STATEMENTS):
            if need <= 0 or self.entries == 0:
                return
            average = max(1, self.bytes // max(1, self.entries))
            count = min(_EVICT_BATCH, need // average + 1)
            before = self.bytes
            await writer.execute(EVICT_SQL, (count,))
            await self._refresh_stats()
            need -= max(average * count, before - self.bytes)

    async def _bound_wal(self, writer: aiosqlite.Connection) -> None:
        try:
            wal = os.stat(self.path + "-wal").st_size
        except FileNotFoundError:
            return
        if wal > self.wal_budget:
            # The automatic checkpoint could not reset the WAL (a reader was in it): wait
            # for readers (busy timeout) and truncate. Off the request path: on the writer.
            await writer.execute_fetchall("PRAGMA wal_checkpoint(TRUNCATE)")

    async def _refresh_stats(self) -> None:
        writer = self._writer
        if writer is None:
            raise TierUnavailable("L3 file unavailable")
        rows = await writer.execute_fetchall("SELECT bytes, entries FROM stats WHERE id = 0")
        for size, count in rows:
            self.bytes, self.entries = int(size), int(count)

    def _removal_missed(
        self, keys: Sequence[CacheKey], tags: Sequence[str], soft_at: float | None
    ) -> TierUnavailable:
        """What this removal was for may be in the file when it is opened again: it is applied
        then (_open); past MAX_MISSED_REMOVALS keys and tags, the file is discarded instead."""
        if not self._missed_purge:
            self._missed_count += len(keys) + len(tags)
            if self._missed_count > MAX_MISSED_REMOVALS:
                self._missed_purge = True
                self._missed, self._missed_count = [], 0
            else:
                self._missed.append((tuple(keys), tuple(tags), soft_at))
        return TierUnavailable("L3 file unavailable")

    async def delete(self, key: CacheKey) -> bool:
        self._touched.discard(key.digest)
        if not self.available:
            raise self._removal_missed((key,), (), None)
        try:
            return await self._delete(key)
        except TierUnavailable:  # the file was being reopened under it
            raise self._removal_missed((key,), (), None) from None

    async def _delete(self, key: CacheKey) -> bool:

        async def remove(writer: aiosqlite.Connection) -> bool:
            cursor = await writer.execute("DELETE FROM entries WHERE key = ?", (key.digest,))
            deleted = cursor.rowcount > 0
            await cursor.close()
            if deleted:
                await self._refresh_stats()
            return deleted

        return bool(await self._on_writer(remove))

    async def purge(
        self, keys: Sequence[CacheKey], tags: Sequence[str], soft_at: float | None
    ) -> int:
        if not self.available:
            raise self._removal_missed(keys, tags, soft_at)
        try:
            return int(await self._on_writer(lambda w: self._purge(w, keys, tags, soft_at)))
        except TierUnavailable:  # the file was being reopened under it
            raise self._removal_missed(keys, tags, soft_at) from None

    async def _purge(
        self,
        writer: aiosqlite.Connection,
        keys: Sequence[CacheKey],
        tags: Sequence[str],
        soft_at: float | None,
    ) -> int:
        digests = [key.digest for key in keys]
        tag_ids = [self.keys.tag_id(tag) for tag in tags]
        changed = 0
        if soft_at is None:
            # Each DELETE is one statement; the triggers drop the tag rows and fix the stats.
            for start in range(0, len(digests), _BATCH):
                batch = digests[start : start + _BATCH]
                cursor = await writer.execute(
                    f"DELETE FROM entries WHERE key IN ({','.join('?' * len(batch))})", batch
                )
                changed += max(0, cursor.rowcount)
                await cursor.close()
            for tag_id in tag_ids:
                cursor = await writer.execute(
                    "DELETE FROM entries WHERE key IN (SELECT key FROM tags WHERE tag = ?)",
                    (tag_id,),
                )
                changed += max(0, cursor.rowcount)
                await cursor.close()
        else:
            changed = await self._soft_purge(writer, keys, tag_ids, soft_at)
        for digest in digests:
            self._touched.discard(digest)
        await self._refresh_stats()
        return changed

    async def _soft_purge(
        self,
        writer: aiosqlite.Connection,
        keys: Sequence[CacheKey],
        tag_ids: list[str],
        soft_at: float,
    ) -> int:
        """Rewrite each entry marked stale, a few at a time (entries can be megabytes)."""
        materials: dict[str, str | None] = {key.digest: key.material for key in keys}
        for tag_id in tag_ids:
            for (digest,) in await writer.execute_fetchall(
                "SELECT key FROM tags WHERE tag = ?", (tag_id,)
            ):
                materials.setdefault(str(digest), None)
        digests = list(materials)
        changed = 0
        for start in range(0, len(digests), _SOFT_BATCH):
            batch = digests[start : start + _SOFT_BATCH]
            updates: list[tuple[bytes, int, str, bytes]] = []
            for digest, value in await writer.execute_fetchall(
                f"SELECT key, value FROM entries WHERE key IN ({','.join('?' * len(batch))})", batch
            ):
                if type(value) is not bytes:
                    continue  # not a record: never served (its next read drops it as corrupt)
                data = value
                encoded = mark_stale_encoded(
                    data, materials.get(str(digest)), str(digest), self.keys.namespace, soft_at
                )
                if encoded is not None:
                    updates.append((encoded, len(encoded), str(digest), data))
            if updates:
                # Compare-and-set on the old value: an entry rewritten meanwhile is left alone.
                cursor = await writer.executemany(
                    "UPDATE entries SET value = ?, size = ? WHERE key = ? AND value = ?", updates
                )
                changed += max(0, cursor.rowcount)
                await cursor.close()
        return changed

    def watch(self, metrics: Metrics) -> None:
        metrics.l3_bytes.set_function(lambda: self.bytes)
        metrics.l3_entries.set_function(lambda: self.entries)
        metrics.l3_file_bytes.set_function(lambda: _file_bytes(self.path))

    async def close(self) -> None:
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            await asyncio.wait([supervisor])  # (re-raises only our own cancellation)
        row_writer = self._row_writer
        if row_writer is not None:
            # The batch in flight ends (its statements are queued on the writer's thread);
            # the rows still waiting fail (TierUnavailable), as a write to a closed file does.
            row_writer.cancel()
            await asyncio.wait([row_writer])
        self.available = False
        await self._close_connections()
        if self._batcher is not None:
            self._batcher.cancel()
        self._send_waiting()  # what still waits fails at once: the reader is gone
        pending = list(self._trips)
        if pending:
            # They fail what still waits (the reader is gone) as soon as the batches in flight
            # return - at once, unless a statement outlived the close's own bound above.
            await asyncio.wait(pending, timeout=max(1.0, self.read_timeout))

    async def _close_connections(self) -> None:
        self._reader_raw = None
        for attr in ("_reader", "_writer"):
            conn: aiosqlite.Connection | None = getattr(self, attr)
            setattr(self, attr, None)
            if conn is not None:
                try:
                    # Queued statements finish first; each is bounded by its busy timeout.
                    async with asyncio.timeout(max(5.0, 4 * self.write_timeout)):
                        await conn.close()
                except Exception as exc:  # noqa: BLE001 - closing must never stop shutdown or a recovery
                    log.warning("closing L3 %s connection: %r", attr.strip("_"), exc)
