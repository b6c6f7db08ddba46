"""TIERPROXY_MAX_INFLIGHT: its default (derived from the origin pool), 0 = off, validation;
and the count of requests that need the origin (upstream.InflightLimit)."""

from __future__ import annotations

import pytest

from tierproxy.config import ConfigError, load_settings
from tierproxy.metrics import Metrics
from tierproxy.upstream import InflightLimit

ORIGIN = {"TIERPROXY_ORIGIN": "http://127.0.0.1:9000"}


def test_the_default_is_four_origin_pools() -> None:
    assert load_settings(ORIGIN).max_inflight == 400  # 4 x TIERPROXY_ORIGIN_MAX_CONNECTIONS=100
    small = load_settings({**ORIGIN, "TIERPROXY_ORIGIN_MAX_CONNECTIONS": "3"})
    assert small.max_inflight == 12
    assert load_settings({**ORIGIN, "TIERPROXY_MAX_INFLIGHT": ""}).max_inflight == 400


@pytest.mark.parametrize(("raw", "value"), [("0", 0), ("1", 1), (" 50 ", 50), ("1000000", 10**6)])
def test_values_are_read(raw: str, value: int) -> None:
    assert load_settings({**ORIGIN, "TIERPROXY_MAX_INFLIGHT": raw}).max_inflight == value


@pytest.mark.parametrize("raw", ["-1", "1.5", "many", "nan", "10000001"])
def test_bad_value_names_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**ORIGIN, "TIERPROXY_MAX_INFLIGHT": raw})
    message = str(info.value)
    assert "TIERPROXY_MAX_INFLIGHT" in message and repr(raw) in message and "\n" not in message
    assert "0 = off" in message


def _gauge(metrics: Metrics) -> float:
    return float(metrics.registry.get_sample_value("tierproxy_origin_inflight") or 0.0)


def test_the_limit_admits_up_to_its_value_and_counts_what_it_admits() -> None:
    metrics = Metrics()
    limit = InflightLimit(2, metrics)
    assert limit.enter() and limit.enter()
    assert not limit.enter() and not limit.enter()  # above it: refused, not counted
    assert limit.count == 2 and _gauge(metrics) == 2
    limit.leave()
    assert limit.enter()
    limit.leave()
    limit.leave()
    assert limit.count == 0 and _gauge(metrics) == 0


def test_zero_admits_everything() -> None:
    metrics = Metrics()
    limit = InflightLimit(0, metrics)
    assert all(limit.enter() for _ in range(1000))
    assert limit.count == 1000 and _gauge(metrics) == 1000
