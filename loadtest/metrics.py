"""Read the proxy's Prometheus text: parse, diff two scrapes, sum by label."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

Sample = tuple[str, tuple[tuple[str, str], ...]]  # (name, sorted labels)

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def _unescape(v: str) -> str:
    return v.replace(r"\\", "\x00").replace(r"\"", '"').replace(r"\n", "\n").replace("\x00", "\\")


def parse(text: str, prefix: str = "", keep_created: bool = False) -> dict[Sample, float]:
    """Samples of a Prometheus text exposition; ``*_created`` timestamps are left out by default."""
    out: dict[Sample, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        name = m.group(1)
        if prefix and not name.startswith(prefix):
            continue
        if not keep_created and name.endswith("_created"):
            continue
        labels: list[tuple[str, str]] = []
        if m.group(3):
            labels = [(k, _unescape(v)) for k, v in _LABEL.findall(m.group(3))]
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        out[(name, tuple(sorted(labels)))] = value
    return out


def key_str(s: Sample) -> str:
    name, labels = s
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


def select(samples: Mapping[Sample, float], name: str, **match: str) -> dict[Sample, float]:
    return {
        s: v
        for s, v in samples.items()
        if s[0] == name and all(dict(s[1]).get(k) == want for k, want in match.items())
    }


def total(samples: Mapping[Sample, float], name: str, **match: str) -> float:
    return sum(select(samples, name, **match).values())


def by_label(
    samples: Mapping[Sample, float], name: str, label: str, **match: str
) -> dict[str, float]:
    out: dict[str, float] = {}
    for s, v in select(samples, name, **match).items():
        lv = dict(s[1]).get(label, "")
        out[lv] = out.get(lv, 0.0) + v
    return out


def diff(before: Mapping[Sample, float], after: Mapping[Sample, float]) -> dict[Sample, float]:
    """after - before for every series in `after` (a series new in `after` counts from 0)."""
    return {s: v - before.get(s, 0.0) for s, v in after.items()}


def counters_only(samples: Mapping[Sample, float]) -> dict[Sample, float]:
    return {s: v for s, v in samples.items() if s[0].endswith(("_total", "_count", "_sum"))}


def compact(
    samples: Mapping[Sample, float], drop_buckets: bool = True, drop_zero: bool = True
) -> dict[str, float]:
    return {
        key_str(s): round(v, 6)
        for s, v in sorted(samples.items())
        if not (drop_buckets and s[0].endswith("_bucket")) and not (drop_zero and v == 0)
    }


def histogram_quantile(
    samples: Mapping[Sample, float], name: str, q: float, **match: str
) -> float | None:
    """Prometheus-style quantile from cumulative `name_bucket` series (summed over other labels)."""
    buckets: dict[float, float] = {}
    for s, v in select(samples, name + "_bucket", **match).items():
        le = dict(s[1]).get("le")
        if le is None:
            continue
        b = float("inf") if le in ("+Inf", "Inf") else float(le)
        buckets[b] = buckets.get(b, 0.0) + v
    if not buckets:
        return None
    items = sorted(buckets.items())
    count = items[-1][1]
    if count <= 0:
        return None
    rank = q * count
    prev_le, prev_c = 0.0, 0.0
    for edge, c in items:
        if c >= rank:
            if edge == float("inf"):
                return prev_le
            if c == prev_c:
                return edge
            return prev_le + (edge - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = edge, c
    return items[-1][0]


def names(samples: Iterable[Sample]) -> set[str]:
    return {s[0] for s in samples}
