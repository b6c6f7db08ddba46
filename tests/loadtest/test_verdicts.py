"""Verdicts of the load-test scenarios (loadtest/verdicts.py): a FAIL must reach the exit code.

Pure functions over a run's summary, so these run in milliseconds; the end-to-end path (a real
run judged, and judged again with a threshold it cannot meet) is in test_smoke.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from loadtest.verdicts import COMMON, METRICS, Expect, exit_code, judge, table, with_overrides


def _summary(p99_ms: float, unexpected: int = 0) -> dict[str, Any]:
    return {
        "requests": 100,
        "errors": {"unexpected": unexpected},
        "latency_ms": {"p99_ms": p99_ms},
        "overall": {"get_requests": 100, "classes": {"ok": 100 - unexpected}},
        "x_cache": {"HIT-L1": 90, "MISS": 10},
        "hit_ratio": {"any_hit": 0.9},
    }


def test_all_pass_exits_0_and_one_fail_exits_1() -> None:
    expects = [*COMMON, Expect("p99_ms", "<=", 50, "latency goal")]
    passed = judge(expects, _summary(p99_ms=12.0), {"proxy_alive_at_end": True})
    assert [v["ok"] for v in passed] == [True] * 4
    assert exit_code(passed) == 0

    failed = judge(expects, _summary(p99_ms=80.0), {"proxy_alive_at_end": True})
    assert [v["name"] for v in failed if not v["ok"]] == ["p99_ms <= 50"]
    assert exit_code(failed) == 1
    assert "| **FAIL** | `p99_ms <= 50` | 80 |" in table(failed)


def test_a_dead_proxy_or_an_unexpected_error_fails() -> None:
    v = judge(COMMON, _summary(p99_ms=1.0, unexpected=1), {"proxy_alive_at_end": False})
    assert {x["metric"] for x in v if not x["ok"]} == {"unexpected_errors", "proxy_alive"}
    assert exit_code(v) == 1


def test_a_metric_without_data_is_a_fail_not_a_pass() -> None:
    # no fault window in the summary: the fault verdicts cannot be checked
    v = judge([Expect("stale_share_fault", ">=", 0.5)], _summary(p99_ms=1.0), {})
    assert v[0]["value"] is None and not v[0]["ok"]
    assert exit_code(v) == 1
    assert exit_code([]) == 1  # nothing judged is not a pass


def test_expectations_parse_and_reject_unknown_names() -> None:
    assert Expect.parse("p99_ms<=50") == Expect("p99_ms", "<=", 50.0, "given on the command line")
    assert Expect.parse(" ok_share >= 0.99 ").threshold == 0.99
    with pytest.raises(ValueError, match="unknown metric"):
        Expect("p99", "<=", 1)
    with pytest.raises(ValueError, match="METRIC OP NUMBER"):
        Expect.parse("p99_ms ~ 5")
    assert set(METRICS) >= {e.metric for e in COMMON}


def test_an_override_replaces_the_expectation_on_its_metric_only() -> None:
    base = [*COMMON, Expect("p99_ms", "<=", 100)]
    out = with_overrides(base, [Expect.parse("p99_ms<=0.001")])
    assert [e.name for e in out if e.metric == "p99_ms"] == ["p99_ms <= 0.001"]
    assert len(out) == len(base)
    assert exit_code(judge(out, _summary(p99_ms=5.0), {"proxy_alive_at_end": True})) == 1
