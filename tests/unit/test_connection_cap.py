"""The client connection cap derived from the descriptor limit (issue 10 §6), and its setting."""

from __future__ import annotations

import pytest

from tierproxy.config import ConfigError, load_settings
from tierproxy.listener import (
    ADMIN_BACKLOG,
    ADMIN_MAX_CONNECTIONS,
    client_connection_cap,
    listen_backlog,
)

ORIGIN = {"TIERPROXY_ORIGIN": "http://127.0.0.1:9000"}


def test_the_default_cap_leaves_a_reserve_for_every_other_descriptor() -> None:
    settings = load_settings(ORIGIN)  # L3 on, L2 off, 100 origin connections
    assert settings.max_client_connections is None
    reserve = 100 + 8 + ADMIN_MAX_CONNECTIONS + ADMIN_BACKLOG + 64 + listen_backlog(1024)
    assert client_connection_cap(settings, 1024) == 1024 - reserve
    with_redis = load_settings({**ORIGIN, "TIERPROXY_REDIS_URL": "redis://127.0.0.1:6390/0"})
    # Redis: its pool (64), the pipelined reader, pub/sub and discovery.
    assert client_connection_cap(with_redis, 1024) == 1024 - reserve - 64 - 10
    assert client_connection_cap(settings, 1 << 20) > 1_000_000


def test_a_configured_cap_is_used_when_the_limit_holds_it() -> None:
    settings = load_settings({**ORIGIN, "TIERPROXY_MAX_CLIENT_CONNECTIONS": "500"})
    assert client_connection_cap(settings, 4096) == 500
    with pytest.raises(
        ValueError,
        match=r"TIERPROXY_MAX_CLIENT_CONNECTIONS=500 is more than "
        r"RLIMIT_NOFILE=512 leaves",
    ):
        client_connection_cap(settings, 512)


def test_a_limit_too_small_for_the_reserve_is_an_error() -> None:
    with pytest.raises(ValueError, match="raise the hard descriptor limit"):
        client_connection_cap(load_settings(ORIGIN), 200)


@pytest.mark.parametrize("value", ["0", "-5", "many", "1.5"])
def test_bad_max_client_connections_values_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="TIERPROXY_MAX_CLIENT_CONNECTIONS"):
        load_settings({**ORIGIN, "TIERPROXY_MAX_CLIENT_CONNECTIONS": value})
