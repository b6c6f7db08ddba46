"""Settings from ``TIERPROXY_*`` environment variables, validated once at start-up.

Every bad value raises :class:`ConfigError` with one line naming the variable, the value and
what is allowed; the command line turns that into exit code 2.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

from . import redis_url
from .directives import DEFAULT_TARGETED_FIELDS
from .keys import QueryRules

__all__ = ["ENV_DEFAULTS", "ConfigError", "Settings", "load_settings"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message is one line for the operator."""


# Headers the origin may act on but that are never part of the cache key. Forwarding them
# would let one client shape a response that every other client is then served
# (unkeyed-header cache poisoning), so they are dropped unless the operator allows them.
DEFAULT_UNKEYED_DENYLIST = (
    "x-forwarded-host",
    "x-forwarded-server",
    "x-forwarded-scheme",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-original-url",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-host",
    "x-original-host",
    "x-forwarded-ssl",
    "x-forwarded-protocol",
    "x-url-scheme",
    "front-end-https",
    "x-original-method",
    "x-original-uri",
    "x-forwarded-uri",
    "x-forwarded-path",
    "forwarded",
    # Client-supplied client-address claims: the proxy sets X-Forwarded-For from the peer
    # address; a client's own value is appended only when the operator allows it (e.g. behind
    # a trusted load balancer), otherwise it is an unkeyed string the origin may reflect.
    "x-forwarded-for",
    "x-client-ip",
    "true-client-ip",
    "x-cluster-client-ip",
)

# The longest request-target TIERPROXY_MAX_URL_BYTES may allow (keys.MAX_TARGET_LENGTH).
MAX_URL_BYTES_LIMIT = 65536

