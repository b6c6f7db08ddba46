"""TIERPROXY_STALE_DEADLINE and TIERPROXY_ORIGIN_RETRIES: defaults, and one clear line per
bad value at start-up."""

from __future__ import annotations

import pytest

from tierproxy.config import ConfigError, load_settings

ORIGIN = {"TIERPROXY_ORIGIN": "http://127.0.0.1:9000"}


def test_defaults_stale_deadline_off_and_one_retry() -> None:
    settings = load_settings(ORIGIN)
    assert settings.stale_deadline == 0
    assert settings.origin_retries == 1


def test_values_are_read() -> None:
    settings = load_settings(
        {**ORIGIN, "TIERPROXY_STALE_DEADLINE": "0.25", "TIERPROXY_ORIGIN_RETRIES": "3"}
    )
    assert (settings.stale_deadline, settings.origin_retries) == (0.25, 3)
    assert load_settings({**ORIGIN, "TIERPROXY_ORIGIN_RETRIES": "0"}).origin_retries == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TIERPROXY_STALE_DEADLINE", "-0.1"),
        ("TIERPROXY_STALE_DEADLINE", "nan"),
        ("TIERPROXY_STALE_DEADLINE", "soon"),
        ("TIERPROXY_STALE_DEADLINE", "3"),  # not before the request deadline (3 s)
        ("TIERPROXY_ORIGIN_RETRIES", "-1"),
        ("TIERPROXY_ORIGIN_RETRIES", "11"),
        ("TIERPROXY_ORIGIN_RETRIES", "1.5"),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**ORIGIN, name: value})
    message = str(info.value)
    assert name in message
    assert "\n" not in message
