"""Byte ranges (RFC 9110 §14) answered from a complete stored response: the pure rules.

Nothing here does I/O. :func:`decide` takes a request's ``Range`` and ``If-Range`` values and
what the stored response holds and says what to send:

* :class:`Full` - the whole representation, ``200`` (no ``Range``, a ``Range`` this cache
  ignores: not ``bytes``, invalid, too many or overlapping ranges, a multipart answer no
  smaller than the whole; an ``If-Range`` that does not match);
* :class:`Partial` - ``206`` with the listed ranges (one: ``Content-Range``; several:
  ``multipart/byteranges``, built by :func:`multipart`);
* :class:`Unsatisfiable` - ``416`` with ``Content-Range: bytes */<length>``.

Only a ``200`` entry is ever ranged (the caller's rule), and a ``206`` from the origin is
never stored as a complete entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from .directives import http_date
from .entry import wire

__all__ = [
    "MAX_RANGES",
    "Full",
    "Partial",
    "RangeSpec",
    "Unsatisfiable",
    "content_range",
    "decide",
    "if_range_matches",
    "multipart",
    "parse_range",
    "part_overhead",
    "resolve",
]

#: More ranges than this in one request are not answered piecewise (RFC 9110 §14.2: a server
#: may ignore a range set that costs it more than it saves): the whole representation is sent.
MAX_RANGES = 16

# A position longer than this many digits is beyond any stored body (and parsing it costs
# more than it is worth): it is read as this large number instead.
_MAX_DIGITS = 18
_HUGE = 10**_MAX_DIGITS

#: ``(first, last)`` as requested: ``a-b`` -> ``(a, b)``, ``a-`` -> ``(a, None)``, suffix
#: ``-n`` -> ``(None, n)``.
RangeSpec = tuple[int | None, int | None]


@dataclass(frozen=True, slots=True)
class Full:
    """Send the whole representation (``200``); ``reason`` says why, for tests and logs."""

    reason: str


@dataclass(frozen=True, slots=True)
class Partial:
    """Send these ``(first, last)`` byte ranges (inclusive, within the body), in this order."""

    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Unsatisfiable:
    """No requested range overlaps the representation: ``416``."""


Decision = Full | Partial | Unsatisfiable


def _position(text: str) -> int | None:
    if not text or not text.isascii() or not text.isdigit():
        return None
    return int(text) if len(text) <= _MAX_DIGITS else _HUGE


def parse_range(value: str) -> list[RangeSpec] | None:
    """``bytes=0-1, 5-`` -> ``[(0, 1), (5, None)]``; None when the field is not a valid
    ``bytes`` range set (RFC 9110 §14.1.1: another unit, a ``last-pos`` below its
    ``first-pos``, anything but digits) or lists more than :data:`MAX_RANGES` ranges: such a
    ``Range`` is ignored."""
    unit, sep, rest = value.strip().partition("=")
    if not sep or unit.lower() != "bytes":  # range units are case-insensitive (§14.1)
        return None
    specs: list[RangeSpec] = []
    # At most MAX_RANGES + 1 pieces are looked at (plus empty list elements, RFC 9110 §5.6.1).
    for piece in rest.split(",", 4 * MAX_RANGES):
        piece = piece.strip(" \t")
        if not piece:
            continue
        if len(specs) == MAX_RANGES or "," in piece:
            return None
        first_text, dash, last_text = piece.partition("-")
        if not dash:
            return None
        if not first_text:
            suffix = _position(last_text)
            if suffix is None:
                return None
            specs.append((None, suffix))
            continue
        first = _position(first_text)
        if first is None:
            return None
        if not last_text:
            specs.append((first, None))
            continue
        last = _position(last_text)
        if last is None or last < first:
            return None
        specs.append((first, last))
    return specs or None


def resolve(specs: list[RangeSpec], length: int) -> list[tuple[int, int]]:
    """The satisfiable specs as inclusive ``(first, last)`` within a body of ``length`` bytes
    (RFC 9110 §14.1.1-14.1.2: a last position past the end is the end; a suffix longer than
    the body is the whole body); unsatisfiable ones are left out."""
    out: list[tuple[int, int]] = []
    for first, last in specs:
        if first is None:
            assert last is not None
            if last == 0 or length == 0:
                continue
            out.append((max(0, length - last), length - 1))
        elif first < length:
            out.append((first, length - 1 if last is None else min(last, length - 1)))
    return out


def if_range_matches(
    if_range: str, etag: str | None, last_modified: str | None, date: str | None, now: float
) -> bool:
    """RFC 9110 §13.1.5: an entity-tag matches only by strong comparison (a weak tag never
    does); an HTTP-date only when it is exactly the stored ``Last-Modified`` and that is a
    strong validator (§8.8.2.2: at least a second before the stored ``Date``). ``now`` (wall
    clock) places an RFC 850 two-digit year (:func:`tierproxy.directives.http_date`)."""
    value = if_range.strip()
    if value.startswith('"'):
        return etag is not None and not etag.startswith("W/") and etag.strip() == value
    if value.startswith("W/"):
        return False
    wanted = http_date(value, now)
    modified = http_date(last_modified, now)
    generated = http_date(date, now)
    if wanted is None or modified is None or generated is None:
        return False
    return wanted == modified and modified <= generated - 1


def decide(
    range_value: str | None,
    if_range: str | None,
    length: int,
    *,
    etag: str | None = None,
    last_modified: str | None = None,
    date: str | None = None,
    part_overhead: int = 0,
    now: float,
) -> Decision:
    """What a GET/HEAD carrying ``Range: range_value`` (and maybe ``If-Range``) gets from a
    stored ``200`` of ``length`` bytes. ``part_overhead`` is what each part of a multipart
    answer adds besides its bytes and its ``Content-Range`` line (see :func:`multipart`): a
    multipart answer at least as large as the whole body is not worth it (§14.6)."""
    if range_value is None:
        return Full("no-range")
    specs = parse_range(range_value)
    if specs is None:
        return Full("ignored")
    if if_range is not None and not if_range_matches(if_range, etag, last_modified, date, now):
        return Full("if-range")
    ranges = resolve(specs, length)
    if not ranges:
        if length == 0 and any(first is None and last for first, last in specs):
            # A suffix of an empty body is satisfiable but holds no byte: send it whole.
            return Full("empty")
        return Unsatisfiable()
    if len(ranges) == 1:
        return Partial((ranges[0],))
    # RFC 9110 §14.2: overlapping ranges, or many out of order, are refused (whole body).
    ordered = sorted(ranges)
    for (_, last), (first, _) in pairwise(ordered):
        if first <= last:
            return Full("overlapping")
    if len(ranges) > 2 and ordered != ranges:
        return Full("out-of-order")
    size = sum(
        last - first + 1 + part_overhead + len(content_range(first, last, length))
        for first, last in ranges
    )
    if size >= length:
        return Full("smaller-whole")
    return Partial(tuple(ranges))


def content_range(first: int, last: int, length: int) -> str:
    """``Content-Range`` of one range (RFC 9110 §14.4)."""
    return f"bytes {first}-{last}/{length}"


def part_overhead(boundary: str, content_type: str | None) -> int:
    """Bytes each part of :func:`multipart` adds besides its data and its ``Content-Range``
    value (the closing delimiter is counted once per part too: a safe over-estimate)."""
    head = _part_head(boundary, content_type, "")
    return len(head) + len(_close(boundary))


def _part_head(boundary: str, content_type: str | None, range_value: str) -> bytes:
    type_line = b"" if content_type is None else b"Content-Type: " + wire(content_type) + b"\r\n"
    return (
        b"\r\n--"
        + boundary.encode("ascii")
        + b"\r\n"
        + type_line
        + b"Content-Range: "
        + range_value.encode("ascii")
        + b"\r\n\r\n"
    )


def _close(boundary: str) -> bytes:
    return b"\r\n--" + boundary.encode("ascii") + b"--\r\n"


def multipart(
    body: bytes, ranges: tuple[tuple[int, int], ...], content_type: str | None, boundary: str
) -> bytes:
    """A ``multipart/byteranges`` body (RFC 9110 §14.6) of ``ranges`` of ``body``: each part
    with the representation's ``Content-Type`` (when it has one) and its ``Content-Range``."""
    length = len(body)
    pieces: list[bytes] = []
    for first, last in ranges:
        head = _part_head(boundary, content_type, content_range(first, last, length))
        pieces.append(head if pieces else head[2:])  # no CRLF before the first delimiter
        pieces.append(body[first : last + 1])
    pieces.append(_close(boundary))
    return b"".join(pieces)
