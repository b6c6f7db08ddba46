"""Turn one run's raw files into summary.json, summary.md and PNG plots.

Inputs in the run folder (written by ``loadtest.run``):
    timeseries.jsonl          one line per second from the Locust user (loadtest/locustfile.py)
    metrics_timeseries.jsonl  the proxy's /metrics and the origin's /__stats, sampled each second
    locust_stats.csv          Locust's own aggregate numbers
    run.json                  scenario parameters, fault window, scrapes before/after

``python -m loadtest.report RUN_DIR`` rebuilds the summary and plots of an existing run.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from loadtest import metrics as M
from loadtest import verdicts as V

H0 = 0.02
G = 1.04

OK_CLASSES = {"ok", "purge_ok"}
ALWAYS_UNEXPECTED = {"err_cached", "http_4xx", "client_error", "purge_refused", "purge_error"}
# err_uncached (5xx for a never-cached key) and purge_unavailable (PURGE 503) are expected only
# inside a fault window whose scenario says so

# colours per X-Cache value (stable across plots)
XCACHE_COLORS = {
    "HIT-L1": "#1b9e77",
    "HIT-L2": "#66a61e",
    "HIT-L3": "#a6d854",
    "REVALIDATED": "#7570b3",
    "STALE-L1": "#e6ab02",
    "STALE-L2": "#f0c75e",
    "STALE-L3": "#fde39c",
    "MISS": "#d95f02",
    "BYPASS": "#999999",
    "ERROR": "#e7298a",
    "(no X-Cache)": "#444444",
}


def bucket_value(b: int) -> float:
    return float(H0 * G ** (b + 0.5))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line after a kill
    return out


def merge_hist(lines: list[dict[str, Any]]) -> Counter[int]:
    h: Counter[int] = Counter()
    for ln in lines:
        for k, v in ln.get("hist", {}).items():
            h[int(k)] += v
    return h


def hist_pct(h: Counter[int], p: float) -> float:
    n = sum(h.values())
    if not n:
        return 0.0
    rank = math.ceil(p / 100.0 * n)
    acc = 0
    for b in sorted(h):
        acc += h[b]
        if acc >= rank:
            return bucket_value(b)
    return bucket_value(max(h))


def span_s(lines: list[dict[str, Any]], lo: float | None = None, hi: float | None = None) -> float:
    """Seconds the lines cover: from the first answer to the last (the run's first and last
    seconds are partial), clipped to [lo, hi]; whole seconds for files without those times."""
    if not lines:
        return 0.0
    if all("first" in ln and "last" in ln for ln in lines):
        a = min(ln["first"] for ln in lines)
        b = max(ln["last"] for ln in lines)
        if lo is not None:
            a = max(a, lo)
        if hi is not None:
            b = min(b, hi)
        # one answer alone spans nothing: count at least the second it is in
        return max(b - a, 1e-3) if b > a else 1.0
    return float(len({ln["t"] for ln in lines}))


def hist_block(h: Counter[int]) -> dict[str, Any]:
    return {
        "count": sum(h.values()),
        "p50_ms": round(hist_pct(h, 50), 2),
        "p90_ms": round(hist_pct(h, 90), 2),
        "p99_ms": round(hist_pct(h, 99), 2),
        "p999_ms": round(hist_pct(h, 99.9), 2),
    }


def by_x_cache(lines: list[dict[str, Any]]) -> dict[str, Counter[int]]:
    """Latency histograms per X-Cache value of the ok GETs and per "error <status>"."""
    out: dict[str, Counter[int]] = {}
    for ln in lines:
        for x, h in (ln.get("hist_x") or {}).items():
            c = out.setdefault(x, Counter())
            for k, v in h.items():
                c[int(k)] += v
    return out


def latency_block(
    lines: list[dict[str, Any]], lo: float | None = None, hi: float | None = None
) -> dict[str, Any]:
    h = merge_hist(lines)
    n = sum(ln.get("n", 0) for ln in lines)
    secs = span_s(lines, lo, hi)
    cls: Counter[str] = Counter()
    xc: Counter[str] = Counter()
    for ln in lines:
        cls.update(ln.get("cls", {}))
        xc.update(ln.get("xcache", {}))
    return {
        "seconds": round(secs, 3),
        "get_requests": n,
        "rps": round(n / secs, 1) if secs else 0.0,
        "p50_ms": round(hist_pct(h, 50), 2),
        "p95_ms": round(hist_pct(h, 95), 2),
        "p99_ms": round(hist_pct(h, 99), 2),
        "max_ms": round(max((ln.get("max", 0.0) for ln in lines), default=0.0), 2),
        "worst_second_p99_ms": round(max((ln.get("p99", 0.0) for ln in lines), default=0.0), 2),
        "classes": dict(cls),
        "x_cache": dict(xc),
    }


def open_model(run_dir: Path) -> dict[str, Any] | None:
    """loadtest.openloop's numbers: schedule keeping and HdrHistogram percentiles of the latency
    from each request's due time (corrected) and from its send (service), without the
    encoded histograms (they stay in openloop.json)."""
    p = run_dir / "openloop.json"
    if not p.exists():
        return None
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
    raw["latency"] = {
        k: {m: v for m, v in d.items() if m != "encoded"}
        for k, d in (raw.get("latency") or {}).items()
    }
    return dict(raw)


def locust_aggregate(run_dir: Path) -> dict[str, Any]:
    final = run_dir / "locust_final.json"
    if final.exists():  # written when Locust quit: complete (locustfile.write_final_stats)
        try:
            out: dict[str, Any] = json.loads(final.read_text())
            out["source"] = "locust_final.json"
            return out
        except json.JSONDecodeError:
            pass
    p = run_dir / "locust_stats.csv"
    if not p.exists():
        return {}
    with p.open() as f:
        for row in csv.DictReader(f):
            if row.get("Name") == "Aggregated":

                def num(k: str, row: dict[str, str] = row) -> float | None:
                    try:
                        return float(row[k])
                    except (KeyError, ValueError, TypeError):
                        return None

                return {
                    "requests": num("Request Count"),
                    "failures": num("Failure Count"),
                    "rps": num("Requests/s"),
                    "avg_ms": num("Average Response Time"),
                    "p50_ms": num("50%"),
                    "p95_ms": num("95%"),
                    "p99_ms": num("99%"),
                    "max_ms": num("Max Response Time"),
                    # rewritten once a second during the run, not at exit: may miss the end
                    "source": "locust_stats.csv",
                }
    return {}


def metric_summary(before: dict[M.Sample, float], after: dict[M.Sample, float]) -> dict[str, Any]:
    d = M.diff(before, after)
    lookups: dict[str, dict[str, float]] = {}
    for s, v in M.select(d, "tierproxy_tier_lookups_total").items():
        lab = dict(s[1])
        lookups.setdefault(lab.get("tier", "?"), {})[lab.get("outcome", "?")] = v
    return {
        "responses_by_cache": M.by_label(d, "tierproxy_responses_total", "cache"),
        "responses_by_status_class": M.by_label(d, "tierproxy_responses_total", "status_class"),
        "tier_lookups": lookups,
        "origin_fetches": M.by_label(d, "tierproxy_origin_fetches_total", "outcome"),
        "stale_served": M.by_label(d, "tierproxy_stale_served_total", "reason"),
        "backfills": {
            f"{k}": v
            for k, v in _two_label(d, "tierproxy_backfills_total", "tier", "outcome").items()
        },
        "coalesced_waiters": M.total(d, "tierproxy_coalesced_waiters_total"),
        "origin_fetch_p99_s": M.histogram_quantile(d, "tierproxy_origin_fetch_seconds", 0.99),
        "tier_get_ms": {
            tier: _quantiles_ms(d, "tierproxy_tier_op_seconds", tier=tier, op="get")
            for tier in ("l1", "l2", "l3")
        },
        "gauges_at_end": {
            M.key_str(s): v
            for s, v in after.items()
            if not s[0].endswith(("_total", "_bucket", "_count", "_sum", "_created"))
        },
        "counters_delta": M.compact(M.counters_only(d)),
    }


def _quantiles_ms(d: dict[M.Sample, float], name: str, **match: str) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for q in (0.5, 0.99):
        v = M.histogram_quantile(d, name, q, **match)
        out[f"p{int(q * 100)}"] = round(v * 1000, 3) if v is not None else None
    return out


def _two_label(d: dict[M.Sample, float], name: str, a: str, b: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for s, v in M.select(d, name).items():
        lab = dict(s[1])
        out[f"{lab.get(a, '?')}/{lab.get(b, '?')}"] = (
            out.get(f"{lab.get(a, '?')}/{lab.get(b, '?')}", 0) + v
        )
    return out


def cpu_series(mts: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Per process: (time, CPU % of one core) between consecutive samples."""
    out: dict[str, list[tuple[float, float]]] = {}
    for a, b in itertools.pairwise(mts):
        ca, cb = a.get("cpu_s") or {}, b.get("cpu_s") or {}
        dt = b["t"] - a["t"]
        if dt <= 0:
            continue
        for name in cb:
            if name in ca:
                out.setdefault(name, []).append(
                    (b["t"], max(0.0, (cb[name] - ca[name]) / dt * 100))
                )
    return out