ENV_DEFAULTS: dict[str, str] = {
    "TIERPROXY_HOST": "127.0.0.1",
    "TIERPROXY_PORT": "8080",
    "TIERPROXY_ADMIN_HOST": "",  # empty = same as TIERPROXY_HOST
    "TIERPROXY_ADMIN_PORT": "8081",
    "TIERPROXY_REDIS_URL": "",
    "TIERPROXY_REDIS_PASSWORD": "",
    "TIERPROXY_SQLITE_PATH": "./tierproxy-cache.sqlite3",
    "TIERPROXY_L1_TIMEOUT": "0.01",
    "TIERPROXY_L2_TIMEOUT": "0.1",
    "TIERPROXY_L3_TIMEOUT": "0.5",
    "TIERPROXY_L2_WRITE_TIMEOUT": "1.0",
    "TIERPROXY_L3_WRITE_TIMEOUT": "2.0",
    "TIERPROXY_ORIGIN_TIMEOUT": "2.0",
    "TIERPROXY_REQUEST_DEADLINE": "3.0",
    "TIERPROXY_L1_MAX_BYTES": "268435456",
    "TIERPROXY_L3_MAX_BYTES": "1073741824",
    "TIERPROXY_MAX_ENTRY_BYTES": "8388608",
    "TIERPROXY_DEFAULT_TTL": "60",
    "TIERPROXY_MAX_STALE": "86400",
    "TIERPROXY_PURGE_TOKEN": "",
    "TIERPROXY_BREAKER_FAILURES": "5",
    "TIERPROXY_BREAKER_COOLDOWN": "5.0",
    "TIERPROXY_BACKFILL_MAX_TASKS": "256",
    "TIERPROXY_SHUTDOWN_TIMEOUT": "10.0",
    "TIERPROXY_WORKERS": "1",
    "TIERPROXY_ORIGIN_MAX_CONNECTIONS": "100",
    # Wait for a free origin connection; never counted as origin time. Past it: stale or 503.
    "TIERPROXY_ORIGIN_QUEUE_TIMEOUT": "0.5",
    # A body streamed through (over TIERPROXY_MAX_ENTRY_BYTES) must be sent whole within this.
    "TIERPROXY_STREAM_TIMEOUT": "300.0",
    "TIERPROXY_REDIS_MAX_CONNECTIONS": "64",
    "TIERPROXY_MAX_BODY_BYTES": "10485760",
    "TIERPROXY_FORWARD_HEADERS": "",
    "TIERPROXY_LOG_LEVEL": "INFO",
    "TIERPROXY_LOG_FORMAT": "text",
    "TIERPROXY_ACCESS_LOG": "on",  # one line per request on tierproxy.access; off for benchmarks
    # Client-side limits of the HTTP/1.1 listener: the request limits and keep-alive are
    # aiohttp's handler_args (tierproxy.listener), the head and send timeouts are
    # tierproxy.aiohttp_internals', the body timeout is tierproxy.handler's:
    "TIERPROXY_MAX_URL_BYTES": "8192",  # longer request-target -> 414
    "TIERPROXY_MAX_HEADER_BYTES": "8190",  # a longer header name or value -> 431
    "TIERPROXY_MAX_HEADERS": "100",  # more header lines -> 431
    "TIERPROXY_HEADER_TIMEOUT": "10.0",  # seconds from a head's first byte to its end -> 408
    "TIERPROXY_BODY_TIMEOUT": "30.0",  # seconds to receive a request body -> 408
    "TIERPROXY_KEEPALIVE_TIMEOUT": "75.0",  # idle keep-alive connections are closed after this
    "TIERPROXY_SEND_TIMEOUT": "30.0",  # a client taking no response bytes this long is cut off
    "TIERPROXY_KEY_PREFIX": "",  # starts every Redis name: environments sharing one Redis
    "TIERPROXY_MAX_TTL": "31536000",  # one year: freshness never exceeds it
    # Variants kept per URL whose responses vary (Vary), least recently used out.
    "TIERPROXY_MAX_VARIANTS": "32",
    # Open client connections on the proxy port; empty = derived from RLIMIT_NOFILE at start
    # (tierproxy.listener.client_connection_cap). Over it, the oldest idle ones are closed.
    "TIERPROXY_MAX_CLIENT_CONNECTIONS": "",
    # "on" lets the proxy start on an aiohttp without the internals the hardened listener
    # reads (no header/send timeouts then); by default such an aiohttp refuses to start.
    "TIERPROXY_ALLOW_UNHARDENED": "off",
    # With Redis: how long a replica trusts its local copies (L1, its L3) after its purge
    # channel was last confirmed; also about how long a PURGE waits for a cut-off replica.
    "TIERPROXY_PURGE_LEASE": "5.0",
    # "on": L2/L3 lookups time out at a timeout learned from their recent latencies
    # (tierproxy.latency), between TIERPROXY_ADAPTIVE_FLOOR and TIERPROXY_Lx_TIMEOUT.
    "TIERPROXY_ADAPTIVE_TIMEOUTS": "off",
    "TIERPROXY_ADAPTIVE_FLOOR": "0.002",
    # With a stale copy that may serve (max-stale / stale-if-error): serve it once the origin
    # has not answered this many seconds into the request; the fetch goes on. 0 = off.
    "TIERPROXY_STALE_DEADLINE": "0",
    # Retries of a GET/HEAD whose origin connection failed before any response byte.
    "TIERPROXY_ORIGIN_RETRIES": "1",
    # Requests that need the origin at once (leaders' fetches, pass-throughs, refreshes);
    # above it, such a request gets its stale copy or 503 at once. Empty = derived:
    # SHED_POOLS x TIERPROXY_ORIGIN_MAX_CONNECTIONS. 0 = off.
    "TIERPROXY_MAX_INFLIGHT": "",
    # "on": when L2 has not answered by its recent p95 (tierproxy.latency), L3 is asked too
    # and the first fresh copy answers (tierproxy.readthrough); the other lookup is cancelled.
    "TIERPROXY_HEDGE": "off",
    # RFC 9213: targeted cache-control fields obeyed before Cache-Control; set but empty = none.
    "TIERPROXY_TARGETED_FIELDS": ",".join(DEFAULT_TARGETED_FIELDS),
    # The query in the key (tierproxy.keys.QueryRules): "sort" orders the key's parameters
    # by name; ignored names and name_* patterns leave the key and the forwarded request.
    "TIERPROXY_QUERY": "keep",
    "TIERPROXY_QUERY_IGNORE": "",
    # "cluster": one origin fetch per key across every replica sharing TIERPROXY_REDIS_URL (a
    # short lease in Redis; the others wait for the entry in L2). "local": one per replica.
    "TIERPROXY_COALESCE": "local",
}

