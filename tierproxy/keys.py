"""Request target -> cache key.

The key material is the normalised ``path?query``; it is also exactly what is forwarded to the
origin, so two requests with one key can never fetch two different upstream URLs. Scheme and
authority of an absolute-form target are dropped: the upstream is always the configured origin.

The shared and persistent tiers (Redis, SQLite) may hold entries of other deployments (another
``TIERPROXY_ORIGIN`` on the same Redis database or file) and of other entry format versions
(a rolling upgrade). Their id for a key is therefore a digest of the key's *namespace* - the
origin's identity and the entry format version (:class:`KeySpace`) - and its material: an
entry of another origin or format is never even looked up.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import urlsplit

from .codec import FORMAT_VERSION, Unencodable

__all__ = [
    "MAX_TARGET_LENGTH",
    "BadTarget",
    "CacheKey",
    "KeySpace",
    "TargetTooLong",
    "normalise_target",
    "origin_identity",
]

# A backstop: the listener refuses targets over TIERPROXY_MAX_URL_BYTES (at most this) with 414
# before a request is parsed; config.MAX_URL_BYTES_LIMIT is the same number.
MAX_TARGET_LENGTH = 65536

# A target with nothing to normalise: no percent-escapes, no dot segments, no odd bytes.
# Runs on every request, on client bytes: it must stay linear. A segment is possessive and
# segments are joined by exactly one "/", so no input can be split two ways. (The former
# ``(?:[pchar]+/?)*`` backtracked exponentially: "/" + 30 letters + "%" froze the loop.)
_SEGMENT = r"(?!\.\.?(?:/|\?|$))[A-Za-z0-9\-._~!$&'()*+,;=:@]++"
_PLAIN = re.compile(rf"/(?:{_SEGMENT}(?:/{_SEGMENT})*+/?)?(?:\?[A-Za-z0-9\-._~!$&'()*+,;=:@/?]++)?")
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


_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_identity(origin: str) -> str:
    """``scheme://host:port/base-path`` of an origin URL, normalised: lower-case scheme and
    host, the port always explicit (RFC 3986 §6.2.3: a default port is the same origin),
    no trailing slash. ``HTTP://Example.COM:80/`` and ``http://example.com`` are one origin."""
    parts = urlsplit(origin.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    port = parts.port or _DEFAULT_PORTS.get(scheme, 0)
    return f"{scheme}://{host}:{port}{parts.path.rstrip('/')}"


class KeySpace:
    """The namespace of this process's keys in shared tiers: origin identity + format version.

    Built once from the settings; :meth:`key` makes the :class:`CacheKey` of a request.
    """

    __slots__ = ("namespace", "origin", "origin_id")

    def __init__(self, origin: str, format_version: int = FORMAT_VERSION) -> None:
        self.origin = origin_identity(origin)
        self.namespace = f"{self.origin} v{format_version}"
        #: A short id of the origin for names that are not per key (the replicas' purge
        #: channel, log and leases): deployments of other origins on one Redis share none.
        self.origin_id = _sha256(self.origin)[:16]

    def key(self, material: str) -> CacheKey:
        return CacheKey(material, self.namespace)

    def tag_id(self, tag: str) -> str:
        """Fixed-length id of a surrogate key (tag) of this origin, for every format version:
        a purge by tag reaches the entries an older version wrote too."""
        return _sha256(self.origin + "\n" + tag)


def _sha256(text: str) -> str:
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:  # a surrogate no byte decodes to: not from the wire
        raise Unencodable(f"key text: {exc.reason}") from None
    return hashlib.sha256(data).hexdigest()


class CacheKey:
    """Key material, its namespace (see :class:`KeySpace`) and, computed only when a shared
    tier needs it, the fixed-length id of both."""

    __slots__ = ("_digest", "material", "namespace")

    def __init__(self, material: str, namespace: str) -> None:
        self.material = material
        self.namespace = namespace
        self._digest: str | None = None

    @property
    def digest(self) -> str:
        # L2/L3 ids are a sha256 of namespace and material: fixed length whatever the URL, no
        # client byte ever reaches a Redis key or SQL text verbatim, and another origin's or
        # format version's entry for the same path has another id. Material is ASCII (see
        # normalise_target), the namespace has no newline: the joined text is unambiguous.
        if self._digest is None:
            self._digest = _sha256(self.namespace + "\n" + self.material)
        return self._digest

    def __repr__(self) -> str:
        return f"CacheKey({self.material!r}, {self.namespace!r})"


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
            c
            if (c in _ALLOWED or c == "%")
            else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogateescape"))
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
        raw = raw[absolute.end() :] or "/"
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
