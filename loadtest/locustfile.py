"""Locust user for tierproxy: Zipf-distributed keys, a few PURGEs, per-second time series.

Run through ``python -m loadtest.run SCENARIO`` (which sets everything below), or by hand:

    LT_KEYS=1000 locust -f loadtest/locustfile.py --headless -u 20 -r 20 -t 30s \
        --host http://127.0.0.1:8080

Configuration (environment variables):

| variable          | default  | meaning                                                          |
|-------------------|----------|------------------------------------------------------------------|
| LT_KEYS           | 10000    | key space: paths ``{LT_PREFIX}0 .. {LT_PREFIX}{LT_KEYS-1}``       |
| LT_PREFIX         | /k/      | path prefix of the keys                                          |
| LT_ZIPF_S         | 1.1      | Zipf exponent; key of rank r is drawn with weight 1/r^s (0 = uniform) |
| LT_RPS_PER_USER   | 0        | each user's target rate (constant_throughput); 0 = as fast as it can |
| LT_PURGE_RATIO    | 0.001    | share of tasks that send ``PURGE <key>`` instead of ``GET``       |
| LT_PURGE_TOKEN    | (unset)  | bearer token for PURGE; unset = no purges                        |
| LT_CLIENT_TIMEOUT | 10       | seconds before the client gives up on one request                |
| LT_TIMESERIES     | (unset)  | file to append one JSON line per second to (see below)           |
| LT_SEED           | (unset)  | seed for the key sampler (per user: seed + user number)          |
| LT_ERRORS         | (unset)  | file to append details of the first 500 non-ok answers to (JSONL) |
| LT_FINAL_STATS    | (unset)  | file for Locust's aggregate numbers, written when Locust quits   |

Each time-series line is one wall-clock second: request count, latency percentiles of the
GETs that finished in that second, a log-bucket latency histogram (so any window's
percentiles can be merged exactly to ~2 %), the same histogram per ``X-Cache`` value of the
ok GETs and per status of the failed ones (``hist_x``: ``{"HIT-L1": {...}, "error 504": {...}}``),
the wall times of the second's first and last answer (``first``, ``last``), counts per
``X-Cache`` value and per outcome class:

    ok            2xx/304
    err_cached    5xx for a key this run had already received a 200 for (and not purged
                  since) — the proxy should have had a copy to serve stale
    err_uncached  5xx for a key never received (or purged since) — expected during an
                  origin outage, unexpected otherwise
    http_4xx      a 4xx answer to a GET
    client_error  no HTTP answer: connection refused/reset, client timeout
    purge_ok / purge_refused / purge_unavailable / purge_error
                  PURGE answered 2xx or 404 / 401 or 403 / 503 / anything else
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import os
import random
import time
from collections import Counter
from typing import Any

import gevent
from locust import FastHttpUser, constant, constant_throughput, events, task

KEYS = int(os.environ.get("LT_KEYS", "10000"))
PREFIX = os.environ.get("LT_PREFIX", "/k/")
ZIPF_S = float(os.environ.get("LT_ZIPF_S", "1.1"))
RPS_PER_USER = float(os.environ.get("LT_RPS_PER_USER", "0"))
PURGE_RATIO = float(os.environ.get("LT_PURGE_RATIO", "0.001"))
PURGE_TOKEN = os.environ.get("LT_PURGE_TOKEN", "")
CLIENT_TIMEOUT = float(os.environ.get("LT_CLIENT_TIMEOUT", "10"))
TIMESERIES = os.environ.get("LT_TIMESERIES", "")
SEED = os.environ.get("LT_SEED", "")
ERRORS = os.environ.get("LT_ERRORS", "")
FINAL_STATS = os.environ.get("LT_FINAL_STATS", "")
MAX_ERROR_DETAILS = 500

# Latency histogram: bucket b covers [H0 * G**b, H0 * G**(b+1)) milliseconds.
H0 = 0.02
G = 1.04
_LOG_G = math.log(G)


def bucket_of(ms: float) -> int:
    return max(0, int(math.log(max(ms, H0) / H0) / _LOG_G))


def bucket_value(b: int) -> float:
    return H0 * G ** (b + 0.5)


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

    def __init__(self, path: str) -> None:
        self.path = path
        self.buckets: dict[int, dict[str, Any]] = {}
        # keys with a 200 since their last purge -> (time, X-Cache) of the first such 200
        self.seen: dict[str, tuple[float, str | None]] = {}  # bounded by LT_KEYS
        self.purged_at: dict[str, float] = {}  # key -> monotonic time its last PURGE finished
        self._fh = open(path, "a", buffering=1) if path else None  # noqa: SIM115 - closed on quit
        self._errors = open(ERRORS, "a", buffering=1) if ERRORS else None  # noqa: SIM115
        self._error_count = 0

    def detail(self, **fields: Any) -> None:
        """Keep what an unexpected answer looked like, so a report can say which key and why."""
        if self._errors is None or self._error_count >= MAX_ERROR_DETAILS:
            return
        self._error_count += 1
        self._errors.write(json.dumps({"t": round(time.time(), 3), **fields}, default=str) + "\n")

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


REC = Recorder(TIMESERIES)
_flusher: list[Any] = []


def _flush_loop() -> None:
    while True:
        gevent.sleep(1.0)
        REC.flush(upto=int(time.time()))


@events.test_start.add_listener
def _on_start(environment: Any, **_: Any) -> None:
    if not _flusher:
        _flusher.append(gevent.spawn(_flush_loop))


@events.quitting.add_listener
def _on_quit(environment: Any, **_: Any) -> None:
    for g in _flusher:
        g.kill(block=False)
    REC.close()
    if FINAL_STATS:
        write_final_stats(environment, FINAL_STATS)


def write_final_stats(environment: Any, path: str) -> None:
    """Locust's aggregate row as it stands when Locust quits. Its --csv stats file is rewritten
    once a second by a background writer and not again at exit, so it misses the last second
    and the requests that finished during --stop-timeout; this file has them all."""
    t = environment.stats.total
    n = t.num_requests
    row = {
        "requests": n,
        "failures": t.num_failures,
        "rps": round(n / max(1e-3, (t.last_request_timestamp or 0) - t.start_time), 2)
        if n and t.last_request_timestamp
        else 0.0,
        "avg_ms": round(t.avg_response_time, 2),
        "p50_ms": t.get_response_time_percentile(0.5) if n else None,
        "p95_ms": t.get_response_time_percentile(0.95) if n else None,
        "p99_ms": t.get_response_time_percentile(0.99) if n else None,
        "max_ms": t.max_response_time,
        "written_at": round(time.time(), 3),
    }
    with open(path, "w") as f:
        json.dump(row, f)


_user_numbers = itertools.count()


class ProxyUser(FastHttpUser):
    network_timeout = CLIENT_TIMEOUT
    connection_timeout = min(5.0, CLIENT_TIMEOUT)
    max_retries = 0
    wait_time = constant_throughput(RPS_PER_USER) if RPS_PER_USER > 0 else constant(0)

    def on_start(self) -> None:
        n = next(_user_numbers)
        rng = random.Random(int(SEED) + n) if SEED else random.Random()
        self.rng = rng
        self.zipf = Zipf(KEYS, ZIPF_S, rng)

    @task
    def read(self) -> None:
        key = f"{PREFIX}{self.zipf.draw()}"
        if PURGE_TOKEN and PURGE_RATIO > 0 and self.rng.random() < PURGE_RATIO:
            self.purge(key)
            return
        t0 = time.perf_counter()
        with self.client.get(key, name=f"GET {PREFIX}[key]", catch_response=True) as resp:
            ms = (time.perf_counter() - t0) * 1000.0
            status = resp.status_code or 0
            xcache = resp.headers.get("X-Cache") if resp.headers else None
            nbytes = len(resp.content or b"") if status else 0
            if 200 <= status < 300 or status == 304:
                cls = "ok"
                # A GET that started before the key's last PURGE finished may have been served
                # the copy that PURGE then removed: it doesn't prove a copy exists now.
                if t0 > REC.purged_at.get(key, 0.0) and key not in REC.seen:
                    REC.seen[key] = (time.time(), xcache)
                resp.success()
            elif status >= 500:
                cls = "err_cached" if key in REC.seen else "err_uncached"
                resp.failure(
                    f"{status} for a {'cached' if cls == 'err_cached' else 'never-cached'} key"
                )
            elif status >= 400:
                cls = "http_4xx"
                resp.failure(f"{status}")
            elif status == 0:
                cls = "client_error"
                resp.failure(f"no answer: {type(resp.error).__name__}")
            else:
                cls = "ok"
                resp.success()
        if cls != "ok":
            first_ok = REC.seen.get(key)
            REC.detail(
                cls=cls,
                method="GET",
                key=key,
                status=status,
                ms=round(ms, 1),
                x_cache=xcache,
                cache_status=resp.headers.get("Cache-Status") if resp.headers else None,
                body=(resp.text or "")[:200] if status else str(resp.error)[:200],
                first_ok_at=first_ok[0] if first_ok else None,
                first_ok_x_cache=first_ok[1] if first_ok else None,
            )
        REC.record(ms, cls, xcache, status, nbytes, True)

    def purge(self, key: str) -> None:
        REC.seen.pop(key, None)
        REC.purged_at[key] = math.inf  # until it finishes, no GET proves a copy exists
        t0 = time.perf_counter()
        with self.client.request(
            "PURGE",
            key,
            name="PURGE",
            catch_response=True,
            headers={"Authorization": f"Bearer {PURGE_TOKEN}"},
        ) as resp:
            ms = (time.perf_counter() - t0) * 1000.0
            status = resp.status_code or 0
            if 200 <= status < 300 or status == 404:
                cls = "purge_ok"
                resp.success()
            elif status in (401, 403):
                cls = "purge_refused"
                resp.failure(f"PURGE refused: {status}")
            elif status == 503:
                cls = "purge_unavailable"
                resp.failure("PURGE answered 503")
            else:
                cls = "purge_error"
                resp.failure(f"PURGE answered {status}")
        REC.purged_at[key] = time.perf_counter()
        if cls != "purge_ok":
            REC.detail(
                cls=cls,
                method="PURGE",
                key=key,
                status=status,
                ms=round(ms, 1),
                body=(resp.text or "")[:200] if status else str(resp.error)[:200],
            )
        REC.record(ms, cls, None, status, 0, False)
