"""The per-second series both load generators write (the Locust user in locustfile.py, the
open-model generator in openloop.py): key sampling, latency buckets, outcome classes.

Each line of the series is one wall-clock second of answers; its fields and the outcome
classes are described in loadtest/locustfile.py's docstring.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import random
import time
from collections import Counter
from typing import Any

MAX_ERROR_DETAILS = 500

# Latency histogram: bucket b covers [H0 * G**b, H0 * G**(b+1)) milliseconds.
H0 = 0.02
G = 1.04
_LOG_G = math.log(G)


def bucket_of(ms: float) -> int:
    return max(0, int(math.log(max(ms, H0) / H0) / _LOG_G))


def bucket_value(b: int) -> float:
    return float(H0 * G ** (b + 0.5))


class Zipf:
    """Draw ranks 0..n-1 with probability proportional to 1/(rank+1)**s."""

    def __init__(self, n: int, s: float, rng: random.Random) -> None:
        if n < 1:
            raise ValueError("LT_KEYS must be >= 1")
        self.rng = rng
        self.cum = list(itertools.accumulate(1.0 / (r**s) for r in range(1, n + 1)))
        self.total = self.cum[-1]

    def draw(self) -> int:
        return min(bisect.bisect_left(self.cum, self.rng.random() * self.total), len(self.cum) - 1)


def pct(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return 0.0
    i = min(len(sorted_vals) - 1, max(0, math.ceil(p / 100.0 * len(sorted_vals)) - 1))
    return sorted_vals[i]


class Recorder:
    """Per-second buckets, flushed to LT_TIMESERIES as JSON lines."""

    def __init__(self, path: str, errors_path: str = "") -> None:
        self.path = path
        self.buckets: dict[int, dict[str, Any]] = {}
        # keys with a 200 since their last purge -> (time, X-Cache) of the first such 200
        self.seen: dict[str, tuple[float, str | None]] = {}  # bounded by LT_KEYS
        self.purged_at: dict[str, float] = {}  # key -> monotonic time its last PURGE finished
        self._fh = open(path, "a", buffering=1) if path else None  # noqa: SIM115 - closed on quit
        self._errors = open(errors_path, "a", buffering=1) if errors_path else None  # noqa: SIM115
        self._error_count = 0

    def detail(self, **fields: Any) -> None:
        """Keep what an unexpected answer looked like, so a report can say which key and why."""
        if self._errors is None or self._error_count >= MAX_ERROR_DETAILS:
            return
        self._error_count += 1
        self._errors.write(json.dumps({"t": round(time.time(), 3), **fields}, default=str) + "\n")

    def classify_get(self, key: str, status: int, started: float, xcache: str | None) -> str:
        """The outcome class of a GET answer (module docstring); `started` is the request's
        time.perf_counter() when it was sent. A 200 marks the key as received."""
        if 200 <= status < 300 or status == 304:
            # A GET that started before the key's last PURGE finished may have been served
            # the copy that PURGE then removed: it doesn't prove a copy exists now.
            if started > self.purged_at.get(key, 0.0) and key not in self.seen:
                self.seen[key] = (time.time(), xcache)
            return "ok"
        if status >= 500:
            return "err_cached" if key in self.seen else "err_uncached"
        if status >= 400:
            return "http_4xx"
        if status == 0:
            return "client_error"
        return "ok"

    def purge_started(self, key: str) -> None:
        self.seen.pop(key, None)
        self.purged_at[key] = math.inf  # until it finishes, no GET proves a copy exists

    def purge_finished(self, key: str) -> None:
        self.purged_at[key] = time.perf_counter()

    @staticmethod
    def classify_purge(status: int) -> str:
        if 200 <= status < 300 or status == 404:
            return "purge_ok"
        if status in (401, 403):
            return "purge_refused"
        if status == 503:
            return "purge_unavailable"
        return "purge_error"

    def _bucket(self, sec: int) -> dict[str, Any]:
        b = self.buckets.get(sec)
        if b is None:
            b = self.buckets[sec] = {
                "lat": [],
                "hist": Counter(),
                "xcache": Counter(),
                "cls": Counter(),
                "status": Counter(),
                "bytes": 0,
                "hist_x": {},  # X-Cache value (or "error <status>") -> latency histogram
                "first": math.inf,
                "last": 0.0,
            }
        return b

    def record(
        self, ms: float, cls: str, xcache: str | None, status: int, nbytes: int, is_get: bool
    ) -> None:
        now = time.time()
        b = self._bucket(int(now))
        b["first"] = min(b["first"], now)
        b["last"] = max(b["last"], now)
        b["cls"][cls] += 1
        b["status"][str(status)] += 1
        if is_get:
            b["lat"].append(ms)
            b["hist"][bucket_of(ms)] += 1
            b["xcache"][xcache or "(no X-Cache)"] += 1
            b["bytes"] += nbytes
            tier = (xcache or "(no X-Cache)") if cls == "ok" else f"error {status or 'none'}"
            b["hist_x"].setdefault(tier, Counter())[bucket_of(ms)] += 1

    def flush(self, upto: int | None = None) -> None:
        for sec in sorted(self.buckets):
            if upto is not None and sec >= upto:
                break
            b = self.buckets.pop(sec)
            lat = sorted(b["lat"])
            line = {
                "t": sec,
                "n": len(lat),
                "p50": round(pct(lat, 50), 3),
                "p95": round(pct(lat, 95), 3),
                "p99": round(pct(lat, 99), 3),
                "max": round(lat[-1], 3) if lat else 0.0,
                "hist": {str(k): v for k, v in sorted(b["hist"].items())},
                "xcache": dict(b["xcache"]),
                "cls": dict(b["cls"]),
                "status": dict(b["status"]),
                "bytes": b["bytes"],
                "hist_x": {
                    x: {str(k): v for k, v in sorted(h.items())} for x, h in b["hist_x"].items()
                },
                # wall times of the first and last answer in this second: the run's first and
                # last seconds are partial, and a rate over them must divide by what was used
                "first": round(b["first"], 4),
                "last": round(b["last"], 4),
            }
            if self._fh:
                self._fh.write(json.dumps(line, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self.flush()
        if self._fh:
            self._fh.close()
            self._fh = None
        if self._errors:
            self._errors.close()
            self._errors = None
