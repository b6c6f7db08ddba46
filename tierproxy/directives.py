"""The strict parsers behind the freshness rules (RFC 9110 §5.6.7, RFC 9111 §1.2.2 and §5.1,
RFC 9213 §2.1). Pure functions: no I/O, no clocks read here.

* :func:`http_date`: an HTTP-date in one of the three forms a recipient accepts, anything
  else is None (for ``Expires`` that means "already expired", RFC 9111 §5.3).
* :func:`delta_seconds`: a directive argument that is a non-negative decimal integer, else
  invalid (RFC 9111 §4.2.1: a cache then treats the response as stale).
* :func:`age_seconds`: the ``Age`` field (RFC 9111 §5.1).
* :func:`targeted_directives`: the first targeted cache-control field (``CDN-Cache-Control``
  and the like, RFC 9213) that is present and parses as a Structured Field Dictionary
  (RFC 8941 §3.2), as directives in :func:`tierproxy.policy.parse_cache_control`'s shape.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Iterable, Sequence

import http_sf

__all__ = [
    "DEFAULT_TARGETED_FIELDS",
    "DELTA_SECONDS_CAP",
    "INVALID",
    "age_seconds",
    "delta_seconds",
    "field_names",
    "http_date",
    "targeted_directives",
]

# RFC 9111 §1.2.2: a delta-seconds too large to represent is taken as 2^31.
DELTA_SECONDS_CAP = 2**31

#: What :func:`delta_seconds` returns for an argument that is present but not a delta-seconds.
INVALID = -1.0

#: RFC 9213 §2.1: the targeted fields this cache obeys, most specific first.
DEFAULT_TARGETED_FIELDS = ("tierproxy-cache-control", "cdn-cache-control")

_DIGITS = re.compile(r"[0-9]+", re.ASCII)


def delta_seconds(value: str | None) -> float | None:
    """RFC 9111 §1.2.2: ``1*DIGIT``. None when there is no argument at all; :data:`INVALID`
    when there is one that is not a delta-seconds (negative, a decimal, single-quoted, ...).
    A double-quoted argument was already unquoted by the directive parser: RFC 9111 §5.2 asks
    recipients to accept both forms."""
    if value is None:
        return None
    if not _DIGITS.fullmatch(value):
        return INVALID
    return _capped(value)


def age_seconds(values: Sequence[str]) -> float:
    """RFC 9111 §5.1: ``Age = delta-seconds``. The first field line is used, and of a list in
    it the first member; a parameter after it (``;...``) is dropped, so ``7200;x=y`` ages the
    response as ``7200`` does (the cautious reading). Anything else is no Age at all: 0."""
    if not values:
        return 0.0
    first = values[0].split(",", 1)[0].split(";", 1)[0].strip()
    if not _DIGITS.fullmatch(first):
        return 0.0
    return _capped(first)


def _capped(digits: str) -> float:
    """``1*DIGIT`` as seconds, at most :data:`DELTA_SECONDS_CAP` (RFC 9111 §1.2.2), whatever
    its length: int() refuses a str of more than 4300 digits, and need not see one."""
    digits = digits.lstrip("0")
    if len(digits) > 10:  # 2^31 has 10 digits
        return float(DELTA_SECONDS_CAP)
    return float(min(int(digits or "0"), DELTA_SECONDS_CAP))


def field_names(argument: str | None) -> frozenset[str]:
    """The field names of a qualified ``no-cache="a, b"`` / ``private="a, b"`` (RFC 9111
    §5.2.2.4, §5.2.2.7), lower-cased; empty for the unqualified form."""
    if argument is None:
        return frozenset()
    return frozenset(name.strip().lower() for name in argument.split(",") if name.strip())


# ---- HTTP-date (RFC 9110 §5.6.7) ------------------------------------------------------------

_MONTHS = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
    )
}
_DAY = "(?:mon|tue|wed|thu|fri|sat|sun)"
_LONG_DAY = "(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)"
_MONTH = "(" + "|".join(_MONTHS) + ")"
_TIME = "([0-9]{2}):([0-9]{2}):([0-9]{2})"
# Names are matched without regard to case (real origins send "THU" or "gMT"); the layout -
# single spaces, two-digit hours, the comma, a four-digit year in IMF-fixdate - is not.
_FLAGS = re.ASCII | re.IGNORECASE
_IMF_FIXDATE = re.compile(f"{_DAY}, ([0-9]{{2}}) {_MONTH} ([0-9]{{4}}) {_TIME} GMT", _FLAGS)
_RFC850 = re.compile(f"{_LONG_DAY}, ([0-9]{{2}})-{_MONTH}-([0-9]{{2}}) {_TIME} GMT", _FLAGS)
_ASCTIME = re.compile(f"{_DAY} {_MONTH} ([0-9]{{2}}| [0-9]) {_TIME} ([0-9]{{4}})", _FLAGS)


def http_date(value: str | None, now: float) -> float | None:
    """An HTTP-date as a POSIX timestamp, or None when ``value`` is not one.

    RFC 9110 §5.6.7: IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``), and the two obsolete
    forms a recipient must accept: RFC 850 (``Sunday, 06-Nov-94 08:49:37 GMT``) and asctime
    (``Sun Nov  6 08:49:37 1994``). An RFC 850 two-digit year more than 50 years after ``now``
    (wall clock) is the most recent past year with those digits.
    """
    if not value:
        return None
    text = value.strip()
    if match := _IMF_FIXDATE.fullmatch(text):
        day, month, year, hour, minute, second = match.groups()
    elif match := _RFC850.fullmatch(text):
        day, month, short_year, hour, minute, second = match.groups()
        this_year = _year_of(now)
        full = this_year - this_year % 100 + int(short_year)
        year = str(full - 100 if full > this_year + 50 else full)
    elif match := _ASCTIME.fullmatch(text):
        month, day, hour, minute, second, year = match.groups()
    else:
        return None
    return _timestamp(
        int(year), _MONTHS[month.lower()], int(day), int(hour), int(minute), int(second)
    )


def _year_of(now: float) -> int:
    return time.gmtime(max(now, 0.0)).tm_year


def _timestamp(
    year: int, month: int, day: int, hour: int, minute: int, second: int
) -> float | None:
    if not 1 <= day <= calendar.monthrange(year, month)[1]:
        return None
    if hour > 23 or minute > 59 or second > 60:  # 60: a leap second (RFC 9110 §5.6.7)
        return None
    return float(calendar.timegm((year, month, day, hour, minute, min(second, 59), 0, 0, 0)))


# ---- targeted cache-control fields (RFC 9213) -----------------------------------------------

# Directives whose argument is a delta-seconds: in a targeted field, an Integer >= 0.
_DELTA_DIRECTIVES = frozenset({"max-age", "s-maxage", "stale-while-revalidate", "stale-if-error"})
# Directives that may carry field names: true, or a String / Token / Inner List of them.
_FIELD_LIST_DIRECTIVES = frozenset({"private", "no-cache"})


class _Invalid(Exception):
    """A member whose value has the wrong type for its directive."""


def targeted_directives(
    fields: Iterable[str], values: Iterable[tuple[str, Sequence[str]]]
) -> dict[str, str | None] | None:
    """RFC 9213 §2.1: the directives of the first targeted field in ``fields`` (the cache's
    target list, in order) that is present and valid; None when none is (then
    Cache-Control applies, and Expires with it).

    ``values`` gives each field name's lines (``headers.getall``-style; a mapping
    is not used so callers can pass a CIMultiDict's lines lazily). A field whose lines are
    empty, that is not a Structured Field Dictionary, or that gives a known directive a value
    of the wrong type (``max-age="60"``, ``max-age=-1``, ``max-age=1.5``) is ignored as a
    whole, as if absent: that is the cautious reading - a field the origin got wrong does not
    switch off the Cache-Control the origin also sent. Parameters on members are ignored.
    """
    lines = dict(values)
    for name in fields:
        field_lines = lines.get(name)
        if not field_lines:
            continue
        directives = _parse_targeted(", ".join(field_lines))
        if directives is not None:
            return directives
    return None


def _parse_targeted(value: str) -> dict[str, str | None] | None:
    if not value.strip():
        return None  # an empty field is ignored (RFC 9213 §2.1)
    try:
        parsed = http_sf.parse(value.encode("ascii"), tltype="dictionary")
    except (http_sf.StructuredFieldError, ValueError, UnicodeError):
        return None
    if not isinstance(parsed, dict):
        return None
    directives: dict[str, str | None] = {}
    try:
        for key, member in parsed.items():
            item: object = member[0] if isinstance(member, tuple) else member
            if item is not False:  # a directive switched off (no-store=?0) is absent
                directives[key] = _argument(key, item)
    except _Invalid:
        return None
    return directives


def _argument(key: str, value: object) -> str | None:
    """A member's value as a Cache-Control argument: None for a bare directive, else a string."""
    if key in _DELTA_DIRECTIVES:
        if type(value) is not int or value < 0:
            raise _Invalid(key)
        return str(value)
    if value is True:
        return None
    if key in _FIELD_LIST_DIRECTIVES:
        if isinstance(value, (str, http_sf.Token)):
            return str(value)
        if isinstance(value, list):
            names = [item[0] if isinstance(item, tuple) else item for item in value]
            if all(isinstance(n, (str, http_sf.Token)) for n in names):
                return ", ".join(str(n) for n in names)
        raise _Invalid(key)
    return str(value)  # an extension's argument: kept, and ignored like Cache-Control's
