"""HTTP caching decisions (RFC 9111, RFC 5861). Pure functions: no I/O, no clocks read here.

Everything that decides *whether* something may be stored or served lives in this module, so
it can be tested with tables of headers -> outcome.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from multidict import CIMultiDict, CIMultiDictProxy

from .conditionals import weakly_equal
from .directives import (
    DEFAULT_TARGETED_FIELDS,
    INVALID,
    age_seconds,
    delta_seconds,
    field_names,
    http_date,
    targeted_directives,
)
from .entry import Entry, Headers

__all__ = [
    "HOP_BY_HOP",
    "MAX_TAGS_PER_ENTRY",
    "MAX_TAG_LENGTH",
    "NOT_STORED",
    "CachePolicy",
    "StoreDecision",
    "bypass_reason",
    "decide_storage",
    "end_to_end",
    "freshen",
    "may_share_unstored",
    "parse_cache_control",
    "parse_tags",
    "response_directives",
]

AnyHeaders = CIMultiDict[str] | CIMultiDictProxy[str]

# RFC 9110 §7.6.1: hop-by-hop fields, plus the legacy ones every proxy strips.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Never stored with an entry: recomputed per response (Age, Content-Length), or never replayed
# to another client (Set-Cookie: a response carrying it is not stored at all; this is belt and
# braces), or for the cache only (Surrogate-Key), or replaced by tierproxy's own on every
# response (X-Cache, X-Request-ID: the origin's are about another hop and another request).
# An upstream Cache-Status is stored: tierproxy appends its member to it (RFC 9211 §2).
NOT_STORED = frozenset(
    {
        "age",
        "content-length",
        "set-cookie",
        "set-cookie2",
        "surrogate-key",
        "surrogate-control",
        "x-cache",
        "x-request-id",
    }
)

# RFC 9111 §3: any final status may be stored when the response carries explicit freshness
# (max-age, s-maxage, Expires) or is marked public - except 206 and 304, which are never
# stored as a complete entry. The statuses whose semantics this cache understands (RFC 9111
# §5.2.2.3, must-understand: only these are stored, and then no-store is overridden):
UNDERSTOOD_STATUSES = frozenset(
    {200, 203, 204, 300, 301, 302, 303, 307, 308, 404, 405, 410, 414, 501}
)
# §4.2.2: the heuristically cacheable statuses, given TIERPROXY_DEFAULT_TTL when the origin
# states no freshness (any other status only when it is marked public).
HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
_NEVER_STORED_STATUSES = frozenset({206, 304})


@dataclass(frozen=True, slots=True)
class CachePolicy:
    default_ttl: float
    max_stale: float
    # TIERPROXY_MAX_TTL: no freshness lifetime (and no stale-if-error / stale-while-revalidate
    # window an origin grants) exceeds it, whatever Expires (year 9999) or max-age says.
    max_ttl: float = 31536000.0
    # TIERPROXY_TARGETED_FIELDS (RFC 9213): lower-cased field names, first match wins; the
    # one present and valid replaces Cache-Control and Expires for this cache. Empty: none.
    targeted_fields: tuple[str, ...] = DEFAULT_TARGETED_FIELDS


@dataclass(frozen=True, slots=True)
class StoreDecision:
    storable: bool
    reason: str  # why not, for Cache-Status detail and logs; "" when storable
    stored_at: float = 0.0
    fresh_until: float = 0.0
    stale_until: float = 0.0
    swr_until: float = 0.0
    expires_at: float = 0.0
    # Fields left out of the stored copy: named by a qualified no-cache or private
    # (RFC 9111 §5.2.2.4, §5.2.2.7), lower-cased.
    strip: frozenset[str] = frozenset()


def parse_cache_control(values: Iterable[str]) -> dict[str, str | None]:
    """Parse Cache-Control field values into {directive: argument or None} (RFC 9111 §5.2).

    Directive names are case-insensitive; the first occurrence wins; quoted arguments are
    unquoted. Commas inside quotes do not split directives.
    """
    directives: dict[str, str | None] = {}
    for value in values:
        for part in _split_commas(value):
            name, sep, arg = part.partition("=")
            name = name.strip().lower()
            if not name:
                continue
            argument: str | None = None
            if sep:
                argument = arg.strip()
                if len(argument) >= 2 and argument[0] == argument[-1] == '"':
                    argument = argument[1:-1]
            directives.setdefault(name, argument)
    return directives


def _split_commas(value: str) -> list[str]:
    if '"' not in value:
        return value.split(",")
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in value:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _capped(seconds: float | None, limit: float) -> float | None:
    return None if seconds is None else min(seconds, limit)


def bypass_reason(method: str, headers: AnyHeaders, has_body: bool) -> str | None:
    """Why a request may not be answered from or stored in the cache; None if it may."""
    if method not in ("GET", "HEAD"):
        return "method"
    if has_body:
        # A "fat GET" carries content the key does not see; never cache what it returns.
        return "request-body"
    request_cc = parse_cache_control(headers.getall("Cache-Control", ()))
    if "no-store" in request_cc:
        return "request-no-store"
    # Request no-cache / max-age are deliberately not honoured: any client could otherwise
    # force every request through to the origin (RFC 9111 §5.2.1 makes them preferences).
    return None


def response_directives(
    response_headers: AnyHeaders, targeted_fields: Sequence[str] = DEFAULT_TARGETED_FIELDS
) -> tuple[dict[str, str | None], bool]:
    """The cache directives this cache obeys for a response, and whether they came from a
    targeted field (RFC 9213 §2.1: then Cache-Control and Expires are ignored)."""
    if targeted_fields:
        targeted = targeted_directives(
            targeted_fields, ((name, response_headers.getall(name, ())) for name in targeted_fields)
        )
        if targeted is not None:
            return targeted, True
    return parse_cache_control(response_headers.getall("Cache-Control", ())), False


def _lifetime(
    cc: Mapping[str, str | None],
    response_headers: AnyHeaders,
    targeted: bool,
    date: float | None,
    response_time: float,
) -> float | None:
    """RFC 9111 §4.2.1: s-maxage, then max-age, then Expires - Date; None when the response
    states no freshness. An invalid value (a negative or non-numeric delta, an Expires that is
    not an HTTP-date) means already stale: 0."""
    for name in ("s-maxage", "max-age"):
        if name in cc:
            seconds = delta_seconds(cc[name])
            return 0.0 if seconds is None or seconds == INVALID else seconds
    if targeted:
        return None  # RFC 9213 §2.1: a targeted field replaces Expires too
    expires_lines = response_headers.getall("Expires", ())
    if not expires_lines:
        return None
    expires = http_date(expires_lines[0], response_time)
    if expires is None:
        return 0.0  # RFC 9111 §5.3: an invalid date (e.g. "0") is in the past
    return max(0.0, expires - (date if date is not None else response_time))


def decide_storage(
    method: str,
    request_headers: AnyHeaders,
    status: int,
    response_headers: AnyHeaders,
    request_time: float,
    response_time: float,
    policy: CachePolicy,
) -> StoreDecision:
    """May this response be stored by a shared cache, and for how long (RFC 9111 §3, §4.2)."""
    if method != "GET":
        return StoreDecision(False, "method")
    if not 200 <= status <= 599 or status in _NEVER_STORED_STATUSES:
        return StoreDecision(False, "status")
    cc, targeted = response_directives(response_headers, policy.targeted_fields)
    if "must-understand" in cc:
        # §5.2.2.3: only a status whose caching rules this cache implements; no-store is then
        # to be ignored (it is there for caches that do not implement must-understand).
        if status not in UNDERSTOOD_STATUSES:
            return StoreDecision(False, "must-understand")
    elif "no-store" in cc:
        return StoreDecision(False, "no-store")
    private_fields = field_names(cc["private"]) if "private" in cc else frozenset()
    if "private" in cc and not private_fields:
        return StoreDecision(False, "private")  # §5.2.2.7: a shared cache must not store it
    no_cache_fields = field_names(cc["no-cache"]) if "no-cache" in cc else frozenset()
    no_cache = "no-cache" in cc and not no_cache_fields
    if "set-cookie" in response_headers or "set-cookie2" in response_headers:
        return StoreDecision(False, "set-cookie")
    if any(v.strip() == "*" for v in _vary_names(response_headers)):
        return StoreDecision(False, "vary-star")
    explicitly_shareable = "public" in cc or "s-maxage" in cc
    # RFC 9111 §3.5: responses to authenticated requests only with explicit permission.
    if "authorization" in request_headers and not (explicitly_shareable or "must-revalidate" in cc):
        return StoreDecision(False, "authorization")
    # Requests with cookies are personalised until the origin says otherwise: without an
    # explicit public / s-maxage, a default lifetime would be web cache deception.
    if "cookie" in request_headers and not explicitly_shareable:
        return StoreDecision(False, "cookie")

    # RFC 9111 §4.2.3: age the response already had when it arrived.
    date = http_date(response_headers.get("Date"), response_time)
    apparent_age = max(0.0, response_time - date) if date is not None else 0.0
    age_header = age_seconds(response_headers.getall("Age", ()))
    corrected_initial_age = max(apparent_age, age_header + (response_time - request_time))
    stored_at = response_time - corrected_initial_age

    lifetime = _lifetime(cc, response_headers, targeted, date, response_time)
    if no_cache:
        lifetime = 0.0  # §5.2.2.4: store, but revalidate before every use
    if lifetime is None:
        # §4.2.2: a heuristic lifetime only for the heuristically cacheable statuses, or a
        # response marked public.
        if status not in HEURISTIC_STATUSES and "public" not in cc:
            return StoreDecision(False, "no-freshness")
        if policy.default_ttl <= 0:
            return StoreDecision(False, "no-freshness")
        lifetime = policy.default_ttl
    lifetime = min(lifetime, policy.max_ttl)

    fresh_until = stored_at + lifetime
    stale_if_error = _capped(_delta(cc.get("stale-if-error")), policy.max_ttl)
    swr = _capped(_delta(cc.get("stale-while-revalidate")), policy.max_ttl)
    # §4.2.4 / §5.2.2.2 / §5.2.2.10: must-revalidate, proxy-revalidate and s-maxage forbid
    # serving stale, unless the origin explicitly grants stale-if-error (RFC 5861 §4).
    no_stale = "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc or no_cache
    if no_stale:
        stale_until = fresh_until + (stale_if_error or 0.0)
        swr_until = fresh_until
    else:
        stale_until = fresh_until + max(policy.max_stale, stale_if_error or 0.0)
        swr_until = fresh_until + (swr or 0.0)
    has_validators = "etag" in response_headers or "last-modified" in response_headers
    keep_for_revalidation = policy.max_stale if has_validators else 0.0
    expires_at = max(stale_until, swr_until, fresh_until + keep_for_revalidation)
    if expires_at <= response_time or not math.isfinite(expires_at):
        return StoreDecision(False, "expired")
    return StoreDecision(
        True,
        "",
        stored_at=stored_at,
        fresh_until=fresh_until,
        stale_until=stale_until,
        swr_until=swr_until,
        expires_at=expires_at,
        strip=private_fields | no_cache_fields,
    )


def _delta(value: str | None) -> float | None:
    """A delta-seconds argument where an invalid one is simply ignored (stale-if-error,
    stale-while-revalidate: RFC 5861 grants nothing with a value that is not one)."""
    seconds = delta_seconds(value)
    return None if seconds == INVALID else seconds


def may_share_unstored(
    request_headers: AnyHeaders,
    response_headers: AnyHeaders,
    targeted_fields: Sequence[str] = DEFAULT_TARGETED_FIELDS,
) -> bool:
    """May an origin answer that was not stored (e.g. a 5xx) fetched for one request be handed
    to other requests for the same key that waited on that fetch?

    Only when nothing in it can be personal: the request carried no credentials, and the
    response sets no cookie and is private or no-store neither by its Cache-Control nor by
    the targeted field this cache obeys (RFC 9213, ``targeted_fields``: either one saying so
    is enough - sharing with another client is the one mistake that cannot be taken back).
    A stored entry needs no such check: it passed :func:`decide_storage`.
    """
    if "authorization" in request_headers or "cookie" in request_headers:
        return False
    if "set-cookie" in response_headers or "set-cookie2" in response_headers:
        return False
    for cc in (
        parse_cache_control(response_headers.getall("Cache-Control", ())),
        response_directives(response_headers, targeted_fields)[0],
    ):
        if "private" in cc or "no-store" in cc:
            return False
    return True


def end_to_end(headers: AnyHeaders, extra_drop: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Headers minus hop-by-hop ones and any named in Connection (RFC 9110 §7.6.1)."""
    drop = set(HOP_BY_HOP)
    drop.update(h.lower() for h in extra_drop)
    for value in headers.getall("Connection", ()):
        drop.update(token.strip().lower() for token in value.split(",") if token.strip())
    return [
        (name, value)
        for name, value in headers.items()
        if (lname := name.lower()) not in drop and not _is_proxy_field(lname)
    ]


