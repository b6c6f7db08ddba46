"""Verdicts: each scenario's expectations, judged PASS/FAIL on a run's summary.

A scenario (``loadtest/run.py``) declares its expectations as ``Expect(metric, op, threshold,
why)`` next to its other settings; ``judge`` evaluates them on the summary that
``loadtest.report`` builds, and ``exit_code`` turns the verdicts into the process's exit code:
0 when every expectation passed, 1 on any FAIL. A metric that cannot be computed (no traffic in
the fault window, no /metrics scrape, ...) is a FAIL too: a verdict that cannot be checked is
not a pass.

Every metric is a function of ``summary.json`` (and ``run.json`` for the run's parameters), so
``python -m loadtest.report RUN_DIR`` can judge an old run again, with other thresholds
(``--expect 'p99_ms<=50'``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

Summary = dict[str, Any]
Run = dict[str, Any]
MetricFn = Callable[[Summary, Run], float | None]

OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda v, t: v >= t,
    "<=": lambda v, t: v <= t,
    "==": lambda v, t: v == t,
    ">": lambda v, t: v > t,
    "<": lambda v, t: v < t,
}


@dataclass(frozen=True)
class Expect:
    metric: str  # a name in METRICS
    op: str  # one of OPS
    threshold: float
    why: str = ""

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; known: {', '.join(METRICS)}")
        if self.op not in OPS:
            raise ValueError(f"unknown operator {self.op!r}; known: {', '.join(OPS)}")

    @property
    def name(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Expect:
        return cls(str(d["metric"]), str(d["op"]), float(d["threshold"]), str(d.get("why", "")))

    @classmethod
    def parse(cls, text: str) -> Expect:
        """``"p99_ms<=50"`` -> Expect("p99_ms", "<=", 50)."""
        m = re.fullmatch(r"\s*([a-z0-9_]+)\s*(>=|<=|==|>|<)\s*([-+0-9.eE]+)\s*", text)
        if not m:
            raise ValueError(f"expected METRIC OP NUMBER (e.g. p99_ms<=50), got {text!r}")
        return cls(m[1], m[2], float(m[3]), "given on the command line")


def _window(s: Summary, name: str) -> dict[str, Any]:
    w: dict[str, Any] = (s.get("windows") or {}).get(name) or {}
    return w


def _share(num: float, den: float) -> float | None:
    return round(num / den, 4) if den else None


def _xc_share(xc: dict[str, int], prefix: str) -> float | None:
    return _share(sum(v for k, v in xc.items() if k.startswith(prefix)), sum(xc.values()))


def _tier_p99(s: Summary, tier: str) -> float | None:
    row = (s.get("latency_by_x_cache") or {}).get(tier)
    return None if not row else float(row["p99_ms"])


def _l2_breaker_max(s: Summary, r: Run) -> float | None:
    v = (s.get("breaker_open_max") or {}).get('tierproxy_breaker_open{tier="l2"}')
    return None if v is None else float(v)


def _l2_breaker_end(s: Summary, r: Run) -> float | None:
    g = (s.get("proxy_metrics") or {}).get("gauges_at_end") or {}
    v = g.get('tierproxy_breaker_open{tier="l2"}')
    return None if v is None else float(v)


def _fault_minus_l3(s: Summary, r: Run) -> float | None:
    during = _window(s, "during").get("p99_ms")
    l3 = _tier_p99(s, "HIT-L3")
    return None if during is None or l3 is None else round(during - l3, 2)


def _fault_minus_before(s: Summary, r: Run) -> float | None:
    b, d = _window(s, "before").get("p99_ms"), _window(s, "during").get("p99_ms")
    return None if b is None or d is None else round(d - b, 2)


def _ok_share(block: dict[str, Any]) -> float | None:
    return _share((block.get("classes") or {}).get("ok", 0), block.get("get_requests", 0))


def _cold_fetches_per_key(s: Summary, r: Run) -> float | None:
    v = (s.get("origin") or {}).get("cold_fetches_per_key")
    return None if v is None else float(v)


def _fetches_per_key_period(s: Summary, r: Run) -> float | None:
    """Origin requests / (keys x freshness periods in the run): 1 = one fetch per key each time
    its copy expires (the first fetch included), never more."""
    req = (s.get("origin") or {}).get("requests")
    max_age = r.get("origin_max_age")
    keys = (r.get("params") or {}).get("keys")
    dur = s.get("duration_s") or 0
    if req is None or not max_age or not keys or not dur:
        return None
    return round(float(req) / (int(keys) * (1 + math.ceil(float(dur) / float(max_age)))), 4)


METRICS: dict[str, tuple[str, MetricFn]] = {
    "requests": ("requests sent (GET + PURGE)", lambda s, r: s.get("requests")),
    "unexpected_errors": (
        "non-ok answers not excused by the scenario's fault (see summary errors)",
        lambda s, r: (s.get("errors") or {}).get("unexpected"),
    ),
    "proxy_alive": (
        "1 when the proxy was still running at the end",
        lambda s, r: float(bool(r.get("proxy_alive_at_end", True))),
    ),
    "ok_share": ("share of GETs answered 2xx/304, whole run", lambda s, r: _ok_share(s["overall"])),
    "ok_share_fault": (
        "share of GETs answered 2xx/304 during the fault window",
        lambda s, r: _ok_share(_window(s, "during")),
    ),
    "hit_ratio": (
        "share of GETs answered HIT-*",
        lambda s, r: (s.get("hit_ratio") or {}).get("any_hit"),
    ),
    "lower_tier_share": (
        "share of GETs answered HIT-L2 or HIT-L3",
        lambda s, r: _share(
            s["x_cache"].get("HIT-L2", 0) + s["x_cache"].get("HIT-L3", 0),
            sum(s["x_cache"].values()),
        ),
    ),
    "stale_share_fault": (
        "share of GETs answered STALE-* during the fault window",
        lambda s, r: _xc_share(_window(s, "during").get("x_cache") or {}, "STALE"),
    ),
    "err_cached": (
        "5xx answers for keys the client had received (a copy existed to serve stale)",
        lambda s, r: (s.get("outcomes") or {}).get("err_cached", 0),
    ),
    "p99_ms": ("p99 of all GETs, ms", lambda s, r: (s.get("latency_ms") or {}).get("p99_ms")),
    "p99_ms_fault": (
        "p99 of the GETs in the fault window, ms",
        lambda s, r: _window(s, "during").get("p99_ms"),
    ),
    "max_ms_fault": (
        "slowest GET in the fault window, ms",
        lambda s, r: _window(s, "during").get("max_ms"),
    ),
    "p99_fault_minus_before_ms": (
        "p99 in the fault window minus p99 before it, ms",
        _fault_minus_before,
    ),
    "p99_fault_minus_l3_hit_p99_ms": (
        "p99 in the fault window minus the p99 of the run's HIT-L3 answers, ms",
        _fault_minus_l3,
    ),
    "l2_breaker_opened": ("highest value of tierproxy_breaker_open{tier=l2}", _l2_breaker_max),
    "l2_breaker_open_at_end": ("tierproxy_breaker_open{tier=l2} at the end", _l2_breaker_end),
    "l2_hits_after_fault": (
        "HIT-L2 answers after the fault window",
        lambda s, r: (
            (_window(s, "after").get("x_cache") or {}).get("HIT-L2", 0)
            if _window(s, "after")
            else None
        ),
    ),
    "origin_inflight_per_key_max": (
        "most origin requests for one key at once (origin's count)",
        lambda s, r: (s.get("origin") or {}).get("max_inflight_per_key"),
    ),
    "cold_fetches_per_key": (
        "origin requests per key before the first copy expired (cold start)",
        _cold_fetches_per_key,
    ),
    "origin_fetches_per_key_period": (
        "origin requests / (keys x (1 + ceil(duration / max-age)))",
        _fetches_per_key_period,
    ),
}

# Every scenario's floor: traffic flowed, nothing unexcused failed, the proxy survived.
COMMON: tuple[Expect, ...] = (
    Expect("requests", ">", 0, "the load generator sent traffic"),
    Expect("unexpected_errors", "==", 0, "every non-ok answer is excused by the fault"),
    Expect("proxy_alive", "==", 1, "the proxy survives the run"),
)


def with_overrides(base: list[Expect], extra: list[Expect]) -> list[Expect]:
    """`base` with every expectation on a metric that `extra` names replaced by extra's."""
    replaced = {e.metric for e in extra}
    return [e for e in base if e.metric not in replaced] + extra


def judge(expects: Iterable[Expect], s: Summary, r: Run) -> list[dict[str, Any]]:
    out = []
    for e in expects:
        desc, fn = METRICS[e.metric]
        try:
            value = fn(s, r)
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            value = None
        ok = value is not None and OPS[e.op](float(value), e.threshold)
        out.append(
            {
                "name": e.name,
                "metric": e.metric,
                "op": e.op,
                "threshold": e.threshold,
                "value": value,
                "ok": ok,
                "why": e.why,
                "detail": desc if value is not None else f"{desc}: no data",
            }
        )
    return out


def exit_code(verdicts: Iterable[dict[str, Any]]) -> int:
    """0 when every verdict passed, 1 on any FAIL (also when there are none to judge)."""
    vs = list(verdicts)
    return 0 if vs and all(v["ok"] for v in vs) else 1


def table(verdicts: Iterable[dict[str, Any]]) -> str:
    rows = ["| verdict | expectation | value | why |", "|---|---|---:|---|"]
    for v in verdicts:
        val = "no data" if v["value"] is None else f"{v['value']:g}"
        rows.append(f"| {'PASS' if v['ok'] else '**FAIL**'} | `{v['name']}` | {val} | {v['why']} |")
    return "\n".join(rows) + "\n"
