"""The cached entry: what every tier stores and every hit serves."""

from __future__ import annotations

from dataclasses import dataclass, field

from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["Entry", "Headers"]

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored response.

    Timestamps are wall-clock epoch seconds: entries cross processes (Redis, SQLite).
    ``stored_at`` is when the origin generated the response (corrected for any ``Age`` it
    arrived with), so ``Age`` = now - stored_at (RFC 9111 §4.2.3).
    """

    key: str  # the normalised key material; checked on decode so one URL never gets another's bytes
    status: int
    headers: Headers  # end-to-end response headers, as the origin sent them (minus hop-by-hop)
    body: bytes
    stored_at: float
    fresh_until: float  # fresh while now < fresh_until
    stale_until: float  # may be served stale on origin failure while now < stale_until
    swr_until: float  # may be served stale while revalidating in the background (RFC 5861)
    expires_at: float  # drop from storage after this (kept past stale_until for revalidation)
    etag: str | None = None
    last_modified: str | None = None
    vary: Headers = ()  # request header (lower-case name, value) pairs this variant was chosen by
    tags: tuple[str, ...] = ()  # surrogate keys
    # Built once per entry, never per hit: a header multidict ready to copy into a response.
    response_headers: CIMultiDictProxy[str] = field(
        init=False, repr=False, compare=False, hash=False
    )
    size: int = field(init=False, repr=False, compare=False, hash=False)
    # The status line and stored header lines as HTTP/1.1 bytes, built by the connection
    # handler's hit path (tierproxy.hits) on the entry's first hit there, then reused.
    wire_head: bytes | None = field(default=None, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        headers: CIMultiDict[str] = CIMultiDict(self.headers)
        object.__setattr__(self, "response_headers", CIMultiDictProxy(headers))
        size = len(self.body) + len(self.key) + 200
        for name, value in self.headers:
            size += len(name) + len(value) + 4
        for name, value in self.vary:
            size += len(name) + len(value) + 4
        object.__setattr__(self, "size", size)

    def age(self, now: float) -> int:
        return max(0, int(now - self.stored_at))

    def is_fresh(self, now: float) -> bool:
        return now < self.fresh_until