def _is_proxy_field(lname: str) -> bool:
    # Proxy-* fields concern the hop to a proxy, never the origin or the client; a bare
    # "Proxy:" request field becomes HTTP_PROXY in CGI-style origins (httpoxy, CVE-2016-5385).
    return lname.startswith("proxy") and (len(lname) == 5 or lname[5] == "-")


def storable_headers(headers: AnyHeaders, strip: Iterable[str] = ()) -> Headers:
    """The headers a stored copy keeps: end-to-end ones, minus those recomputed per response
    (Content-Length reflects the stored body), and minus ``strip`` (the fields a qualified
    no-cache or private names: RFC 9111 §5.2.2.4, §5.2.2.7)."""
    return tuple(end_to_end(headers, (*NOT_STORED, *strip)))


def _vary_names(headers: AnyHeaders) -> list[str]:
    names: list[str] = []
    for value in headers.getall("Vary", ()):
        names.extend(n.strip().lower() for n in value.split(",") if n.strip())
    return names


def _selects(entry: Entry, not_modified_headers: AnyHeaders) -> bool:
    """RFC 9111 §4.3.4: a 304 updates the stored response its validator identifies - the
    same entity-tag (weak comparison, so a weak tag of it too), else the same Last-Modified;
    one without a validator updates the response it answered."""
    etag = not_modified_headers.get("ETag")
    if etag is not None:
        return entry.etag is not None and weakly_equal(etag, entry.etag)
    last_modified = not_modified_headers.get("Last-Modified")
    if last_modified is not None:
        return entry.last_modified is not None and (
            last_modified.strip() == entry.last_modified.strip()
        )
    return True


