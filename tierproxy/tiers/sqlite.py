"""L3: an SQLite file on local disk, through aiosqlite.

Two connections in WAL mode: a reader for lookups and a writer that every change goes through
(single writer path), so a slow write never queues in front of a read. Both run in autocommit
(``isolation_level=None``) and each change is one statement, so a cancelled write cannot leave
a transaction - and its lock - open (PITFALLS.md). The total size is kept in ``stats`` by
triggers, so it stays right when several processes share the file.

Surrogate keys: an entry row carries its tags (sha256 digests, a JSON array) and triggers keep
``tags(tag, key)`` in step with ``entries`` - rows appear with the entry, change when it is
overwritten, and go when it is deleted for any reason (purge, expiry sweep, eviction). The
index is therefore never out of date, and it is maintained by the single statement that writes
the entry (no multi-statement transaction to leave open on a cancel).

Schema versions (``PRAGMA user_version``): 1 had no tags. Opening a version-1 file adds the
column and drops its entries, whose tags were never indexed (a tag purge would miss them); a
cache file is disposable. A file from a newer tierproxy is moved aside like a corrupt one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from collections.abc import Sequence

import aiosqlite

from .. import codec
from ..entry import Entry
from ..keys import CacheKey, KeySpace
from .base import Blob, BytesBackend, decode_unkeyed, mark_stale

__all__ = ["SQLiteTier", "SQLiteOpenError"]

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
_EVICT_BATCH = 200


class SQLiteOpenError(RuntimeError):
    """The L3 file cannot be opened or created; start-up stops with this message."""


class _NewerSchema(sqlite3.DatabaseError):
    """The file was written by a newer tierproxy (treated like a file that is not a database)."""


class SQLiteTier(BytesBackend):
    name = "l3"

    def __init__(self, path: str, *, max_bytes: int, read_timeout: float, write_timeout: float,
                 keys: KeySpace) -> None:
        self.path = path
        # Rows are keyed by CacheKey.digest (origin + format version + material); tag rows by
        # this origin's tag ids: a file reused with another origin or format shares nothing.
        self.keys = keys
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self._reader: aiosqlite.Connection | None = None
        self._writer: aiosqlite.Connection | None = None
        self._touched: dict[str, float] = {}
        self._last_touch_flush = 0.0
        self._last_sweep = 0.0
        self.bytes = 0
        self.entries = 0

    async def open(self) -> None:
        try:
            await self._open()
        except sqlite3.DatabaseError as exc:
            if not isinstance(exc, _NewerSchema) and "not a database" not in str(exc) and (
                "malformed" not in str(exc)
            ):
                await self.close()
                raise SQLiteOpenError(
                    f"TIERPROXY_SQLITE_PATH={self.path!r}: cannot open the cache file: {exc}"
                ) from None
            # A cache file is disposable: keep the bad one for inspection, start afresh.
            await self.close()
            aside = f"{self.path}.corrupt-{int(time.time())}"
            log.warning("L3 file %s is not a usable database (%s); moved to %s", self.path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.replace(self.path + suffix, aside + suffix)
            try:
                await self._open()
            except sqlite3.Error as exc2:
                await self.close()
                raise SQLiteOpenError(
                    f"TIERPROXY_SQLITE_PATH={self.path!r}: cannot open the cache file: {exc2}"
                ) from None
        except OSError as exc:
            await self.close()
            raise SQLiteOpenError(
                f"TIERPROXY_SQLITE_PATH={self.path!r}: cannot open the cache file: {exc}"
            ) from None

    async def _open(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise SQLiteOpenError(
                f"TIERPROXY_SQLITE_PATH={self.path!r}: directory {directory!r} does not exist"
            )
        # The busy timeout is the longest a locked file can hold the worker thread: keep it
        # within the tier's budget (PITFALLS.md: the default is 5 s).
        self._writer = await aiosqlite.connect(
            self.path, timeout=self.write_timeout, isolation_level=None
        )
        await self._writer.execute("PRAGMA journal_mode=WAL")
        await self._writer.execute("PRAGMA synchronous=NORMAL")
        await self._migrate(self._writer)
        await self._writer.executescript(_SCHEMA)
        await self._writer.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._reader = await aiosqlite.connect(
            self.path, timeout=self.read_timeout, isolation_level=None
        )
        await self._reader.execute("PRAGMA query_only=1")
        await self._refresh_stats()

    @staticmethod
    async def _migrate(writer: aiosqlite.Connection) -> None:
        rows = await writer.execute_fetchall("PRAGMA user_version")
        version = int(next(iter(rows))[0]) if rows else 0
        if version > SCHEMA_VERSION:
            raise _NewerSchema(f"schema version {version} is newer than {SCHEMA_VERSION}")
        columns = {row[1] for row in await writer.execute_fetchall("PRAGMA table_info(entries)")}
        if columns and "tags" not in columns:
            log.warning("L3 file has schema version %d: adding the tag index and dropping its "
                        "entries (their surrogate keys were never indexed)", version)
            try:
                await writer.execute(
                    "ALTER TABLE entries ADD COLUMN tags TEXT NOT NULL DEFAULT '[]'"
                )
            except sqlite3.OperationalError as exc:  # another process migrated it first
                if "duplicate column" not in str(exc):
                    raise
            await writer.execute("DELETE FROM entries")

    def _interrupt_reader(self) -> None:
        # sqlite3.Connection.interrupt() is thread-safe: it stops a query the worker thread is
        # running, so a timed-out lookup does not keep every later lookup queued behind it.
        conn = getattr(self._reader, "_connection", None)
        if conn is not None:
            try:
                conn.interrupt()
            except sqlite3.Error:  # already closed
                pass

    async def get_bytes(self, key: CacheKey) -> bytes | None:
        reader = self._reader
        if reader is None:
            raise sqlite3.OperationalError("L3 is closed")
        try:
            rows = await reader.execute_fetchall(
                "SELECT value, expires_at FROM entries WHERE key = ?", (key.digest,)
            )
        except asyncio.CancelledError:
            self._interrupt_reader()
            raise
        for value, expires_at in rows:
            now = time.time()
            if expires_at <= now:
                return None
            if len(self._touched) < _MAX_PENDING_TOUCHES:
                self._touched[key.digest] = now
            return bytes(value)
        return None

    def _writer_conn(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise sqlite3.OperationalError("L3 is closed")
        return self._writer

    async def set(self, key: CacheKey, entry: Entry, blob: Blob) -> None:
        writer = self._writer_conn()
        data = blob.data
        if len(data) > self.max_bytes:
            return
        now = time.time()
        tags = json.dumps([self.keys.tag_id(tag) for tag in entry.tags]) if entry.tags else "[]"
        # One statement: the triggers index the tags with it (module docstring).
        await writer.execute(
            "INSERT INTO entries (key, value, size, expires_at, accessed_at, tags)"
            " VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value, size = excluded.size,"
            " expires_at = excluded.expires_at, accessed_at = excluded.accessed_at,"
            " tags = excluded.tags",
            (key.digest, data, len(data), entry.expires_at, now, tags),
        )
        await self._maintain(now)

    async def _maintain(self, now: float) -> None:
        writer = self._writer_conn()
        if self._touched and now - self._last_touch_flush >= _TOUCH_FLUSH_INTERVAL:
            touched, self._touched = self._touched, {}
            self._last_touch_flush = now
            await writer.executemany(
                "UPDATE entries SET accessed_at = ? WHERE key = ?",
                [(t, k) for k, t in touched.items()],
            )
        if now - self._last_sweep >= _EXPIRY_SWEEP_INTERVAL:
            self._last_sweep = now
            await writer.execute("DELETE FROM entries WHERE expires_at <= ?", (now,))
        await self._refresh_stats()
        # Evict least recently used entries until comfortably under the bound; bounded loop.
        if self.bytes <= self.max_bytes:
            return
        target = int(self.max_bytes * 0.9)
        for _ in range(10_000):
            if self.bytes <= target or self.entries == 0:
                break
            await writer.execute(
                "DELETE FROM entries WHERE key IN"
                " (SELECT key FROM entries ORDER BY accessed_at LIMIT ?)",
                (_EVICT_BATCH,),
            )
            await self._refresh_stats()

    async def _refresh_stats(self) -> None:
        rows = await self._writer_conn().execute_fetchall("SELECT bytes, entries FROM stats WHERE id = 0")
        for size, count in rows:
            self.bytes, self.entries = int(size), int(count)

    async def delete(self, key: CacheKey) -> bool:
        self._touched.pop(key.digest, None)
        cursor = await self._writer_conn().execute("DELETE FROM entries WHERE key = ?", (key.digest,))
        deleted = cursor.rowcount > 0
        await cursor.close()
        if deleted:
            await self._refresh_stats()
        return deleted

    async def purge(self, keys: Sequence[CacheKey], tags: Sequence[str], soft_at: float | None) -> int:
        writer = self._writer_conn()
        digests = [key.digest for key in keys]
        tag_ids = [self.keys.tag_id(tag) for tag in tags]
        changed = 0
        if soft_at is None:
            # Each DELETE is one statement; the triggers drop the tag rows and fix the stats.
            for start in range(0, len(digests), _BATCH):
                batch = digests[start:start + _BATCH]
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
            self._touched.pop(digest, None)
        await self._refresh_stats()
        return changed

    async def _soft_purge(
        self, writer: aiosqlite.Connection, keys: Sequence[CacheKey], tag_ids: list[str],
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
            batch = digests[start:start + _SOFT_BATCH]
            updates: list[tuple[bytes, int, str, bytes]] = []
            for digest, value in await writer.execute_fetchall(
                f"SELECT key, value FROM entries WHERE key IN ({','.join('?' * len(batch))})", batch
            ):
                data = bytes(value)
                material = materials.get(str(digest))
                try:
                    entry = (codec.decode(data, material) if material is not None
                             else decode_unkeyed(data, str(digest), self.keys.namespace))
                except codec.CorruptEntry:
                    continue  # a lookup will find and delete it
                marked = mark_stale(entry, soft_at)
                if marked is not None:
                    encoded = codec.encode(marked)
                    updates.append((encoded, len(encoded), str(digest), data))
            if updates:
                # Compare-and-set on the old value: an entry rewritten meanwhile is left alone.
                cursor = await writer.executemany(
                    "UPDATE entries SET value = ?, size = ? WHERE key = ? AND value = ?", updates
                )
                changed += max(0, cursor.rowcount)
                await cursor.close()
        return changed

    async def close(self) -> None:
        for attr in ("_reader", "_writer"):
            conn: aiosqlite.Connection | None = getattr(self, attr)
            setattr(self, attr, None)
            if conn is not None:
                try:
                    await conn.close()
                except Exception as exc:  # closing must never stop shutdown
                    log.warning("closing L3 %s connection: %r", attr.strip("_"), exc)
