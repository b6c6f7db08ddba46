"""The proxy listener's limits: aiohttp's own request limits, and the client connection cap.

Everything here uses aiohttp's public interface. The limits are ``RequestHandler`` arguments
(:func:`handler_args`, given as the app's ``handler_args``), so any runner - a plain
``web.AppRunner`` included - refuses the same requests. The connection cap's size comes from
the descriptor limit (:func:`client_connection_cap`). What aiohttp has no public mechanism for
(the request-head and send timeouts, the exact 414/431 statuses, the hit path, closing the
oldest idle connections at the cap) is in :mod:`tierproxy.aiohttp_internals`, with the exact
list of private names it relies on.
"""

from __future__ import annotations

import resource
from typing import TYPE_CHECKING, Any

from .aiohttp_internals import ConnectionCap

if TYPE_CHECKING:
    from .config import Settings
    from .metrics import Metrics

__all__ = [
    "ADMIN_BACKLOG",
    "ADMIN_MAX_CONNECTIONS",
    "client_connection_cap",
    "counted_cap",
    "handler_args",
    "listen_backlog",
]


def handler_args(settings: Settings) -> dict[str, Any]:
    """aiohttp ``RequestHandler`` arguments for the proxy listener."""
    return {
        # aiohttp checks the request-target alone against max_line_size ...
        "max_line_size": settings.max_url_bytes,
        # ... and a header's name and its value against max_field_size (3.14 counts the two
        # together only for the first header line; a head is bounded by max_headers x this).
        "max_field_size": settings.max_header_bytes,
        "max_headers": settings.max_headers,
        # Idle keep-alive bound; aiohttp's default (3630 s) would let idle connections pile up.
        "keepalive_timeout": settings.keepalive_timeout,
        # A proxy forwards a request body as the client encoded it (Content-Encoding and all);
        # decompressing would also let a small gzip body expand past TIERPROXY_MAX_BODY_BYTES.
        "auto_decompress": False,
    }


# -- file descriptors: the client connection cap ---------------------------------------------

# The admin listener's own connection cap (health checks and scrapes need few), and its
# listen backlog. Both come out of the descriptor reserve, so the admin port always answers.
ADMIN_MAX_CONNECTIONS = 32
ADMIN_BACKLOG = 16
# Descriptors of the process itself: stdio, both listening sockets, the event loop's epoll,
# self-pipe and signal fds, log handlers, resolver sockets, /proc reads, imports.
_PROCESS_FDS = 64
# SQLite: the reader and writer connections with their -wal/-shm/journal files, a file being
# moved aside after corruption.
_SQLITE_FDS = 8
# Redis beyond its pool: the pipelined reader, the pub/sub connection, sentinel/cluster lookups.
_REDIS_EXTRA_FDS = 10
_MIN_CLIENT_CONNECTIONS = 16


def listen_backlog(nofile: int) -> int:
    """The proxy port's listen backlog for a descriptor limit.

    The event loop accepts up to this many connections at one wake-up before any is admitted
    (each a descriptor), so it is part of the reserve: small limits get a small backlog.
    """
    return max(16, min(1024, nofile // 16))


def client_connection_cap(settings: Settings, nofile: int | None = None) -> int:
    """``TIERPROXY_MAX_CLIENT_CONNECTIONS``, or what ``nofile`` (default: the soft
    RLIMIT_NOFILE) leaves after the reserve; ValueError (one line) if the limit cannot hold it.
    """
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY:  # (-1) some systems allow an unlimited soft limit
        nofile = 1 << 20
    reserve = (
        settings.origin_max_connections
        + (settings.redis_max_connections + _REDIS_EXTRA_FDS if settings.redis_url else 0)
        + (_SQLITE_FDS if settings.sqlite_path else 0)
        + ADMIN_MAX_CONNECTIONS
        + ADMIN_BACKLOG
        + _PROCESS_FDS
        + listen_backlog(nofile)
    )
    available = nofile - reserve
    what = (
        f"RLIMIT_NOFILE={nofile} leaves {available} descriptors for client connections "
        f"after {reserve} reserved (TIERPROXY_ORIGIN_MAX_CONNECTIONS, "
        "TIERPROXY_REDIS_MAX_CONNECTIONS, SQLite, the admin port, the process)"
    )
    configured = settings.max_client_connections
    if configured is not None:
        if configured > available:
            raise ValueError(
                f"TIERPROXY_MAX_CLIENT_CONNECTIONS={configured} is more than "
                f"{what}: lower it, or raise the hard descriptor limit"
            )
        return configured
    if available < _MIN_CLIENT_CONNECTIONS:
        raise ValueError(
            f"{what}: raise the hard descriptor limit (ulimit -Hn), or lower the pools"
        )
    return available


def counted_cap(metrics: Metrics, limit: int, listener: str) -> ConnectionCap:
    """A :class:`~tierproxy.aiohttp_internals.ConnectionCap` of ``limit`` connections for
    ``listener`` (``proxy``, ``admin``), its connections and sheds counted in ``metrics``."""
    shed = metrics.client_connections_shed
    episodes = metrics.client_connection_cap_episodes.labels(listener)
    cap = ConnectionCap(
        limit,
        listener,
        shed=lambda action: shed.labels(listener, action).inc(),
        episode=episodes.inc,
    )
    metrics.client_connections.labels(listener).set_function(lambda: len(cap))
    metrics.client_connections_max.labels(listener).set(limit)
    return cap
