"""Settings from env: defaults, and one clear line per bad value."""

from __future__ import annotations

import pytest

from tierproxy.config import ConfigError, load_settings

ORIGIN = {"TIERPROXY_ORIGIN": "http://127.0.0.1:9000"}


def test_defaults_match_the_design_card() -> None:
    s = load_settings(ORIGIN)
    assert (s.host, s.port, s.admin_port) == ("127.0.0.1", 8080, 8081)
    assert s.redis_url is None
    assert s.sqlite_path == "./tierproxy-cache.sqlite3"
    assert (s.l1_timeout, s.l2_timeout, s.l3_timeout) == (0.01, 0.1, 0.5)
    assert (s.origin_timeout, s.request_deadline) == (2.0, 3.0)
    assert (s.l1_max_bytes, s.l3_max_bytes, s.max_entry_bytes) == (268435456, 1073741824, 8388608)
    assert (s.default_ttl, s.max_stale) == (60, 86400)
    assert s.purge_token is None
    assert (s.breaker_failures, s.breaker_cooldown) == (5, 5.0)


def test_key_prefix_and_max_ttl() -> None:
    s = load_settings(ORIGIN)
    assert (s.key_prefix, s.max_ttl) == ("", 31536000)
    s = load_settings({**ORIGIN, "TIERPROXY_KEY_PREFIX": "staging:", "TIERPROXY_MAX_TTL": "600"})
    assert (s.key_prefix, s.max_ttl) == ("staging:", 600)


def test_sqlite_off_and_redis_url() -> None:
    s = load_settings(
        {**ORIGIN, "TIERPROXY_SQLITE_PATH": "off", "TIERPROXY_REDIS_URL": "unix:///run/redis.sock"}
    )
    assert s.sqlite_path is None
    assert s.redis_url == "unix:///run/redis.sock"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TIERPROXY_ORIGIN", "ftp://x"),
        ("TIERPROXY_ORIGIN", "not a url"),
        ("TIERPROXY_ORIGIN", "http://h:99999"),
        ("TIERPROXY_L2_TIMEOUT", "-1"),
        ("TIERPROXY_L2_TIMEOUT", "fast"),
        ("TIERPROXY_L3_TIMEOUT", "nan"),
        ("TIERPROXY_REQUEST_DEADLINE", "0"),
        ("TIERPROXY_PORT", "70000"),
        ("TIERPROXY_L1_MAX_BYTES", "-5"),
        ("TIERPROXY_REDIS_URL", "http://localhost"),
        ("TIERPROXY_BREAKER_FAILURES", "0"),
        ("TIERPROXY_LOG_LEVEL", "LOUD"),
        ("TIERPROXY_PURGE_TOKEN", "short"),
        ("TIERPROXY_KEY_PREFIX", "staging\n"),
        ("TIERPROXY_KEY_PREFIX", "a b"),
        ("TIERPROXY_KEY_PREFIX", "x\x00"),
        ("TIERPROXY_KEY_PREFIX", "caf\u00e9:"),
        ("TIERPROXY_KEY_PREFIX", "p" * 65),
        ("TIERPROXY_MAX_TTL", "0"),
        ("TIERPROXY_MAX_TTL", "forever"),
        ("TIERPROXY_PURGE_LEASE", "0.1"),
        ("TIERPROXY_PURGE_LEASE", "nan"),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**ORIGIN, name: value})
    message = str(info.value)
    assert name in message
    assert "\n" not in message


def test_origin_is_required() -> None:
    with pytest.raises(ConfigError, match="TIERPROXY_ORIGIN is required"):
        load_settings({})
