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

import itertools
import json
import os
import random
import time
from typing import Any

import gevent
from locust import FastHttpUser, constant, constant_throughput, events, task

from loadtest.series import Recorder, Zipf

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

REC = Recorder(TIMESERIES, ERRORS)
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
            cls = REC.classify_get(key, status, t0, xcache)
            if cls == "ok":
                resp.success()
            elif cls in ("err_cached", "err_uncached"):
                resp.failure(
                    f"{status} for a {'cached' if cls == 'err_cached' else 'never-cached'} key"
                )
            elif cls == "http_4xx":
                resp.failure(f"{status}")
            else:
                resp.failure(f"no answer: {type(resp.error).__name__}")
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
        REC.purge_started(key)
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
            cls = REC.classify_purge(status)
            if cls == "purge_ok":
                resp.success()
            elif cls == "purge_refused":
                resp.failure(f"PURGE refused: {status}")
            else:
                resp.failure(f"PURGE answered {status}")
        REC.purge_finished(key)
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
