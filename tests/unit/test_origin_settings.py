"""TIERPROXY_ORIGIN_QUEUE_TIMEOUT and TIERPROXY_STREAM_TIMEOUT: defaults and validation."""

from __future__ import annotations

import pytest

from tierproxy.config import ConfigError, load_settings

ORIGIN = {"TIERPROXY_ORIGIN": "http://127.0.0.1:9000"}


def test_defaults() -> None:
    s = load_settings(ORIGIN)
    assert s.origin_queue_timeout == 0.5  # the design card's default
    assert s.stream_timeout == 300.0


def test_values_are_read() -> None:
    s = load_settings(
        {**ORIGIN, "TIERPROXY_ORIGIN_QUEUE_TIMEOUT": "0.05", "TIERPROXY_STREAM_TIMEOUT": "3600"}
    )
    assert (s.origin_queue_timeout, s.stream_timeout) == (0.05, 3600.0)


@pytest.mark.parametrize("name", ["TIERPROXY_ORIGIN_QUEUE_TIMEOUT", "TIERPROXY_STREAM_TIMEOUT"])
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**ORIGIN, name: value})
    message = str(info.value)
    assert name in message and "\n" not in message
