"""Readers/writers for tierproxy's storage layout (README "Configuration" and
docs/ARCHITECTURE.md; tierproxy.keys for the key digests).

Cache key material is the normalised ``path?query`` of the request; the L2/L3 id is the
digest of that material in the origin's namespace (origin identity + entry format version,
``tierproxy.keys.KeySpace``), so every helper takes the origin URL the proxy was given; the
Redis key is ``TIERPROXY_KEY_PREFIX + "tierproxy:" + id``; SQLite holds
``entries(key TEXT PRIMARY KEY, value BLOB, size INTEGER, expires_at REAL, accessed_at REAL)``.

The SQLite helpers use the stdlib ``sqlite3`` with a short busy timeout: they are quick
reads/writes from the test's side while the proxy holds its own connection (WAL mode).
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from collections import UserString
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import http_sf

if TYPE_CHECKING:
    from tierproxy.keys import KeySpace
    from tierproxy.tiers.sqlite import SQLiteTier

__all__ = [
    "REDIS_PREFIX",
    "REDIS_PURGE_NAMES",
    "TIER_MEMBER",
    "CacheStatus",
    "answering_member",
    "key_id",
    "parse_cache_status",
    "purge_channel",
    "redis_key",
    "redis_tag_key",
    "redis_tier_keys",
    "sqlite_count",
    "sqlite_exclusive_lock",
    "sqlite_keys",
    "sqlite_readers_locked_out",
    "sqlite_row",
    "sqlite_set_value",
    "tag_id",
    "tier_members",
]

REDIS_PREFIX = "tierproxy:"
# The replicas' purge log and leases (tierproxy.tiers.purge_log.PurgeLog, under the origin's id):
# not cache entries.
REDIS_PURGE_NAMES = (b":purge-log", b":replicas", b":replicas:applied", b":replicas:lost")


def purge_channel(origin: str, prefix: str = "") -> str:
    """The replicas' purge channel of ``origin``'s deployments."""
    from tierproxy.keys import KeySpace

    return f"{prefix}{REDIS_PREFIX}{KeySpace(origin).origin_id}:invalidate"


def key_id(material: str, origin: str) -> str:
    """The L2/L3 id for cache key material such as ``"/a"`` or ``"/a?b=1"`` of ``origin``."""
    from tierproxy.keys import KeySpace

    return KeySpace(origin).key(material).digest


def redis_key(material: str, origin: str, prefix: str = "") -> str:
    """The Redis name of an entry; ``prefix`` is the proxy's TIERPROXY_KEY_PREFIX."""
    return prefix + REDIS_PREFIX + key_id(material, origin)


def tag_id(tag: str, origin: str) -> str:
    """The id of surrogate key ``tag`` of ``origin`` (Redis tag sets, SQLite ``tags`` rows)."""
    from tierproxy.keys import KeySpace

    return KeySpace(origin).tag_id(tag)


def redis_tag_key(tag: str, origin: str, prefix: str = "") -> str:
    """The Redis name of ``tag``'s set of entry ids."""
    return prefix + REDIS_PREFIX + "tag:" + tag_id(tag, origin)


def redis_tier_keys(client: Any) -> list[bytes]:
    """Every ``tierproxy:*`` key in the (sync redis-py) client's database but the purge log's
    and the replicas' leases (:data:`REDIS_PURGE_NAMES`)."""
    keys = client.scan_iter(match=REDIS_PREFIX + "*", count=1000)
    return sorted(key for key in keys if not key.endswith(REDIS_PURGE_NAMES))


async def open_l3(path: Path, keys: KeySpace, read_timeout: float) -> SQLiteTier:
    """A real L3 tier on ``path``, open and available (write timeout 1 s, 100 MB bound)."""
    from tierproxy.tiers.sqlite import SQLiteTier

    tier = SQLiteTier(
        str(path),
        max_bytes=10**8,
        read_timeout=read_timeout,
        write_timeout=1.0,
        check_interval=0.05,
        keys=keys,
    )
    await tier.open()
    assert tier.available
    return tier


def _connect(path: Path | str, timeout: float = 2.0) -> sqlite3.Connection:
    return sqlite3.connect(str(path), timeout=timeout, isolation_level=None)


def _table_exists(conn: sqlite3.Connection) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'entries'"
    ).fetchone()
    return row is not None


def sqlite_row(path: Path | str, material: str, origin: str) -> dict[str, Any] | None:
    """The L3 row for ``material`` as a dict, or None (also when file/table don't exist)."""
    if not Path(path).exists():
        return None
    conn = _connect(path)
    try:
        if not _table_exists(conn):
            return None
        cur = conn.execute(
            "SELECT key, value, size, expires_at, accessed_at FROM entries WHERE key = ?",
            (key_id(material, origin),),
        )
        row = cur.fetchone()
        if row is None:
            return None
        return dict(zip(("key", "value", "size", "expires_at", "accessed_at"), row))
    finally:
        conn.close()


def sqlite_keys(path: Path | str) -> list[str]:
    if not Path(path).exists():
        return []
    conn = _connect(path)
    try:
        if not _table_exists(conn):
            return []
        return sorted(r[0] for r in conn.execute("SELECT key FROM entries"))
    finally:
        conn.close()


def sqlite_count(path: Path | str) -> int:
    return len(sqlite_keys(path))


def sqlite_set_value(path: Path | str, material: str, value: bytes, origin: str) -> int:
    """Overwrite the stored value of ``material``'s row; returns the number of rows changed."""
    conn = _connect(path)
    try:
        cur = conn.execute(
            "UPDATE entries SET value = ? WHERE key = ?", (value, key_id(material, origin))
        )
        return cur.rowcount
    finally:
        conn.close()