def load_samples(raw: dict[str, float] | None) -> dict[M.Sample, float]:
    """summary files store scrapes as {"name{labels}": value}; turn them back into samples."""
    if not raw:
        return {}
    return M.parse("\n".join(f"{k} {v}" for k, v in raw.items()))


def summarize(run_dir: Path, extra_expect: list[V.Expect] | None = None) -> dict[str, Any]:
    run = json.loads((run_dir / "run.json").read_text())
    lines = read_jsonl(run_dir / "timeseries.jsonl")
    fault = run.get("fault_window")  # [start_epoch, end_epoch] or None
    grace = float(run.get("error_grace_s", 0))

    def in_fault(t: int, extra: float = 0.0) -> bool:
        return bool(fault) and fault[0] - 1 <= t <= fault[1] + extra

    cls_all: Counter[str] = Counter()
    expected: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    for ln in lines:
        for c, v in ln.get("cls", {}).items():
            cls_all[c] += v
            if c in OK_CLASSES:
                continue
            if (
                c == "err_uncached"
                and run.get("uncached_errors_expected_in_fault")
                and in_fault(ln["t"], grace)
                or (
                    c == "purge_unavailable"
                    and run.get("purge_unavailable_expected_in_fault")
                    and in_fault(ln["t"], grace)
                )
            ):
                expected[c] += v
            else:  # ALWAYS_UNEXPECTED, err_uncached outside a fault, anything unknown
                unexpected[c] += v

    overall = latency_block(lines)
    requests = sum(cls_all.values())
    t_first = lines[0]["t"] if lines else 0
    t_last = lines[-1]["t"] if lines else 0
    secs = span_s(lines)
    windows: dict[str, Any] = {}
    if fault and lines:
        # a second's bucket goes to the window its start is in; each window's rate divides by
        # the span of its own answers (first to last)
        windows["before"] = latency_block([ln for ln in lines if ln["t"] < fault[0]])
        windows["during"] = latency_block([ln for ln in lines if fault[0] <= ln["t"] < fault[1]])
        windows["after"] = latency_block([ln for ln in lines if ln["t"] >= fault[1]])
    status_counts: Counter[str] = Counter()
    for ln in lines:
        status_counts.update(ln.get("status", {}))

    before = load_samples(run.get("metrics_before"))
    after = load_samples(run.get("metrics_after"))
    msum = metric_summary(before, after) if after else {}

    ob, oa = run.get("origin_before") or {}, run.get("origin_after") or {}
    origin_requests = (oa.get("requests", 0) - ob.get("requests", 0)) if oa else None
    get_requests = overall["get_requests"]
    mts = read_jsonl(run_dir / "metrics_timeseries.jsonl")
    breaker_seen: dict[str, float] = {}
    for m in mts:
        for k, v in (m.get("gauges") or {}).items():
            if k.startswith("tierproxy_breaker_open"):
                breaker_seen[k] = max(breaker_seen.get(k, 0.0), v)

    cpu: dict[str, dict[str, float]] = {}
    if lines:
        for name, pts in cpu_series(mts).items():
            vals = [v for t, v in pts if t_first <= t <= t_last + 1]
            if vals:
                cpu[name] = {"mean": round(sum(vals) / len(vals), 1), "max": round(max(vals), 1)}

    summary: dict[str, Any] = {
        "scenario": run["scenario"],
        "description": run.get("description", ""),
        "started_at": run.get("started_at"),
        "params": run.get("params", {}),
        "proxy_env": run.get("proxy_env", {}),
        "origin_args": run.get("origin_args", []),
        "duration_s": secs,
        "requests": requests,
        "get_requests": get_requests,
        "purges": sum(v for c, v in cls_all.items() if c.startswith("purge_")),
        "rps": round(requests / secs, 1) if secs else 0.0,
        "latency_ms": {k: overall[k] for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")},
        "overall": overall,
        "latency_by_x_cache": {
            x: hist_block(h) for x, h in sorted(by_x_cache(lines).items(), key=_xc_order)
        },
        "status_counts": dict(sorted(status_counts.items())),
        "x_cache": overall["x_cache"],
        "hit_ratio": _hit_ratio(overall["x_cache"]),
        "outcomes": dict(cls_all),
        "errors": {
            "expected": sum(expected.values()),
            "unexpected": sum(unexpected.values()),
            "expected_by_class": dict(expected),
            "unexpected_by_class": dict(unexpected),
        },
        "origin": {
            "requests": origin_requests,
            "requests_per_client_get": round(origin_requests / get_requests, 4)
            if origin_requests is not None and get_requests
            else None,
            "by_outcome": _counter_diff(oa.get("by_outcome", {}), ob.get("by_outcome", {})),
            "max_inflight_per_key": oa.get("max_inflight_per_key"),
            "overlapping_same_key": (
                oa.get("overlapping_same_key", 0) - ob.get("overlapping_same_key", 0)
            )
            if oa
            else None,
            "warmup_requests": run.get("origin_warmup_requests"),
            "cold_fetches_per_key": _cold_fetches_per_key(run, mts, ob),
        },
        "stale_served": msum.get("stale_served", {}),
        "proxy_metrics": msum,
        "breaker_open_max": breaker_seen,
        "cpu_percent": cpu,
        "fault": {"kind": run.get("fault"), "window_s": run.get("fault_window_rel")}
        if fault
        else None,
        "windows": windows,
        "model": run.get("model", "closed"),
        "locust": locust_aggregate(run_dir),
        "open_model": open_model(run_dir),
        "error_details": _error_details(run_dir, t_first),
        "proxy_exit": run.get("proxy_exit"),
        "notes": run.get("notes", []),
        "environment": run.get("environment", {}),
        "command": run.get("command"),
    }
    summary["verdicts"] = V.judge(expectations(run, extra_expect), summary, run)
    return summary


def expectations(run: dict[str, Any], extra: list[V.Expect] | None = None) -> list[V.Expect]:
    """The run's expectations (run.json, as the scenario declared them when it ran; for an older
    folder, the scenario's current ones), with `extra` replacing those on the same metric."""
    if "expect" in run:
        base = [V.Expect.from_json(d) for d in run["expect"]]
    else:
        from loadtest.run import SCENARIOS

        sc = SCENARIOS.get(run.get("scenario", ""))
        base = [*V.COMMON, *(sc.expect if sc else ())]
    return V.with_overrides(base, extra or [])


def _xc_order(kv: tuple[str, Any]) -> tuple[int, str]:
    order = list(XCACHE_COLORS)
    return (order.index(kv[0]) if kv[0] in order else len(order), kv[0])


def _cold_fetches_per_key(
    run: dict[str, Any], mts: list[dict[str, Any]], origin_before: dict[str, Any]
) -> float | None:
    """Origin requests per key from the load's start until the first copy could expire
    (load start + max-age), for a run that started cold: 1.0 = every key fetched once."""
    params = run.get("params") or {}
    max_age, t0, keys = run.get("origin_max_age"), run.get("load_start"), params.get("keys")
    if params.get("warmup_keys") != 0 or not max_age or not t0 or not keys:
        return None
    before = origin_before.get("requests")
    pts = [
        (m.get("origin") or {}).get("requests")
        for m in mts
        if m["t"] <= t0 + max_age and (m.get("origin") or {}).get("requests") is not None
    ]
    if before is None or not pts:
        return None
    per_key: float = round(float(pts[-1] - before) / keys, 4)
    return per_key


def _error_details(run_dir: Path, t0: int, limit: int = 20) -> list[dict[str, Any]]:
    """The first non-ok answers (from errors.jsonl), with times relative to the load start;
    err_cached ones first, since those are the interesting ones."""
    rows = read_jsonl(run_dir / "errors.jsonl")
    rows.sort(key=lambda r: (r.get("cls") != "err_cached", r.get("t", 0)))
    out = []
    for r in rows[:limit]:
        r = dict(r)
        r["t_rel"] = round(r.pop("t", 0) - t0, 2)
        if r.get("first_ok_at"):
            r["first_ok_rel"] = round(r.pop("first_ok_at") - t0, 2)
        out.append(r)
    return out


def _counter_diff(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0)}


