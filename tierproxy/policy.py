"""HTTP caching decisions (RFC 9111, RFC 5861). Pure functions: no I/O, no clocks read here.

Everything that decides *whether* something may be stored or served lives in this module, so
it can be tested with tables of headers -> outcome.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from multidict import CIMultiDict, CIMultiDictProxy

from .entry import Entry, Headers

__all__ = [
    "HOP_BY_HOP",
    "MAX_TAGS_PER_ENTRY",
    "MAX_TAG_LENGTH",
    "NOT_MODIFIED_HEADERS",
    "CachePolicy",
    "StoreDecision",
    "bypass_reason",
    "client_not_modified",
    "decide_storage",
    "end_to_end",
    "freshen",
    "may_share_unstored",
    "parse_cache_control",
    "parse_tags",
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
_NOT_STORED = frozenset(
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

# RFC 9111 §3 + §4.2.2: statuses this cache understands and may store; the heuristically
# cacheable subset may be given a default lifetime when the origin states none.
STORABLE_STATUSES = frozenset(
    {200, 203, 204, 300, 301, 302, 303, 307, 308, 404, 405, 410, 414, 501}
)
HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})

# RFC 9110 §15.4.5: what a 304 carries when the 200 would have had it.
NOT_MODIFIED_HEADERS = ("cache-control", "content-location", "date", "etag", "expires", "vary")


@dataclass(frozen=True, slots=True)
class CachePolicy:
    default_ttl: float
    max_stale: float
    # TIERPROXY_MAX_TTL: no freshness lifetime (and no stale-if-error / stale-while-revalidate
    # window an origin grants) exceeds it, whatever Expires (year 9999) or max-age says.
    max_ttl: float = 31536000.0


@dataclass(frozen=True, slots=True)
class StoreDecision:
    storable: bool
    reason: str  # why not, for Cache-Status detail and logs; "" when storable
    stored_at: float = 0.0
    fresh_until: float = 0.0
    stale_until: float = 0.0
    swr_until: float = 0.0
    expires_at: float = 0.0


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


def _delta_seconds(value: str | None) -> float | None:
    """RFC 9111 §1.2.2: a non-negative integer; invalid means the directive is ignored."""
    if value is None or not value.isdigit():
        return None
    return float(min(int(value), 2**31))


def _http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None or parsed.tzinfo is None:
        return None
    return parsed.timestamp()


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
    if status not in STORABLE_STATUSES:
        return StoreDecision(False, "status")
    cc = parse_cache_control(response_headers.getall("Cache-Control", ()))
    if "no-store" in cc:
        return StoreDecision(False, "no-store")
    if "private" in cc:  # RFC 9111 §5.2.2.7: a shared cache must not store it
        return StoreDecision(False, "private")
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
    date = _http_date(response_headers.get("Date"))
    apparent_age = max(0.0, response_time - date) if date is not None else 0.0
    age_header = _delta_seconds(response_headers.get("Age", "").strip() or None) or 0.0
    corrected_initial_age = max(apparent_age, age_header + (response_time - request_time))
    stored_at = response_time - corrected_initial_age

    # RFC 9111 §4.2.1: s-maxage, then max-age, then Expires - Date.
    lifetime = _delta_seconds(cc.get("s-maxage")) if "s-maxage" in cc else None
    if lifetime is None and "max-age" in cc:
        lifetime = _delta_seconds(cc.get("max-age"))
    if lifetime is None and "expires" in response_headers:
        expires = _http_date(response_headers.get("Expires"))
        # An invalid Expires (e.g. "0") means already expired (§5.3).
        lifetime = (
            max(0.0, expires - (date if date is not None else response_time)) if expires else 0.0
        )
    if "no-cache" in cc:
        lifetime = 0.0  # §5.2.2.4: store, but revalidate before every use
    if lifetime is None:
        if status not in HEURISTIC_STATUSES and "public" not in cc:
            return StoreDecision(False, "no-freshness")
        if policy.default_ttl <= 0:
            return StoreDecision(False, "no-freshness")
        lifetime = policy.default_ttl
    lifetime = min(lifetime, policy.max_ttl)

    fresh_until = stored_at + lifetime
    stale_if_error = _capped(_delta_seconds(cc.get("stale-if-error")), policy.max_ttl)
    swr = _capped(_delta_seconds(cc.get("stale-while-revalidate")), policy.max_ttl)
    # §4.2.4 / §5.2.2.2 / §5.2.2.10: must-revalidate, proxy-revalidate and s-maxage forbid
    # serving stale, unless the origin explicitly grants stale-if-error (RFC 5861 §4).
    no_stale = (
        "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc or "no-cache" in cc
    )
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
    )


def may_share_unstored(request_headers: AnyHeaders, response_headers: AnyHeaders) -> bool:
    """May an origin answer that was not stored (e.g. a 5xx) fetched for one request be handed
    to other requests for the same key that waited on that fetch?

    Only when nothing in it can be personal: the request carried no credentials, and the
    response sets no cookie and is not private or no-store. A stored entry needs no such
    check: it passed :func:`decide_storage`.
    """
    if "authorization" in request_headers or "cookie" in request_headers:
        return False
    if "set-cookie" in response_headers or "set-cookie2" in response_headers:
        return False
    cc = parse_cache_control(response_headers.getall("Cache-Control", ()))
    return "private" not in cc and "no-store" not in cc


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


def storable_headers(headers: AnyHeaders) -> Headers:
    return tuple(end_to_end(headers, _NOT_STORED))


def _vary_names(headers: AnyHeaders) -> list[str]:
    names: list[str] = []
    for value in headers.getall("Vary", ()):
        names.extend(n.strip().lower() for n in value.split(",") if n.strip())
    return names


def freshen(
    entry: Entry,
    not_modified_headers: AnyHeaders,
    request_headers: AnyHeaders,
    request_time: float,
    response_time: float,
    policy: CachePolicy,
) -> Entry | None:
    """RFC 9111 §4.3.4: update a stored entry from a 304; None if it may no longer be stored."""
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


def _weak_etag(tag: str) -> str:
    tag = tag.strip()
    return tag.removeprefix("W/")


def client_not_modified(request_headers: AnyHeaders | Mapping[str, str], entry: Entry) -> bool:
    """RFC 9110 §13.1.2 / §13.1.3 on a stored entry: may we answer the client 304?"""
    if entry.status != 200:
        return False
    if_none_match = request_headers.get("If-None-Match")
    if if_none_match is not None:
        if entry.etag is None:
            return False
        if if_none_match.strip() == "*":
            return True
        stored = _weak_etag(entry.etag)
        return any(_weak_etag(tag) == stored for tag in if_none_match.split(","))
    if_modified_since_raw = request_headers.get("If-Modified-Since")
    if if_modified_since_raw is None or entry.last_modified is None:
        return False  # the common case: nothing to parse on a plain hit
    if_modified_since = _http_date(if_modified_since_raw)
    last_modified = _http_date(entry.last_modified)
    if if_modified_since is None or last_modified is None:
        return False
    return last_modified <= if_modified_since


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