@contextlib.contextmanager
def sqlite_exclusive_lock(path: Path | str, *, acquire_timeout: float = 3.0) -> Iterator[None]:
    """Hold ``BEGIN EXCLUSIVE`` on a second connection for the duration of the block.

    (chmod does not lock anything as root; a competing transaction does.)
    Always rolls back and closes in ``finally``.
    """
    conn = _connect(path, timeout=acquire_timeout)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()


# The WAL-index's lock bytes (SQLite's wal.c: WALINDEX_LOCK_OFFSET 120, WAL_NREADER 5 read
# marks after the write, checkpoint and recovery locks): 8 bytes from offset 120 of -shm.
_SHM_LOCKS = (120, 8)
_LOCK_HOLDER = (
    "import fcntl, os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDWR)\n"
    "fcntl.lockf(fd, fcntl.LOCK_EX, int(sys.argv[2]), int(sys.argv[3]))\n"
    "print('locked', flush=True)\n"
    "sys.stdin.readline()\n"
)


@contextlib.contextmanager
def sqlite_readers_locked_out(path: Path | str) -> Iterator[None]:
    """Stall every read of the WAL-mode file at ``path`` for the duration of the block.

    In WAL mode a competing transaction (``sqlite_exclusive_lock``) does not stop readers;
    another process holding all the WAL-index's lock bytes does: a read retries with sleeps
    (about 10 s, never calling the progress handler) and then fails with "locking protocol".
    POSIX record locks are per process, so a child process holds them.
    """
    offset, length = _SHM_LOCKS
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(path) + "-shm", str(length), str(offset)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield
    finally:
        if holder.stdin is not None:
            holder.stdin.close()  # the child reads EOF and exits, releasing the locks
        holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()


@dataclass(frozen=True)
class CacheStatus:
    """One member of an RFC 9211 ``Cache-Status`` list: ``cache; param; key=value``, as an
    RFC 8941 structured-field parser (``http_sf``) reads it: tokens and strings as ``str``,
    integers as ``int``, bare parameters as ``True``."""

    cache: str
    params: dict[str, str | bool | int]

    @property
    def hit(self) -> bool:
        return self.params.get("hit") is True

    @property
    def ttl(self) -> int | None:
        value = self.params.get("ttl")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def detail(self) -> str | None:
        value = self.params.get("detail")
        return value if isinstance(value, str) else None

    @property
    def fwd(self) -> str | None:
        value = self.params.get("fwd")
        return value if isinstance(value, str) else None

    @property
    def fwd_status(self) -> int | None:
        value = self.params.get("fwd-status")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def stored(self) -> bool:
        return self.params.get("stored") is True

    @property
    def collapsed(self) -> bool:
        return self.params.get("collapsed") is True


def _bare(value: object) -> str | bool | int:
    if isinstance(value, bool | int):
        return value
    if isinstance(value, str | UserString):  # http_sf's Token is a UserString
        return str(value)
    raise AssertionError(f"unexpected Cache-Status parameter value {value!r}")


def parse_cache_status(value: str | None) -> list[CacheStatus]:
    """Parse a ``Cache-Status`` header with a real RFC 8941 parser (``http_sf``): a value that
    is not a valid structured-field List fails the test."""
    if not value:
        return []
    try:
        parsed = http_sf.parse(value.encode("ascii"), tltype="list")
    except http_sf.StructuredFieldError as exc:
        raise AssertionError(f"Cache-Status {value!r} is not an RFC 8941 List: {exc}") from None
    assert isinstance(parsed, list), parsed
    members: list[CacheStatus] = []
    for member in parsed:
        # Every member is an Item with parameters (parsed: a pair), never an Inner List.
        assert isinstance(member, tuple) and len(member) == 2, member
        item, params = member
        assert isinstance(item, str | UserString), f"Cache-Status member {item!r} is no token"
        assert isinstance(params, dict), member
        members.append(CacheStatus(str(item), {k: _bare(v) for k, v in params.items()}))
    return members


TIER_MEMBER = "tierproxy-"


def tier_members(value: str | None) -> dict[str, CacheStatus]:
    """tierproxy's members of a ``Cache-Status`` header by tier (``l1``...), in header order
    (from the origin towards the client); checks each is named ``tierproxy-<tier>``, once,
    after any upstream cache's members, and in RFC 9211 §2 order (L3, L2, L1)."""
    members = parse_cache_status(value)
    ours: dict[str, CacheStatus] = {}
    for member in members:
        if member.cache.startswith(TIER_MEMBER):
            tier = member.cache.removeprefix(TIER_MEMBER)
            assert tier not in ours, f"two members for {tier} in {value!r}"
            ours[tier] = member
        else:
            assert not ours, f"an upstream member after tierproxy's in {value!r}"
    assert list(ours) == sorted(ours, reverse=True), f"tiers out of order in {value!r}"
    return ours


def answering_member(value: str | None) -> CacheStatus | None:
    """The tierproxy member that tells how the request was answered: the one with ``hit``,
    else the one with ``fwd-status`` (it forwarded to the origin), else the one closest to
    the origin (a failure: nothing came back)."""
    ours = list(tier_members(value).values())
    for test in (lambda m: m.hit, lambda m: m.fwd_status is not None, lambda m: True):
        for member in ours:
            if test(member):
                return member
    return None
