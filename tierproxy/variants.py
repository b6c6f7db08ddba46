"""Vary: which stored variant of a URL a request may get (RFC 9111 §4.1). Pure rules, no I/O.

A response that varies is stored as one *variant* of its URL, chosen by the request's values
of the fields its ``Vary`` names. Those values are normalised before they are stored or
compared (§4.1 allows "normalizing both header values in a way that is known to have
identical semantics"):

* every field: its field lines combined with commas (RFC 9110 §5.3), list members trimmed,
  runs of whitespace inside a member collapsed, empty members dropped;
* ``Accept-Language``, ``Accept-Encoding``, ``Accept-Charset`` (case-insensitive tokens with
  weights, RFC 9110 §12.5): members case-folded, ``q`` read as a number (``q=1`` spelled out
  or not), and the list ordered by weight. Among equal weights ``Accept-Encoding`` and
  ``Accept-Charset`` members are ordered by token too; ``Accept-Language`` members keep the
  request's order: common server frameworks (Django, Rails, Go's x/text) answer in the first
  listed of equally weighted languages, so ``fr, de`` and ``de, fr`` may get different
  answers. A list whose members do not parse is compared as trimmed and case-folded.

A stored variant is selected for a request when each of its selecting fields is equal after
normalisation, or when what the stored response is in is what the request prefers first:
``Accept-Language`` against the stored ``Content-Language`` - the request's first language
among those of its highest weight (above 0) is exactly that language (``fr;q=0.5, de;q=1.0``
and ``de, en`` get a stored ``Content-Language: de``; ``en`` does not get ``en-GB``, whose
origin may have ``en`` too, nor does ``*``) - and ``Accept-Encoding`` against the stored
``Content-Encoding``: every coding of the request's highest weight is the stored one. Among
several, an exact match first, then the most recently used.

Each URL keeps at most a bounded number of variants (``TIERPROXY_MAX_VARIANTS``), the least
recently used dropped first (:func:`remember`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from .entry import Entry, Headers, Variant

__all__ = [
    "WEIGHTED",
    "entry_matches",
    "normalise",
    "record_material",
    "remember",
    "select",
    "too_long",
    "touch",
    "variant_id",
    "variant_material",
    "variant_of",
    "vary_names",
    "vary_values",
]


class _Fields(Protocol):
    """What a request's (or response's) headers offer here: aiohttp's CIMultiDict(Proxy)."""

    def getall(self, key: str, default: Sequence[str], /) -> list[str] | Sequence[str]: ...


# Fields whose members are case-insensitive tokens with weights (RFC 9110 §12.4.2, §12.5).
WEIGHTED = frozenset({"accept-language", "accept-encoding", "accept-charset"})
# Selecting fields matched against what the stored response is in: its field of that name.
_CONTENT = {"accept-language": "content-language", "accept-encoding": "content-encoding"}
_QVALUE_DIGITS = 3  # RFC 9110 §12.4.2: at most three digits after the point


def vary_names(response_headers: _Fields) -> list[str]:
    """The field names a response's ``Vary`` lists, lower-case, sorted, once each."""
    names: set[str] = set()
    for value in response_headers.getall("Vary", ()):
        names.update(n.strip().lower() for n in value.split(",") if n.strip())
    return sorted(names)


def vary_values(response_headers: _Fields, request_headers: _Fields) -> Headers:
    """RFC 9111 §4.1: the request's normalised values of the fields the response varies on."""
    return tuple(
        (name, normalise(name, request_headers.getall(name, ())))
        for name in vary_names(response_headers)
    )


def _members(lines: Iterable[str]) -> list[str]:
    return [
        " ".join(member.split()) for line in lines for member in line.split(",") if member.strip()
    ]


def _weighted(members: list[str]) -> list[tuple[str, float]] | None:
    """(token, q) per member, case-folded; None when a member is not ``token[;q=qvalue]``."""
    parsed: list[tuple[str, float]] = []
    for member in members:
        token, *params = (part.strip() for part in member.split(";"))
        if not token or " " in token or len(params) > 1:
            return None
        q = 1.0
        if params:
            name, eq, raw = params[0].partition("=")
            if name.strip().lower() != "q" or not eq:
                return None
            try:
                q = float(raw.strip())
            except ValueError:
                return None
            if not (0.0 <= q <= 1.0) or math.isnan(q):
                return None
        parsed.append((token.lower(), round(q, _QVALUE_DIGITS)))
    return parsed


def _render(parsed: list[tuple[str, float]], ordered: bool) -> str:
    """``ordered``: members of equal weight keep their order (else ordered by token)."""
    parts = []
    key = (lambda member: -member[1]) if ordered else (lambda member: (-member[1], member[0]))
    for token, q in sorted(parsed, key=key):
        if q == 1.0:
            parts.append(token)
        else:
            parts.append(f"{token};q={f'{q:.3f}'.rstrip('0').rstrip('.')}")
    return ",".join(parts)


def normalise(name: str, lines: Iterable[str]) -> str:
    """A selecting field's request value, normalised (see module). ``name`` is lower-case;
    no field lines give ""."""
    members = _members(lines)
    if name not in WEIGHTED:
        return ",".join(members)
    parsed = _weighted(members)
    if parsed is None:
        return ",".join(member.lower() for member in members)
    return _render(parsed, ordered=name == "accept-language")


def _preferred(normalised: str) -> list[str] | None:
    """The members a normalised weighted value prefers above all the others (highest q > 0)."""
    parsed = _weighted(normalised.split(",")) if normalised else None
    if not parsed:
        return None
    best = max(q for _, q in parsed)
    if best <= 0:
        return None
    return [token for token, q in parsed if q == best]


