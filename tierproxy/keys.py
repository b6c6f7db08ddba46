"""Request target -> cache key.

The key material is the normalised ``path?query``; it is also exactly what is forwarded to the
origin, so two requests with one key can never fetch two different upstream URLs. Scheme and
authority of an absolute-form target are dropped: the upstream is always the configured origin.

The shared and persistent tiers (Redis, SQLite) may hold entries of other deployments (another
``TIERPROXY_ORIGIN`` on the same Redis database or file) and of other entry format versions
(a rolling upgrade). Their id for a key is therefore a digest of the key's *namespace* - the
origin's identity and the entry format version (:class:`KeySpace`) - and its material: an
entry of another origin or format is never even looked up.

The query may be reshaped (``TIERPROXY_QUERY``, ``TIERPROXY_QUERY_IGNORE``, :class:`QueryRules`):
ignored parameters leave both the key and the forwarded target; sorting changes the key only,
so a key then carries the target it was made from (:attr:`CacheKey.target`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from .codec import FORMAT_VERSION, Unencodable

__all__ = [
    "MAX_TARGET_LENGTH",
    "BadTarget",
    "CacheKey",
    "KeySpace",
    "QueryRules",
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


# KeySpace.for_target remembers up to this many targets of at most this many characters (at
# most ~8 MB with their keys: a target of obs-text grows about threefold when normalised).
_KNOWN_TARGETS = 4096
_KNOWN_TARGET_CHARS = 256


class KeySpace:
    """The namespace of this process's keys in shared tiers: origin identity + format version.

    Built once from the settings; :meth:`key` makes the :class:`CacheKey` of a request.
    """

    __slots__ = (
        "_authority",
        "_base_path",
        "_known",
        "_url",
        "namespace",
        "origin",
        "origin_id",
        "query",
    )

    def __init__(
        self,
        origin: str,
        format_version: int = FORMAT_VERSION,
        query: QueryRules | None = None,
    ) -> None:
        self.origin = origin_identity(origin)
        self.query = QueryRules() if query is None else query
        # The URL a forwarded target is appended to; its scheme://host:port and base path.
        parts = urlsplit(origin.strip())
        self._url = origin.strip().rstrip("/")
        self._authority = origin_identity(f"{parts.scheme}://{parts.netloc}")
        self._base_path = parts.path.rstrip("/")
        self.namespace = f"{self.origin} v{format_version}"
        #: A short id of the origin for names that are not per key (the replicas' purge
        #: channel, log and leases): deployments of other origins on one Redis share none.
        self.origin_id = _sha256(self.origin)[:16]
        # for_target's answers for recent short targets: the same target always makes the same
        # key, and a hot URL is normalised once, not per request (bounded: cleared when full).
        self._known: dict[str, CacheKey] = {}

    def key(self, material: str, target: str | None = None) -> CacheKey:
        """The key of already-final ``material`` (as stored, purged, published)."""
        return CacheKey(material, self.namespace, target)

    def for_target(self, raw: str) -> CacheKey:
        """The key of a request target as a client sent it (also a purge by URL): normalised
        (:func:`normalise_target`), then the query rules applied. Raises :class:`BadTarget`."""
        known = self._known.get(raw)
        if known is not None:
            return known
        material = normalise_target(raw)
        query = self.query
        if not query.active or "?" not in material:
            key = CacheKey(material, self.namespace)
        else:
            keyed, target = query.apply(material)
            key = CacheKey(keyed, self.namespace, target)
        if len(raw) <= _KNOWN_TARGET_CHARS:
            if len(self._known) >= _KNOWN_TARGETS:
                self._known.clear()
            self._known[raw] = key
        return key

    def same_origin_keys(self, request_target: str, references: Iterable[str]) -> list[CacheKey]:
        """Keys of the URI references (``Location``, ``Content-Location`` values) that name
        this origin, resolved against the URI ``request_target`` was forwarded to (RFC 3986
        §5.2); references to any other origin, or outside the origin's base path, or that
        cannot be parsed are left out (RFC 9111 §4.4)."""
        base_path = self._base_path
        keys: list[CacheKey] = []
        for reference in references:
            reference = reference.strip()
            if not reference or len(reference) > MAX_TARGET_LENGTH:
                continue
            try:
                parts = urlsplit(urljoin(self._url + request_target, reference))
                if origin_identity(f"{parts.scheme}://{parts.netloc}") != self._authority:
                    continue
                path = parts.path or "/"
                if base_path:
                    if path != base_path and not path.startswith(base_path + "/"):
                        continue
                    path = path[len(base_path) :] or "/"
                keys.append(self.for_target(path + ("?" + parts.query if parts.query else "")))
            except ValueError:  # BadTarget included, and a bad port
                continue
        return keys

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

    __slots__ = ("_digest", "material", "namespace", "target")

    def __init__(self, material: str, namespace: str, target: str | None = None) -> None:
        self.material = material
        self.namespace = namespace
        #: What is forwarded to the origin: the material itself, unless the query rules sort
        #: the key's parameters (then the request's own order, ignored parameters removed).
        self.target = material if target is None else target
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


# ---- the query: TIERPROXY_QUERY, TIERPROXY_QUERY_IGNORE ----------------------------------

# A name in TIERPROXY_QUERY_IGNORE: unreserved characters (RFC 3986 §2.3), which is what a
# normalised target holds for them (utm%5Fsource is utm_source by then); "*" only at the end.
_IGNORE_ITEM = re.compile(r"[A-Za-z0-9\-._~]+\*?")


@dataclass(frozen=True, slots=True)
class QueryRules:
    """How a normalised query becomes part of the key.

    ``ignore`` (exact names) and ``prefixes`` (``name_*`` patterns): parameters removed from
    the key and from the forwarded target. ``sort``: the key's parameters in a stable order
    by name (parameters of one name keep their order); the forwarded target keeps the
    client's order. Names are compared case-sensitively, as the origin sees them; a
    parameter's name is what comes before its first ``=``, parameters are split on ``&``.
    """

    sort: bool = False
    ignore: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, mode: str, ignore: str) -> QueryRules:
        """From ``TIERPROXY_QUERY`` and ``TIERPROXY_QUERY_IGNORE``; ValueError if invalid."""
        if mode not in ("keep", "sort"):
            raise ValueError(mode)
        names: set[str] = set()
        prefixes: list[str] = []
        for item in (part.strip() for part in ignore.split(",")):
            if not item:
                continue
            if not _IGNORE_ITEM.fullmatch(item):
                raise ValueError(item)
            if item.endswith("*"):
                prefixes.append(item[:-1])
            else:
                names.add(item)
        return cls(mode == "sort", frozenset(names), tuple(dict.fromkeys(prefixes)))

    @property
    def active(self) -> bool:
        return self.sort or bool(self.ignore) or bool(self.prefixes)

    def _ignored(self, name: str) -> bool:
        return name in self.ignore or name.startswith(self.prefixes)

    def apply(self, material: str) -> tuple[str, str]:
        """(key material, forwarded target) of normalised ``material``."""
        path, question, query = material.partition("?")
        if not question:
            return material, material
        params = query.split("&")
        if self.ignore or self.prefixes:
            params = [p for p in params if not self._ignored(p.partition("=")[0])]
        target = path + "?" + "&".join(params) if params else path
        if not self.sort or len(params) < 2:
            return target, target
        params.sort(key=lambda p: p.partition("=")[0])  # stable: same names keep their order
        return path + "?" + "&".join(params), target