#: TIERPROXY_MAX_INFLIGHT's default, in origin pools (TIERPROXY_ORIGIN_MAX_CONNECTIONS): one
#: pool's worth being answered, three waiting (each at most TIERPROXY_ORIGIN_QUEUE_TIMEOUT)
#: for a connection. A request beyond that would queue behind three pools' worth of others
#: and most likely get 503 origin-busy at the end of its wait: it gets it at once instead.
SHED_POOLS = 4
MAX_INFLIGHT_LIMIT = 10_000_000


@dataclass(frozen=True, slots=True)
class Settings:
    origin: str
    host: str
    port: int
    admin_host: str
    admin_port: int
    redis_url: str | None
    sqlite_path: str | None
    l1_timeout: float
    l2_timeout: float
    l3_timeout: float
    l2_write_timeout: float
    l3_write_timeout: float
    origin_timeout: float
    request_deadline: float
    l1_max_bytes: int
    l3_max_bytes: int
    max_entry_bytes: int
    default_ttl: float
    max_stale: float
    purge_token: str | None
    breaker_failures: int
    breaker_cooldown: float
    backfill_max_tasks: int
    shutdown_timeout: float
    origin_max_connections: int
    redis_max_connections: int
    max_body_bytes: int
    unkeyed_denylist: frozenset[str]
    log_level: str
    log_format: str
    access_log: bool = True
    max_url_bytes: int = 8192
    max_header_bytes: int = 8190
    max_headers: int = 100
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    send_timeout: float = 30.0
    origin_queue_timeout: float = 0.5
    stream_timeout: float = 300.0
    key_prefix: str = ""
    max_ttl: float = 31536000.0
    max_client_connections: int | None = None  # None: derived from RLIMIT_NOFILE at start
    allow_unhardened: bool = False
    purge_lease: float = 5.0
    adaptive_timeouts: bool = False
    adaptive_floor: float = 0.002
    stale_deadline: float = 0.0  # 0: off
    origin_retries: int = 1
    # Requests that need the origin at once before more are shed; 0: off. load_settings
    # derives it from origin_max_connections when TIERPROXY_MAX_INFLIGHT is unset.
    max_inflight: int = 0
    hedge: bool = False
    # RFC 9213 targeted cache-control fields, lower-cased, first match wins; () = none.
    targeted_fields: tuple[str, ...] = DEFAULT_TARGETED_FIELDS

    query: QueryRules = dataclasses.field(default_factory=QueryRules)  # TIERPROXY_QUERY(_IGNORE)
    max_variants: int = 32
    coalesce: str = "local"  # TIERPROXY_COALESCE: "local" or "cluster" (needs Redis)
    # TIERPROXY_REDIS_PASSWORD: Redis's password when TIERPROXY_REDIS_URL has none (never shown).
    redis_password: str | None = dataclasses.field(default=None, repr=False)
    workers: int = 1  # TIERPROXY_WORKERS: serving processes on the one port (tierproxy.workers)


def _parse(env: Mapping[str, str], name: str, convert: Callable[[str], T], allowed: str) -> T:
    raw = env.get(name)
    if raw is None or raw == "":
        raw = ENV_DEFAULTS[name]
    try:
        return convert(raw.strip())
    except (ValueError, OverflowError):
        raise ConfigError(f"{name}={raw!r} is not valid: expected {allowed}") from None


