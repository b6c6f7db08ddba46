"""TIERPROXY_REDIS_URL's topologies, TIERPROXY_REDIS_PASSWORD, and redaction of both."""

from __future__ import annotations

import pytest

from tierproxy import redis_url
from tierproxy.config import ConfigError, load_settings

ORIGIN = {"TIERPROXY_ORIGIN": "http://127.0.0.1:9000"}


def test_single_server_forms_are_unchanged() -> None:
    for url in (
        "redis://127.0.0.1:6390/0",
        "rediss://cache.internal:6380/1?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem",
        "unix:///run/redis.sock?db=2",
    ):
        target = redis_url.parse(url)
        assert (target.kind, target.url) == (redis_url.SINGLE, url)
        assert load_settings({**ORIGIN, "TIERPROXY_REDIS_URL": url}).redis_url == url


def test_sentinel_url() -> None:
    target = redis_url.parse("redis+sentinel://s1:26380,s2,[::1]:26381/mymaster/3")
    assert target.kind == redis_url.SENTINEL
    assert target.nodes == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert (target.service, target.db, target.password) == ("mymaster", 3, None)
    assert redis_url.parse("redis+sentinel://s1/mymaster").db == 0


def test_cluster_url() -> None:
    target = redis_url.parse("redis+cluster://n1:7000,n2:7001,n3")
    assert target.kind == redis_url.CLUSTER
    assert target.nodes == (("n1", 7000), ("n2", 7001), ("n3", 6379))


def test_password_from_the_url_wins_over_the_variable() -> None:
    assert redis_url.parse("redis://:fromurl@h:1/0", "fromenv").password == "fromurl"
    assert redis_url.parse("redis://h:1/0", "fromenv").password == "fromenv"
    target = redis_url.parse("redis+cluster://user:p%40ss@n1:7000", "fromenv")
    assert (target.username, target.password) == ("user", "p@ss")
    assert redis_url.parse("redis+sentinel://s1/m", "fromenv").password == "fromenv"
    settings = load_settings(
        {**ORIGIN, "TIERPROXY_REDIS_URL": "redis://h:1", "TIERPROXY_REDIS_PASSWORD": "sekrit-pw"}
    )
    assert settings.redis_password == "sekrit-pw"
    assert "sekrit-pw" not in repr(settings)


def test_redact_never_shows_a_password() -> None:
    assert redis_url.redact("redis://user:sekrit@h:1/0") == "redis://user:***@h:1/0"
    assert redis_url.redact("redis://:sekrit@h:1/0") == "redis://:***@h:1/0"
    assert redis_url.redact("redis+sentinel://u:sekrit@a:1,b:2/m") == (
        "redis+sentinel://u:***@a:1,b:2/m"
    )
    assert redis_url.redact("redis://h:1/0") == "redis://h:1/0"
    assert "sekrit" not in repr(redis_url.parse("redis://:sekrit@h:1/0"))


@pytest.mark.parametrize(
    "value",
    [
        "http://localhost",
        "redis+sentinel://s1:26379",  # no service name
        "redis+sentinel://s1:26379/",
        "redis+sentinel://s1:26379/m/x",  # db not a number
        "redis+sentinel://s1:26379/m/0/extra",
        "redis+sentinel://s1:99999/m",
        "redis+sentinel://:sekrit@/m",  # no host
        "redis+cluster://n1:7000/0",  # cluster has database 0 only
        "redis+cluster://n1:7000?ssl=true",
        "redis+cluster://n1:7000,,n2",
        "redis+cluster://:sekrit@bad host:1",
        "redis://h:1/0?ssl_ca_certs=/ca.pem",  # TLS options need rediss://
        "rediss://h:1/0?ssl_cert_reqs=maybe",
        "redis://:sekrit@h:notaport/0",
    ],
)
def test_bad_url_is_one_line_naming_the_variable_without_the_password(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**ORIGIN, "TIERPROXY_REDIS_URL": value})
    message = str(info.value)
    assert message.startswith("TIERPROXY_REDIS_URL=")
    assert "redis+sentinel://" in message and "redis+cluster://" in message  # what is allowed
    assert "\n" not in message
    assert "sekrit" not in message
