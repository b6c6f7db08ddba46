"""Request target -> cache key.

The key material is the normalised ``path?query``; it is also exactly what is forwarded to the
origin, so two requests with one key can never fetch two different upstream URLs. Scheme and
authority of an absolute-form target are dropped: the upstream is always the configured origin.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["BadTarget", "TargetTooLong", "CacheKey", "normalise_target", "MAX_TARGET_LENGTH"]

# A backstop: the listener refuses targets over TIERPROXY_MAX_URL_BYTES (at most this) with 414
# before a request is parsed; config.MAX_URL_BYTES_LIMIT is the same number.
MAX_TARGET_LENGTH = 65536

# A target with nothing to normalise: no percent-escapes, no dot segments, no odd bytes.
# Runs on every request, on client bytes: it must stay linear. A segment is possessive and
# segments are joined by exactly one "/", so no input can be split two ways. (The former
# ``(?:[pchar]+/?)*`` backtracked exponentially: "/" + 30 letters + "%" froze the loop.)
_SEGMENT = r"(?!\.\.?(?:/|\?|$))[A-Za-z0-9\-._~!$&'()*+,;=:@]++"
_PLAIN = re.compile(
    rf"/(?:{_SEGMENT}(?:/{_SEGMENT})*+/?)?(?:\?[A-Za-z0-9\-._~!$&'()*+,;=:@/?]++)?"
)
_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*")
_PCT = re.compile(r"%(..)?", re.DOTALL)
_HEX = frozenset("0123456789abcdefABCDEF")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters allowed unescaped in a path or query (RFC 3986 pchar / query), '%' handled apart.
_ALLOWED = frozenset(_UNRESERVED | set("!$&'()*+,;=:@/?"))


class BadTarget(ValueError):
    """A request target that cannot be keyed safely; answered with 400."""


class TargetTooLong(BadTarget):
    """A request target over :data:`MAX_TARGET_LENGTH`; answered with 414."""


class CacheKey:
    """Key material and, computed only when a shared tier needs it, its fixed-length digest."""

    __slots__ = ("material", "_digest")

    def __init__(self, material: str) -> None:
        self.material = material
        self._digest: str | None = None

    @property
    def digest(self) -> str:
        # L2/L3 keys are a sha256 of the material: fixed length whatever the URL, and no
        # client byte ever reaches a Redis key or SQL text verbatim.
        if self._digest is None:
            self._digest = hashlib.sha256(self.material.encode("utf-8", "surrogateescape")).hexdigest()
        return self._digest

    def __repr__(self) -> str:
        return f"CacheKey({self.material!r})"


def _normalise_escapes(part: str) -> str:
    """Decode escapes of unreserved characters, upper-case the rest (RFC 3986 §6.2.2)."""

    def fix(match: re.Match[str]) -> str:
        digits = match.group(1)
        if digits is None or digits[0] not in _HEX or digits[1] not in _HEX:
            raise BadTarget("malformed percent-escape")
        char = chr(int(digits, 16))
        if char in _UNRESERVED:
            return char
        return "%" + digits.upper()

    out = _PCT.sub(fix, part) if "%" in part else part
    if any(c not in _ALLOWED and c != "%" for c in out):
        # Anything else (spaces, controls, non-ASCII) is escaped, never passed through raw.
        out = "".join(
            c if (c in _ALLOWED or c == "%") else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogateescape"))
            for c in out
        )
    return out


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, on a path whose escaped dots are already decoded."""
    segments = path.split("/")
    output: list[str] = []
    for segment in segments[1:]:
        if segment == ".":
            continue
        if segment == "..":
            if output:
                output.pop()
            continue
        output.append(segment)
    if segments[-1] in (".", ".."):
        output.append("")
    return "/" + "/".join(output)


def normalise_target(raw: str) -> str:
    """Return the key material for a request target; raise :class:`BadTarget` if unusable."""
    if len(raw) > MAX_TARGET_LENGTH:
        raise TargetTooLong("target too long")
    if _PLAIN.fullmatch(raw):
        return raw
    if not raw.startswith("/"):
        absolute = _ABSOLUTE.match(raw)
        if absolute is None:
            raise BadTarget("target must be origin-form or absolute-form")
        raw = raw[absolute.end():] or "/"
        if not raw.startswith(("/", "?")):
            raise BadTarget("bad absolute-form target")
        if raw.startswith("?"):
            raw = "/" + raw
    if "#" in raw:
        raise BadTarget("fragment in request target")
    path, question, query = raw.partition("?")
    path = _remove_dot_segments(_normalise_escapes(path))
    if question and query:
        return path + "?" + _normalise_escapes(query)
    return path