def _hit_ratio(xc: dict[str, int]) -> dict[str, float]:
    n = sum(xc.values())
    if not n:
        return {}
    out = {k: round(v / n, 4) for k, v in sorted(xc.items())}
    out["any_hit"] = round(sum(v for k, v in xc.items() if k.startswith("HIT")) / n, 4)
    out["served_from_cache"] = round(
        sum(v for k, v in xc.items() if k.startswith(("HIT", "STALE")) or k == "REVALIDATED") / n, 4
    )
    return out


# ---------------------------------------------------------------------------------------------
# plots


def save_small_png(fig: Any, path: Path, dpi: int = 80) -> None:
    """Save a figure as a palette PNG (a third of the RGBA size, so plots are commit-sized)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    try:
        from PIL import Image

        buf.seek(0)
        img = Image.open(buf).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
        img.save(path, format="PNG", optimize=True)
    except Exception:  # Pillow missing or too old: keep matplotlib's PNG  # noqa: BLE001
        path.write_bytes(buf.getvalue())


def plot(run_dir: Path, summary: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    run = json.loads((run_dir / "run.json").read_text())
    lines = read_jsonl(run_dir / "timeseries.jsonl")
    mts = read_jsonl(run_dir / "metrics_timeseries.jsonl")
    if not lines:
        return []
    t0 = lines[0]["t"]
    fault = run.get("fault_window")
    title = f"tierproxy loadtest: {summary['scenario']}"
    written = []

    def shade(ax: Any, on_top: bool = False) -> None:
        if not fault:
            return
        a, b = fault[0] - t0, fault[1] - t0
        if on_top:  # over a filled plot: hatch and edges, drawn above the data
            ax.axvspan(
                a,
                b,
                facecolor="none",
                edgecolor="#d62728",
                hatch="//",
                lw=1.2,
                zorder=5,
                label=f"fault: {run.get('fault')}",
            )
        else:
            ax.axvspan(a, b, color="#d62728", alpha=0.12, lw=0, label=f"fault: {run.get('fault')}")

    # Time alignment: a client bucket holds the answers of [t, t+1) and is drawn at its end,
    # t+1; a /metrics rate between two samples is drawn at the later sample; a gauge at its
    # sample. So nothing is drawn before the moment it was measured: an effect never appears
    # left of its cause (the fault window is drawn where it was switched on and off).
    xs = [ln["t"] + 1 - t0 for ln in lines]
    xlabel = "seconds since load start (each point at the end of its interval)"

    # 1. latency percentiles + throughput
    cpu = cpu_series(mts)
    if cpu:
        fig, (ax1, ax2, ax3) = plt.subplots(
            3, 1, figsize=(10, 7.6), sharex=True, gridspec_kw={"height_ratios": [3, 1.3, 1.3]}
        )
    else:
        fig, (ax1, ax2) = plt.subplots(
            2, 1, figsize=(10, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]}
        )
        ax3 = None
    for key, style in (("p50", "-"), ("p95", "-"), ("p99", "-"), ("max", ":")):
        ys = [max(ln.get(key, 0.0), H0) if ln.get("n") else float("nan") for ln in lines]
        ax1.plot(xs, ys, style, lw=1.4 if key != "max" else 1.0, label=key)
    ax1.set_yscale("log")
    fmt = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax1.yaxis.set_major_formatter(fmt)
    ax1.yaxis.set_minor_formatter(
        ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.1e}"[0] in "25" else "")
    )
    ax1.set_ylabel("latency per second (ms, log)")
    shade(ax1)
    ax1.grid(True, which="both", alpha=0.25)
    ax1.legend(loc="upper left", fontsize=8, ncol=5)
    ax1.set_title(f"{title} — latency percentiles (GET, client side)")
    # per second, divided by the part of the second the load covered (the first and last
    # seconds are partial: a count there would show a dip that did not happen)
    cover = [1.0] * len(lines)
    if len(lines) > 1 and "first" in lines[0] and "last" in lines[-1]:
        cover[0] = min(1.0, max(0.05, lines[0]["t"] + 1 - lines[0]["first"]))
        cover[-1] = min(1.0, max(0.05, lines[-1]["last"] - lines[-1]["t"]))
    ok = [ln.get("cls", {}).get("ok", 0) / c for ln, c in zip(lines, cover, strict=True)]
    err = [
        sum(v for k, v in ln.get("cls", {}).items() if k not in OK_CLASSES) / c
        for ln, c in zip(lines, cover, strict=True)
    ]
    ax2.plot(xs, ok, lw=1.2, label="ok req/s", color="#1f77b4")
    ax2.plot(xs, err, lw=1.2, label="error req/s", color="#d62728")
    shade(ax2)
    ax2.set_ylabel("req/s")
    ax2.grid(True, alpha=0.25)
    ax2.legend(loc="upper left", fontsize=8, ncol=3)
    if ax3 is not None:
        for name, pts in sorted(cpu.items()):
            host_style = {"color": "#000000", "ls": ":"} if name.startswith("host") else {}
            ax3.plot(
                [t - t0 for t, _ in pts], [v for _, v in pts], lw=1.1, label=name, **host_style
            )
        ax3.axhline(100, color="#888888", lw=0.8, ls="--")
        ax3.set_ylabel("CPU % (100 = 1 core)")
        ax3.set_ylim(bottom=0)
        shade(ax3)
        ax3.grid(True, alpha=0.25)
        ax3.legend(loc="upper left", fontsize=8, ncol=4)
        ax3.set_xlabel(xlabel)
    else:
        ax2.set_xlabel(xlabel)
    fig.tight_layout()
    p = run_dir / "latency.png"
    save_small_png(fig, p)
    plt.close(fig)
    written.append(p.name)

    # 2. X-Cache share per second + tier/origin signals from /metrics
    cats = [c for c in XCACHE_COLORS if any(ln.get("xcache", {}).get(c) for ln in lines)]
    others = sorted({c for ln in lines for c in ln.get("xcache", {})} - set(cats))
    cats += others
    fig, (ax1, ax2) = plt.subplots(
        2, 1, figsize=(10, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1.6]}
    )
    stacks = []
    for c in cats:
        stacks.append(
            [ln.get("xcache", {}).get(c, 0) / ln["n"] if ln.get("n") else 0.0 for ln in lines]
        )
    if stacks:
        ax1.stackplot(
            xs,
            *stacks,
            labels=cats,
            colors=[XCACHE_COLORS.get(c, None) for c in cats],
            alpha=0.9,
            step=None,
        )
    shade(ax1, on_top=True)
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("share of GET responses")
    ax1.set_title(f"{title} — X-Cache per second (client side)")
    ax1.legend(loc="lower left", fontsize=8, ncol=min(6, max(1, len(cats) + 1)))
    ax1.grid(True, alpha=0.25)
    if len(mts) >= 2:
        mt = [m["t"] - t0 for m in mts[1:]]
        series: dict[str, list[float]] = {}

        def rate(name: str, **match: str) -> list[float]:
            out = []
            for a, b in itertools.pairwise(mts):
                sa, sb = load_samples(a.get("counters")), load_samples(b.get("counters"))
                dt = max(1e-3, b["t"] - a["t"])
                out.append(max(0.0, (M.total(sb, name, **match) - M.total(sa, name, **match)) / dt))
            return out

        def origin_rate() -> list[float]:
            out = []
            for a, b in itertools.pairwise(mts):
                ra, rb = (
                    (a.get("origin") or {}).get("requests"),
                    (b.get("origin") or {}).get("requests"),
                )
                dt = max(1e-3, b["t"] - a["t"])
                out.append(
                    max(0.0, (rb - ra) / dt) if ra is not None and rb is not None else float("nan")
                )
            return out

        series["origin requests/s (origin count)"] = origin_rate()
        series["stale served/s"] = rate("tierproxy_stale_served_total")
        for tier in ("l1", "l2", "l3"):
            for outcome in ("timeout", "error", "skipped"):
                r = rate("tierproxy_tier_lookups_total", tier=tier, outcome=outcome)
                if any(v > 0 for v in r):
                    series[f"{tier} {outcome}/s"] = r
        for name, ys in series.items():
            ax2.plot(mt, ys, lw=1.1, label=name)
        ax2.set_yscale("symlog", linthresh=1)
        ax2.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax2.set_ylabel("events/s (symlog)")
        br_any = False
        axb = ax2.twinx()
        breakers = [("l1", "#555555"), ("l2", "#000000"), ("l3", "#8c564b"), ("origin", "#d62728")]
        breakers += [(f"{t}-writes", "#bbbbbb") for t in ("l1", "l2", "l3")]
        for tier, col in breakers:
            key = f'tierproxy_breaker_open{{tier="{tier}"}}'
            ys = [(m.get("gauges") or {}).get(key, float("nan")) for m in mts[1:]]
            # the origin breaker is always drawn (beside the tiers'), the others when they opened
            if (
                tier == "origin"
                and not all(math.isnan(v) for v in ys)
                or any(not math.isnan(v) and v > 0 for v in ys)
            ):
                br_any = True
                axb.step(
                    mt, ys, where="post", lw=1.6, ls="--", color=col, label=f"breaker open {tier}"
                )
        axb.set_ylim(-0.05, 1.5)
        axb.set_yticks([0, 1])
        axb.set_ylabel("breaker open" if br_any else "")
        if br_any:
            axb.legend(loc="upper right", fontsize=8)
        else:
            axb.set_yticks([])
        ax2.legend(loc="upper left", fontsize=7, ncol=3)
    else:
        ax2.text(0.5, 0.5, "no /metrics samples", ha="center", va="center", transform=ax2.transAxes)
    shade(ax2)
    ax2.set_xlabel(xlabel)
    ax2.grid(True, alpha=0.25)
    fig.tight_layout()
    p = run_dir / "hit_ratio.png"
    save_small_png(fig, p)
    plt.close(fig)
    written.append(p.name)

    # 3. latency CDF per X-Cache value (ok GETs) and per error status
    tiers = by_x_cache(lines)
    if tiers:
        fig, ax = plt.subplots(figsize=(10, 5.2))
        for x, h in sorted(tiers.items(), key=_xc_order):
            n = sum(h.values())
            acc, px, py = 0, [], []
            for b in sorted(h):
                acc += h[b]
                px.append(H0 * G ** (b + 1))  # the bucket's upper edge: P(latency <= x)
                py.append(acc / n)
            is_error = x.startswith("error")
            ax.step(
                px,
                py,
                where="post",
                lw=1.6,
                ls="--" if is_error else "-",
                color=XCACHE_COLORS.get(x, XCACHE_COLORS["ERROR"] if is_error else None),
                label=f"{x} (n={n}, p99 {hist_pct(h, 99):.3g} ms)",
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(fmt)
        ax.set_ylim(0, 1.01)
        for q in (0.5, 0.99):
            ax.axhline(q, color="#888888", lw=0.7, ls=":")
        ax.set_xlabel("latency (ms, log; client side)")
        ax.set_ylabel("share of answers <= x")
        ax.set_title(f"{title} — latency CDF per X-Cache value (ok GETs) and per error status")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        p = run_dir / "latency_cdf.png"
        save_small_png(fig, p)
        plt.close(fig)
        written.append(p.name)
    return written


def markdown(summary: dict[str, Any]) -> str:
    s = summary
    lat = s["latency_ms"]
    lines = [
        f"### {s['scenario']}: {s['description']}",
        "",
        "| requests | req/s | p50 ms | p95 ms | p99 ms | max ms | unexpected errors | expected errors | origin requests |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        (
            f"| {s['requests']} | {s['rps']} | {lat['p50_ms']} | {lat['p95_ms']} | {lat['p99_ms']} | {lat['max_ms']} "
            f"| {s['errors']['unexpected']} | {s['errors']['expected']} | {s['origin']['requests']} |"
        ),
        "",
        "X-Cache: "
        + ", ".join(f"{k} {v}" for k, v in sorted(s["x_cache"].items(), key=lambda kv: -kv[1])),
        "",
    ]
    if s.get("cpu_percent"):
        lines += [
            "CPU % of one core (mean / max): "
            + ", ".join(
                f"{k} {v['mean']:.0f} / {v['max']:.0f}" for k, v in sorted(s["cpu_percent"].items())
            ),
            "",
        ]
    if s.get("windows"):
        lines += [
            "| window | GETs | req/s | p50 ms | p99 ms | max ms | X-Cache |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for w in ("before", "during", "after"):
            b = s["windows"].get(w)
            if b:
                xc = ", ".join(
                    f"{k} {v}" for k, v in sorted(b["x_cache"].items(), key=lambda kv: -kv[1])[:5]
                )
                lines.append(
                    f"| {w} | {b['get_requests']} | {b['rps']} | {b['p50_ms']} | {b['p99_ms']} "
                    f"| {b['max_ms']} | {xc} |"
                )
        lines.append("")
    unexpected = [
        d for d in s.get("error_details", []) if d.get("cls") in s["errors"]["unexpected_by_class"]
    ]
    if unexpected:
        lines += [
            "Unexpected answers (first 5; all in summary.json `error_details`, errors.jsonl):",
            "",
        ]
        for d in unexpected[:5]:
            lines.append(
                f"- t={d.get('t_rel')} s {d.get('method')} {d.get('key')} → {d.get('status')} "
                f"({d.get('cls')}, {d.get('ms')} ms, X-Cache {d.get('x_cache')}, "
                f"Cache-Status {d.get('cache_status')!r}, body {str(d.get('body', ''))[:80]!r}"
                + (
                    f"; first 200 at t={d['first_ok_rel']} s as {d.get('first_ok_x_cache')}"
                    if d.get("first_ok_rel") is not None
                    else ""
                )
                + ")"
            )
        lines.append("")
    if s.get("latency_by_x_cache"):
        lines += [
            "Latency by X-Cache (ok GETs) and by status (failed GETs), client side:",
            "",
            "| answered as | GETs | p50 ms | p90 ms | p99 ms | p99.9 ms |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for x, b in s["latency_by_x_cache"].items():
            lines.append(
                f"| {x} | {b['count']} | {b['p50_ms']} | {b['p90_ms']} | {b['p99_ms']} "
                f"| {b['p999_ms']} |"
            )
        lines.append("")
    om = s.get("open_model")
    if om and om.get("latency"):
        head = (
            f"Open model: {om['sent']}/{om['scheduled']} requests sent on schedule at "
            f"{om['rate']:g}/s, {om['late_starts']} sent > 1 ms after their due time (max "
            f"{om['max_late_ms']} ms; *send lag* below). HdrHistogram; *corrected* = from the due "
            "time (coordinated omission corrected), *service* = from the send:"
        )
        lines += [
            head,
            "",
            "| latency | GETs | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for k, d in om["latency"].items():
            lines.append(
                f"| {k} | {d['count']} | {d['p50_ms']} | {d['p90_ms']} | {d['p99_ms']} "
                f"| {d['p99.9_ms']} | {d['p100_ms']} |"
            )
        lines.append("")
    errs = {k: v for k, v in (s.get("status_counts") or {}).items() if not _ok_status(k)}
    if errs:
        lines += [
            "Non-2xx/304 answers by status (GET and PURGE; 0 = no answer): "
            + ", ".join(f"{k}: {v}" for k, v in errs.items()),
            "",
        ]
    verdicts = s.get("verdicts")
    if verdicts is None:  # a summary written before verdicts existed
        lines += ["(no verdicts in this summary)"]
    else:
        failed = sum(1 for v in verdicts if not v["ok"])
        verdict = "FAIL" if failed or not verdicts else "PASS"
        lines += [
            f"Verdicts: {verdict} ({len(verdicts) - failed}/{len(verdicts)} passed)",
            "",
            V.table(verdicts),
        ]
    return "\n".join(lines) + "\n"


def _ok_status(code: str) -> bool:
    return code == "304" or code.startswith("2")


def build(
    run_dir: Path, plots: bool = True, extra_expect: list[V.Expect] | None = None
) -> dict[str, Any]:
    summary = summarize(run_dir, extra_expect)
    if plots:
        try:
            summary["plots"] = plot(run_dir, summary)
        except ImportError as e:
            summary["plots"] = []
            summary["notes"].append(f"plots skipped: {e}")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    (run_dir / "summary.md").write_text(markdown(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.report",
        description="Rebuild summary.json, summary.md and the plots of a run folder and judge "
        "its verdicts again; exit 0 when all pass, 1 on any FAIL, 2 when the folder cannot be "
        "read.",
    )
    ap.add_argument("run_dir", type=Path)
    ap.add_argument(
        "--expect",
        action="append",
        default=[],
        metavar="METRIC<=N",
        help="judge with this threshold instead of the run's own for that metric (repeatable), "
        "e.g. --expect 'p99_ms<=50'",
    )
    ap.add_argument("--no-plots", action="store_true")
    ns = ap.parse_args(argv)
    try:
        extra = [V.Expect.parse(e) for e in ns.expect]
    except ValueError as e:
        ap.error(str(e))
    d: Path = ns.run_dir
    if not (d / "run.json").exists():
        # loadtest/results/ keeps only each run's summary and plots: nothing to rebuild from
        if (d / "summary.json").exists():
            print(
                f"{d} has no run.json (a results folder keeps only the summary and plots): "
                "showing its summary.md; rebuilding needs the run folder loadtest.run wrote",
                file=sys.stderr,
            )
            old = json.loads((d / "summary.json").read_text())
            print(markdown(old))
            return V.exit_code(old["verdicts"]) if "verdicts" in old else 0
        print(f"{d}: no run.json - not a folder written by python -m loadtest.run", file=sys.stderr)
        return 2
    s = build(d, plots=not ns.no_plots, extra_expect=extra)
    print(markdown(s))
    return V.exit_code(s["verdicts"])


if __name__ == "__main__":
    raise SystemExit(main())