def _seconds(positive: bool) -> Callable[[str], float]:
    def convert(raw: str) -> float:
        value = float(raw)
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise ValueError(raw)
        return value

    return convert


def _lease(raw: str) -> float:
    value = float(raw)
    if not 0.2 <= value <= 300:  # NaN fails too
        raise ValueError(raw)
    return value


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def convert(raw: str) -> int:
        value = int(raw)
        if value < minimum or (maximum is not None and value > maximum):
            raise ValueError(raw)
        return value

    return convert


def _workers(raw: str) -> int:
    """``auto`` (the CPUs this process may run on) or a whole number 1-1024."""
    if raw.lower() == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    value = int(raw)
    if not 1 <= value <= 1024:
        raise ValueError(raw)
    return value


def _origin(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(raw)
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(raw)
    parts.port  # noqa: B018 - raises ValueError on a bad port
    return raw.rstrip("/")


# A Redis key prefix: printable ASCII without spaces (it is also part of a pub/sub channel
# name and shows up in operators' redis-cli sessions), short enough to stay a prefix.
MAX_KEY_PREFIX_LENGTH = 64


def _key_prefix(env: Mapping[str, str]) -> str:
    raw = env.get("TIERPROXY_KEY_PREFIX", "")
    if len(raw) > MAX_KEY_PREFIX_LENGTH or not all("!" <= char <= "~" for char in raw):
        raise ConfigError(
            f"TIERPROXY_KEY_PREFIX={raw[:80]!r} is not valid: expected at most "
            f"{MAX_KEY_PREFIX_LENGTH} printable ASCII characters without spaces, e.g. staging:"
        )
    return raw


def _redis_url(env: Mapping[str, str]) -> str | None:
    """TIERPROXY_REDIS_URL, checked (tierproxy.redis_url); the error shows it redacted."""
    raw = (env.get("TIERPROXY_REDIS_URL") or ENV_DEFAULTS["TIERPROXY_REDIS_URL"]).strip()
    if raw in ("", "off"):
        return None
    try:
        redis_url.parse(raw)
    except ValueError as exc:
        raise ConfigError(
            f"TIERPROXY_REDIS_URL={redis_url.redact(raw)[:200]!r} is not valid ({exc}): "
            f"expected a {redis_url.ALLOWED}"
        ) from None
    return raw


def _coalesce(raw: str) -> str:
    value = raw.lower()
    if value not in ("local", "cluster"):
        raise ValueError(raw)
    return value


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(raw)
    return level


def _log_format(raw: str) -> str:
    if raw not in ("text", "json"):
        raise ValueError(raw)
    return raw


def _on_off(raw: str) -> bool:
    value = raw.lower()
    if value not in ("on", "off"):
        raise ValueError(raw)
    return value == "on"


def _optional_count(raw: str) -> int | None:
    if raw == "":
        return None
    value = int(raw)
    if value < 1 or value > 10_000_000:
        raise ValueError(raw)
    return value


def _max_inflight(raw: str) -> int | None:
    if raw == "":
        return None
    value = int(raw)
    if not 0 <= value <= MAX_INFLIGHT_LIMIT:
        raise ValueError(raw)
    return value


def _header_list(raw: str) -> frozenset[str]:
    names = frozenset(n.strip().lower() for n in raw.split(",") if n.strip())
    if any(not n.replace("-", "").isalnum() for n in names):
        raise ValueError(raw)
    return names


# RFC 9110 §5.1: a field name is a token.
_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


def _targeted_fields(env: Mapping[str, str]) -> tuple[str, ...]:
    """TIERPROXY_TARGETED_FIELDS: unset = the default list; set but empty = none (only
    Cache-Control counts); else comma-separated field names, most specific first."""
    raw = env.get("TIERPROXY_TARGETED_FIELDS")
    if raw is None:
        return DEFAULT_TARGETED_FIELDS
    names: list[str] = []
    for part in raw.split(","):
        name = part.strip().lower()
        if not name and not raw.strip():
            continue
        if not name or not set(name) <= _TCHARS or name == "cache-control":
            raise ConfigError(
                f"TIERPROXY_TARGETED_FIELDS={raw[:200]!r} is not valid: expected a "
                "comma-separated list of header field names other than Cache-Control, e.g. "
                "tierproxy-cache-control,cdn-cache-control (empty = none)"
            )
        if name not in names:
            names.append(name)
    return tuple(names)


def _query_rules(env: Mapping[str, str]) -> QueryRules:
    raw_mode = env.get("TIERPROXY_QUERY") or ENV_DEFAULTS["TIERPROXY_QUERY"]
    mode = raw_mode.strip().lower()
    if mode not in ("keep", "sort"):
        raise ConfigError(f"TIERPROXY_QUERY={raw_mode[:80]!r} is not valid: expected keep or sort")
    ignore = env.get("TIERPROXY_QUERY_IGNORE", "")
    try:
        return QueryRules.parse(mode, ignore)
    except ValueError as exc:
        raise ConfigError(
            f"TIERPROXY_QUERY_IGNORE={ignore[:200]!r} is not valid: {str(exc)[:80]!r} is not a "
            "parameter name (letters, digits, - . _ ~) or a name_* prefix; expected a "
            "comma-separated list such as utm_*,gclid,fbclid"
        ) from None


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``env`` (default: ``os.environ``)."""
    if env is None:
        env = os.environ
    origin_raw = env.get("TIERPROXY_ORIGIN", "").strip()
    if not origin_raw:
        raise ConfigError(
            "TIERPROXY_ORIGIN is required: the origin's base URL, e.g. http://127.0.0.1:9000"
        )
    origin = _parse(
        {"TIERPROXY_ORIGIN": origin_raw},
        "TIERPROXY_ORIGIN",
        _origin,
        "an http:// or https:// base URL without query, e.g. http://127.0.0.1:9000",
    )
    timeout = "a positive number of seconds, e.g. 0.25"
    size = "a whole number of bytes, 0 or more"
    port = "a port number 0-65535"

    sqlite_raw = env.get("TIERPROXY_SQLITE_PATH") or ENV_DEFAULTS["TIERPROXY_SQLITE_PATH"]
    sqlite_path = None if sqlite_raw.strip() == "off" else sqlite_raw.strip()

    forward = _parse(
        env, "TIERPROXY_FORWARD_HEADERS", _header_list, "a comma-separated list of header names"
    )
    host = _parse(env, "TIERPROXY_HOST", str, "an address to listen on")
    settings = Settings(
        origin=origin,
        host=host,
        port=_parse(env, "TIERPROXY_PORT", _integer(0, 65535), port),
        admin_host=(env.get("TIERPROXY_ADMIN_HOST") or host).strip(),
        admin_port=_parse(env, "TIERPROXY_ADMIN_PORT", _integer(0, 65535), port),
        redis_url=_redis_url(env),
        redis_password=env.get("TIERPROXY_REDIS_PASSWORD") or None,
        sqlite_path=sqlite_path,
        l1_timeout=_parse(env, "TIERPROXY_L1_TIMEOUT", _seconds(True), timeout),
        l2_timeout=_parse(env, "TIERPROXY_L2_TIMEOUT", _seconds(True), timeout),
        l3_timeout=_parse(env, "TIERPROXY_L3_TIMEOUT", _seconds(True), timeout),
        l2_write_timeout=_parse(env, "TIERPROXY_L2_WRITE_TIMEOUT", _seconds(True), timeout),
        l3_write_timeout=_parse(env, "TIERPROXY_L3_WRITE_TIMEOUT", _seconds(True), timeout),
        origin_timeout=_parse(env, "TIERPROXY_ORIGIN_TIMEOUT", _seconds(True), timeout),
        request_deadline=_parse(env, "TIERPROXY_REQUEST_DEADLINE", _seconds(True), timeout),
        l1_max_bytes=_parse(env, "TIERPROXY_L1_MAX_BYTES", _integer(0), size),
        l3_max_bytes=_parse(
            env, "TIERPROXY_L3_MAX_BYTES", _integer(1), "a positive number of bytes"
        ),
        max_entry_bytes=_parse(
            env, "TIERPROXY_MAX_ENTRY_BYTES", _integer(1), "a positive number of bytes"
        ),
        default_ttl=_parse(
            env, "TIERPROXY_DEFAULT_TTL", _seconds(False), "seconds, 0 or more (0 = don't store)"
        ),
        max_stale=_parse(env, "TIERPROXY_MAX_STALE", _seconds(False), "seconds, 0 or more"),
        purge_token=(env.get("TIERPROXY_PURGE_TOKEN") or None),
        breaker_failures=_parse(
            env, "TIERPROXY_BREAKER_FAILURES", _integer(1, 1_000_000), "a whole number, 1 or more"
        ),
        breaker_cooldown=_parse(env, "TIERPROXY_BREAKER_COOLDOWN", _seconds(True), timeout),
        backfill_max_tasks=_parse(
            env, "TIERPROXY_BACKFILL_MAX_TASKS", _integer(1, 1_000_000), "a whole number, 1 or more"
        ),
        shutdown_timeout=_parse(env, "TIERPROXY_SHUTDOWN_TIMEOUT", _seconds(True), timeout),
        workers=_parse(
            env, "TIERPROXY_WORKERS", _workers, "auto or a whole number of processes, 1-1024"
        ),
        origin_max_connections=_parse(
            env,
            "TIERPROXY_ORIGIN_MAX_CONNECTIONS",
            _integer(1, 100_000),
            "a whole number, 1 or more",
        ),
        redis_max_connections=_parse(
            env,
            "TIERPROXY_REDIS_MAX_CONNECTIONS",
            _integer(1, 100_000),
            "a whole number, 1 or more",
        ),
        max_body_bytes=_parse(env, "TIERPROXY_MAX_BODY_BYTES", _integer(0), size),
        unkeyed_denylist=frozenset(DEFAULT_UNKEYED_DENYLIST) - forward,
        log_level=_parse(env, "TIERPROXY_LOG_LEVEL", _log_level, "DEBUG, INFO, WARNING or ERROR"),
        log_format=_parse(env, "TIERPROXY_LOG_FORMAT", _log_format, "text or json"),
        access_log=_parse(env, "TIERPROXY_ACCESS_LOG", _on_off, "on or off"),
        max_url_bytes=_parse(
            env,
            "TIERPROXY_MAX_URL_BYTES",
            _integer(256, MAX_URL_BYTES_LIMIT),
            f"a whole number of bytes, 256-{MAX_URL_BYTES_LIMIT}",
        ),
        max_header_bytes=_parse(
            env,
            "TIERPROXY_MAX_HEADER_BYTES",
            _integer(256, 1_048_576),
            "a whole number of bytes, 256-1048576",
        ),
        max_headers=_parse(
            env, "TIERPROXY_MAX_HEADERS", _integer(8, 10_000), "a whole number, 8-10000"
        ),
        header_timeout=_parse(env, "TIERPROXY_HEADER_TIMEOUT", _seconds(True), timeout),
        body_timeout=_parse(env, "TIERPROXY_BODY_TIMEOUT", _seconds(True), timeout),
        keepalive_timeout=_parse(env, "TIERPROXY_KEEPALIVE_TIMEOUT", _seconds(True), timeout),
        send_timeout=_parse(env, "TIERPROXY_SEND_TIMEOUT", _seconds(True), timeout),
        origin_queue_timeout=_parse(env, "TIERPROXY_ORIGIN_QUEUE_TIMEOUT", _seconds(True), timeout),
        stream_timeout=_parse(env, "TIERPROXY_STREAM_TIMEOUT", _seconds(True), timeout),
        max_variants=_parse(
            env, "TIERPROXY_MAX_VARIANTS", _integer(1, 1024), "a whole number, 1-1024"
        ),
        key_prefix=_key_prefix(env),
        max_ttl=_parse(env, "TIERPROXY_MAX_TTL", _seconds(True), "a positive number of seconds"),
        max_client_connections=_parse(
            env,
            "TIERPROXY_MAX_CLIENT_CONNECTIONS",
            _optional_count,
            "a whole number, 1 or more (unset: derived from RLIMIT_NOFILE)",
        ),
        allow_unhardened=_parse(env, "TIERPROXY_ALLOW_UNHARDENED", _on_off, "on or off"),
        purge_lease=_parse(env, "TIERPROXY_PURGE_LEASE", _lease, "seconds, 0.2-300"),
        adaptive_timeouts=_parse(env, "TIERPROXY_ADAPTIVE_TIMEOUTS", _on_off, "on or off"),
        adaptive_floor=_parse(env, "TIERPROXY_ADAPTIVE_FLOOR", _seconds(True), timeout),
        stale_deadline=_parse(
            env,
            "TIERPROXY_STALE_DEADLINE",
            _seconds(False),
            "seconds, 0 or more (0 = off), e.g. 0.2",
        ),
        origin_retries=_parse(
            env, "TIERPROXY_ORIGIN_RETRIES", _integer(0, 10), "a whole number, 0-10"
        ),
        hedge=_parse(env, "TIERPROXY_HEDGE", _on_off, "on or off"),
        targeted_fields=_targeted_fields(env),
        coalesce=_parse(env, "TIERPROXY_COALESCE", _coalesce, "local or cluster"),
    )
    max_inflight = _parse(
        env,
        "TIERPROXY_MAX_INFLIGHT",
        _max_inflight,
        f"a whole number 0-{MAX_INFLIGHT_LIMIT} (0 = off; unset: "
        f"{SHED_POOLS} x TIERPROXY_ORIGIN_MAX_CONNECTIONS)",
    )
    if max_inflight is None:
        max_inflight = SHED_POOLS * settings.origin_max_connections
    settings = dataclasses.replace(settings, max_inflight=max_inflight, query=_query_rules(env))
    if settings.adaptive_timeouts:
        for name, ceiling, enabled in (
            ("TIERPROXY_L2_TIMEOUT", settings.l2_timeout, settings.redis_url is not None),
            ("TIERPROXY_L3_TIMEOUT", settings.l3_timeout, settings.sqlite_path is not None),
        ):
            if enabled and settings.adaptive_floor > ceiling:
                raise ConfigError(
                    f"TIERPROXY_ADAPTIVE_FLOOR={settings.adaptive_floor:g} is above "
                    f"{name}={ceiling:g}: the adaptive timeout lies between the floor and the "
                    "tier's timeout; lower the floor or raise the timeout"
                )
    if settings.purge_token is not None and len(settings.purge_token) < 16:
        raise ConfigError(
            "TIERPROXY_PURGE_TOKEN is too short: use at least 16 characters (or unset it)"
        )
    if settings.coalesce == "cluster" and settings.redis_url is None:
        raise ConfigError(
            "TIERPROXY_COALESCE=cluster needs TIERPROXY_REDIS_URL: replicas coalesce through "
            "the Redis they share (set it, or use TIERPROXY_COALESCE=local)"
        )
    if 0 < settings.stale_deadline and settings.stale_deadline >= settings.request_deadline:
        raise ConfigError(
            f"TIERPROXY_STALE_DEADLINE={settings.stale_deadline:g} is not valid: expected less "
            f"than TIERPROXY_REQUEST_DEADLINE ({settings.request_deadline:g}), or 0 (off)"
        )
    return settings