def freshen(
    entry: Entry,
    not_modified_headers: AnyHeaders,
    request_headers: AnyHeaders,
    request_time: float,
    response_time: float,
    policy: CachePolicy,
) -> Entry | None:
    """RFC 9111 §4.3.4: update a stored entry from a 304; None if it may no longer be stored,
    or if the 304 is not about it (its validator is not the stored one)."""
    if not _selects(entry, not_modified_headers):
        return None
    merged: CIMultiDict[str] = CIMultiDict(entry.headers)
    update = storable_headers(not_modified_headers)
    for name in {n.lower() for n, _ in update}:
        merged.popall(name, None)
    for name, value in update:
        merged.add(name, value)
    decision = decide_storage(
        "GET", request_headers, entry.status, merged, request_time, response_time, policy
    )
    if not decision.storable:
        return None
    if decision.strip:
        for name in decision.strip:
            merged.popall(name, None)
    return replace(
        entry,
        headers=tuple(merged.items()),
        stored_at=decision.stored_at,
        fresh_until=decision.fresh_until,
        stale_until=decision.stale_until,
        swr_until=decision.swr_until,
        expires_at=decision.expires_at,
        etag=merged.get("ETag"),
        last_modified=merged.get("Last-Modified"),
    )


# ---- surrogate keys -----------------------------------------------------------------------

# Surrogate keys kept per entry, and the longest one (Fastly's limits): the tag indexes are
# bounded by entries x tags, so both are capped; anything past them is not indexed.
MAX_TAGS_PER_ENTRY = 64
MAX_TAG_LENGTH = 1024


def parse_tags(header: str | None) -> tuple[str, ...]:
    """``Surrogate-Key: a b c`` -> ("a", "b", "c"): space-separated, de-duplicated, capped."""
    if not header:
        return ()
    tags: dict[str, None] = {}
    for tag in header.split():
        if len(tag) <= MAX_TAG_LENGTH:
            tags[tag] = None
            if len(tags) >= MAX_TAGS_PER_ENTRY:
                break
    return tuple(tags)