def _content_values(name: str, value: str) -> list[str]:
    values = [v.strip().lower() for v in value.split(",") if v.strip()]
    if name == "accept-encoding" and not values:
        return ["identity"]  # no Content-Encoding: the representation is as it is
    return values


def _field_matches(name: str, stored: str, asked: str, content: Mapping[str, str]) -> bool:
    if asked == stored:
        return True
    content_name = _CONTENT.get(name)
    if content_name is None:
        return False
    available = _content_values(name, content.get(content_name, ""))
    if not available:
        return False
    preferred = _preferred(asked)
    if preferred is None:
        return False
    if name == "accept-language":
        return preferred[0] in available  # the first of the most preferred (kept in order)
    return all(wanted in available for wanted in preferred)


def _asked(name: str, request_headers: _Fields, cache: dict[str, str]) -> str:
    value = cache.get(name)
    if value is None:
        value = cache[name] = normalise(name, request_headers.getall(name, ()))
    return value


def _matches(
    values: Headers, content: Mapping[str, str], request_headers: _Fields, cache: dict[str, str]
) -> tuple[bool, bool]:
    """(selected, exactly): whether a variant stored for ``values`` serves the request, and
    whether every selecting field is equal (not only preferred)."""
    exact = True
    for name, stored in values:
        asked = _asked(name, request_headers, cache)
        if asked == stored:
            continue
        if not _field_matches(name, stored, asked, content):
            return False, False
        exact = False
    return True, exact


def _content_of(language: str, encoding: str) -> dict[str, str]:
    return {"content-language": language, "content-encoding": encoding}


def select(variants: Sequence[Variant], request_headers: _Fields) -> Variant | None:
    """The stored variant ``request_headers`` may get: an exact match, else one whose
    ``Content-Language``/``Content-Encoding`` is the request's first preference; the most
    recently used first (``variants`` are least recently used first). None: no variant."""
    cache: dict[str, str] = {}
    fallback: Variant | None = None
    for variant in reversed(variants):
        ok, exact = _matches(
            variant.values, _content_of(variant.language, variant.encoding), request_headers, cache
        )
        if exact:
            return variant
        if ok and fallback is None:
            fallback = variant
    return fallback


def _header(headers: Headers, name: str) -> str:
    return ",".join(value for field, value in headers if field.lower() == name)


def entry_matches(entry: Entry, request_headers: _Fields) -> bool:
    """Whether a stored response (its Vary values and what it is in) serves the request."""
    if not entry.vary:
        return True
    content = {
        "content-language": _header(entry.headers, "content-language"),
        "content-encoding": _header(entry.headers, "content-encoding"),
    }
    return _matches(entry.vary, content, request_headers, {})[0]


#: The most bytes of normalised request values a stored variant may be chosen by: its URL's
#: index holds them for every variant and is read on every L2/L3 lookup of the URL, so a
#: client sending 8 KiB header values must not make that index large (32 x 1 KiB at most).
MAX_VALUES_BYTES = 1024


def too_long(values: Headers) -> bool:
    """Whether a variant chosen by ``values`` is too costly to keep (see MAX_VALUES_BYTES)."""
    return sum(len(name) + len(value) for name, value in values) > MAX_VALUES_BYTES


def variant_id(values: Headers) -> str:
    """A variant's id: fixed length, the same in every tier and process for the same values."""
    text = "\n".join(f"{name}:{value}" for name, value in values)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def record_material(url_material: str, values: Headers) -> str:
    """The key material a variant's own record is stored under: the URL's, then ``#`` (never
    in a URL's key material: a fragment is refused, a literal ``#`` escaped) and the id."""
    return variant_material(url_material, variant_id(values))


def variant_material(url_material: str, vid: str) -> str:
    """The key material of the record of variant ``vid`` of a URL (see record_material)."""
    return f"{url_material}#{vid}"


def variant_of(entry: Entry) -> Variant:
    """The index record's line for a stored variant."""
    return Variant(
        vid=variant_id(entry.vary),
        values=entry.vary,
        language=",".join(
            _content_values("accept-language", _header(entry.headers, "content-language"))
        ),
        encoding=",".join(
            v
            for v in _content_values("accept-encoding", _header(entry.headers, "content-encoding"))
            if v != "identity"
        ),
        expires_at=entry.expires_at,
    )


def remember(
    variants: Sequence[Variant], new: Variant, limit: int, now: float
) -> tuple[tuple[Variant, ...], tuple[Variant, ...]]:
    """``new`` as the most recently used variant, at most ``limit`` kept: (kept, dropped).
    Dropped: the least recently used past the bound, and expired ones (never ``new``)."""
    kept: list[Variant] = []
    dropped: list[Variant] = []
    for variant in variants:
        if variant.vid == new.vid:
            continue
        (kept if variant.expires_at > now else dropped).append(variant)
    kept.append(new)
    excess = max(0, len(kept) - max(1, limit))
    dropped.extend(kept[:excess])
    return tuple(kept[excess:]), tuple(dropped)


def touch(variants: Sequence[Variant], vid: str) -> tuple[Variant, ...] | None:
    """``variants`` with ``vid`` made the most recently used; None when it already is."""
    if not variants or variants[-1].vid == vid:
        return None
    moved = [variant for variant in variants if variant.vid == vid]
    if not moved:
        return None
    return (*(variant for variant in variants if variant.vid != vid), moved[0])
