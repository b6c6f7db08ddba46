"""``TIERPROXY_REDIS_URL``: which Redis topology L2 and the purge fan-out use.

* ``redis://[user:password@]host:port[/db][?options]``, ``rediss://...`` (TLS; certificate
  options as query parameters: ``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_ca_path``,
  ``ssl_certfile``, ``ssl_keyfile``, ``ssl_check_hostname``, ``ssl_ciphers``,
  ``ssl_min_version``) and ``unix:///path/to/socket[?db=N]``: one Redis, as redis-py reads
  these URLs.
* ``redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]``: the
  sentinels (port 26379 by default) are asked for ``service_name``'s master, again after every
  failover. The credentials are the master's (the sentinels are asked without any).
* ``redis+cluster://[user:password@]host:port[,host:port...]``: any reachable nodes of a Redis
  Cluster (port 6379 by default); the client learns the others and the slot map from them.

``TIERPROXY_REDIS_PASSWORD`` is the password when the URL carries none. Neither ever shows up
in a log line or an error message: :func:`redact` is what is printed.

Only the standard library here: tierproxy.config validates with it before anything connects.
"""

from __future__ import annotations

import dataclasses
import re
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["CLUSTER", "SENTINEL", "SINGLE", "RedisTarget", "parse", "redact"]

SINGLE = "single"
SENTINEL = "sentinel"
CLUSTER = "cluster"

ALLOWED = (
    "redis://, rediss:// or unix:// URL, "
    "redis+sentinel://host:port[,host:port...]/service_name[/db] or "
    "redis+cluster://host:port[,host:port...]"
)
_TLS_OPTIONS = frozenset(
    {
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
        "ssl_ciphers",
        "ssl_min_version",
    }
)
_CERT_REQS = frozenset({"none", "optional", "required"})
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(\d{1,5}))?$")
_SERVICE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


@dataclasses.dataclass(frozen=True, slots=True)
class RedisTarget:
    kind: str  # SINGLE, SENTINEL or CLUSTER
    url: str  # as configured (SINGLE: what redis-py connects to)
    nodes: tuple[tuple[str, int], ...] = ()  # sentinels or cluster seed nodes
    service: str = ""  # the sentinels' name of the master
    db: int = 0
    username: str | None = None
    password: str | None = None  # from the URL, else TIERPROXY_REDIS_PASSWORD

    def __repr__(self) -> str:  # never the password
        return f"RedisTarget({self.kind}, {redact(self.url)})"


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (what may be logged)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, tail = rest.partition("/")
    if "@" not in authority:
        return url
    userinfo, _, hosts = authority.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***" if colon else "***"
    return f"{scheme}://{shown}@{hosts}{slash}{tail}"


def _nodes(hosts: str, default_port: int) -> tuple[tuple[str, int], ...]:
    out: list[tuple[str, int]] = []
    for item in hosts.split(","):
        match = _HOST_PORT.match(item.strip())
        if match is None:
            raise ValueError(f"{item!r} is not host:port")
        port = int(match.group(2) or default_port)
        if not 0 < port < 65536:
            raise ValueError(f"port {port} out of range")
        out.append((match.group(1).strip("[]"), port))
    if len(out) > 64:
        raise ValueError("more than 64 nodes")
    return tuple(out)


def _userinfo(authority: str) -> tuple[str, str | None, str | None]:
    """(hosts, username, password) of ``authority``."""
    if "@" not in authority:
        return authority, None, None
    userinfo, _, hosts = authority.rpartition("@")
    user, colon, password = userinfo.partition(":")
    return hosts, unquote(user) or None, unquote(password) if colon and password else None


def parse(url: str, password: str | None = None) -> RedisTarget:
    """The topology ``url`` names; ValueError (a reason that never includes a password) when
    it is not one of the forms in the module docstring."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError("no scheme")
    scheme = scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        parts = urlsplit(url)
        if scheme != "unix" and not parts.hostname:
            raise ValueError("no host")
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError("bad port") from None
        for name, values in parse_qs(parts.query).items():
            if name in _TLS_OPTIONS and scheme != "rediss":
                raise ValueError(f"{name} needs a rediss:// URL")
            if name == "ssl_cert_reqs" and values[-1].lower() not in _CERT_REQS:
                raise ValueError("ssl_cert_reqs must be none, optional or required")
        return RedisTarget(
            SINGLE,
            url,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else password,
        )
    if scheme not in ("redis+sentinel", "redis+cluster"):
        raise ValueError(f"unknown scheme {scheme}://")
    if "?" in rest or "#" in rest:
        raise ValueError(f"{scheme}:// URLs take no query or fragment")
    authority, _, path = rest.partition("/")
    hosts, username, url_password = _userinfo(authority)
    if not hosts:
        raise ValueError("no host")
    if scheme == "redis+cluster":
        if path.strip("/"):
            raise ValueError("a cluster URL has no path (Redis Cluster has database 0 only)")
        return RedisTarget(
            CLUSTER,
            url,
            nodes=_nodes(hosts, 6379),
            username=username,
            password=url_password or password,
        )
    segments = [segment for segment in path.split("/") if segment]
    if not segments or len(segments) > 2 or not _SERVICE.match(segments[0]):
        raise ValueError("expected /service_name[/db] after the sentinels")
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit() or int(segments[1]) > 1_000_000:
            raise ValueError("the database must be a number")
        db = int(segments[1])
    return RedisTarget(
        SENTINEL,
        url,
        nodes=_nodes(hosts, 26379),
        service=segments[0],
        db=db,
        username=username,
        password=url_password or password,
    )
