"""Run one named load-test scenario end to end and write a report folder.

    python -m loadtest.run steady --duration 60
    python -m loadtest.run origin-outage
    python -m loadtest.run --list

One command starts the simulated origin, Redis (if the scenario uses it), the proxy
(``python -m tierproxy serve``), warms the cache if the scenario says so, runs Locust
headless for a bounded time, injects the scenario's fault in a window in the middle,
samples the proxy's /metrics and the origin's /__stats every second, and stops everything
— also on an error or Ctrl-C. All traffic stays on 127.0.0.1.

It ends with the scenario's verdicts, PASS or FAIL per expectation, and exits 0 when all
passed, 1 on any FAIL, 2 when the run could not be made (130 on Ctrl-C).

The folder (``--out``, default ``loadtest/runs/<scenario>-<timestamp>``) then holds:
    summary.json / summary.md   the numbers, latency per X-Cache value, the verdicts
    latency.png                 latency percentiles per second, fault window shaded
    hit_ratio.png               X-Cache share per second; origin/stale/tier-failure rates, breakers
    locust.html, locust_*.csv   Locust's own report (the CSVs as of its last 1 s rewrite)
    locust_final.json           Locust's aggregate numbers, written when it quits
    timeseries.jsonl            per-second client-side data (see loadtest/locustfile.py)
    metrics_timeseries.jsonl    per-second /metrics counters and gauges, origin counts
    run.json                    parameters, expectations, fault window, the scrapes before and
                                after, the environment (versions, loop, commit, TIERPROXY_*, argv)
    *.log                       each process's output
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from loadtest import environment as envinfo
from loadtest import metrics as M
from loadtest import procs
from loadtest.procs import LOOPBACK, ProcGroup, StartupError, cpu_seconds
from loadtest.verdicts import COMMON, Expect, with_overrides

PURGE_TOKEN = "loadtest-purge-token"


@dataclass
class Scenario:
    name: str
    description: str
    duration: int = 60
    users: int = 50
    spawn_rate: float = 50
    rps: float = 1000  # total target rate; 0 = as fast as the users can go
    keys: int = 10000
    zipf: float = 1.1
    purge_ratio: float = 0.001
    redis: str = "on"  # on | off | auto (on when redis-server exists)
    sqlite: bool = True
    l1_max_bytes: int | None = None  # None = the proxy's default
    proxy_env: dict[str, str] = field(default_factory=dict)
    origin_args: list[str] = field(default_factory=list)
    warmup_keys: int = -1  # -1 = every key, 0 = none (cold), N = the N hottest
    fault: str | None = None  # "origin-hang" | "redis-stop"
    fault_start: float = 0.35  # fraction of duration (or seconds with --fault-start)
    fault_length: float = 0.3
    uncached_errors_expected_in_fault: bool = False
    purge_unavailable_expected_in_fault: bool = False  # PURGE may answer 503 while a tier is down
    client_timeout: float = 10.0
    # The scenario's verdicts (besides verdicts.COMMON): PASS/FAIL each, exit 1 on any FAIL.
    # Thresholds are set for a shared 2-vCPU machine (loadtest/README.md, "Verdicts").
    expect: tuple[Expect, ...] = ()


# Thresholds calibrated on this repository's 2-vCPU development machine (loadtest/README.md,
# "Verdicts", has the figures they came from).
STEADY_P99_MS = 100.0
TINY_L1_P99_MS = 150.0
OUTAGE_OK_SHARE = 0.97
OUTAGE_STALE_SHARE = 0.5
REDIS_FAULT_VS_L3_MS = 25.0

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "steady",
            "warm cache, Zipf keys: throughput, latency percentiles, hit ratio per tier",
            duration=60,
            users=50,
            rps=1500,
            keys=10000,
            zipf=1.1,
            origin_args=[
                "--latency",
                "lognormal:20,200",
                "--body-size",
                "lognormal:2048,32768",
                "--max-age",
                "600",
            ],
            expect=(
                Expect("hit_ratio", ">=", 0.9, "warm cache: HIT-* answers"),
                Expect(
                    "p99_ms", "<=", STEADY_P99_MS, "client p99, the generator's own delay included"
                ),
            ),
        ),
        Scenario(
            "cold-stampede",
            "empty cache, many users on few keys: origin requests vs client requests (coalescing)",
            duration=30,
            users=200,
            spawn_rate=200,
            rps=1000,
            keys=20,
            zipf=0.0,
            purge_ratio=0.0,
            warmup_keys=0,
            origin_args=["--latency", "fixed:300", "--body-size", "fixed:4096", "--max-age", "5"],
            expect=(
                Expect("cold_fetches_per_key", "==", 1, "200 users, one origin fetch per key"),
                Expect("origin_inflight_per_key_max", "<=", 1, "coalescing: one fetch at a time"),
                Expect(
                    "origin_fetches_per_key_period", "<=", 1.1, "one refetch per key per expiry"
                ),
            ),
        ),
        Scenario(
            "origin-outage",
            "origin hangs for a window in the middle: stale within the deadline, errors only for never-cached keys",
            duration=60,
            users=50,
            rps=400,
            keys=4000,
            zipf=1.0,
            warmup_keys=1000,
            origin_args=[
                "--latency",
                "lognormal:10,80",
                "--body-size",
                "lognormal:2048,16384",
                "--max-age",
                "3",
                "--hang-seconds",
                "30",
            ],
            fault="origin-hang",
            fault_start=0.35,
            fault_length=0.3,
            uncached_errors_expected_in_fault=True,
            expect=(
                Expect(
                    "ok_share", ">=", OUTAGE_OK_SHARE, "whole run; 504s only for never-cached keys"
                ),
                Expect("err_cached", "==", 0, "a key once cached is served stale, never 5xx"),
                Expect("stale_share_fault", ">=", OUTAGE_STALE_SHARE, "stale copies go out"),
                Expect("p99_ms_fault", "<=", 2500, "the 2 s origin timeout bounds the p99"),
                Expect("max_ms_fault", "<=", 3500, "request deadline 3 s + 0.5 s"),
            ),
        ),
        Scenario(
            "redis-outage",
            "Redis frozen (SIGSTOP) for a window, then resumed: latency bump bounded by the L2 timeout, "
            "breaker opens and closes",
            duration=60,
            users=50,
            rps=1000,
            keys=5000,
            zipf=1.1,
            l1_max_bytes=1 << 20,
            origin_args=[
                "--latency",
                "lognormal:10,80",
                "--body-size",
                "lognormal:2048,16384",
                "--max-age",
                "600",
            ],
            fault="redis-stop",
            fault_start=0.35,
            fault_length=0.3,
            purge_unavailable_expected_in_fault=True,
            expect=(
                Expect("ok_share", "==", 1, "no GET fails while Redis is frozen"),
                Expect(
                    "p99_fault_minus_l3_hit_p99_ms",
                    "<=",
                    REDIS_FAULT_VS_L3_MS,
                    "in the freeze the p99 is an L3 hit's",
                ),
                Expect("p99_fault_minus_before_ms", "<=", 125, "bounded by the L2 timeout + 25 ms"),
                Expect("l2_breaker_opened", ">=", 1, "the L2 breaker opens"),
                Expect("l2_breaker_open_at_end", "==", 0, "and closes after SIGCONT"),
                Expect("l2_hits_after_fault", ">", 0, "HIT-L2 comes back"),
            ),
        ),
        Scenario(
            "tiny-l1",
            "L1 much smaller than the working set: L2 and L3 carry the load",
            duration=60,
            users=50,
            rps=1500,
            keys=10000,
            zipf=1.0,
            l1_max_bytes=2 << 20,
            origin_args=[
                "--latency",
                "lognormal:10,80",
                "--body-size",
                "lognormal:2048,32768",
                "--max-age",
                "600",
            ],
            expect=(
                Expect("lower_tier_share", ">=", 0.3, "L2 + L3 carry a real share"),
                Expect(
                    "p99_ms", "<=", TINY_L1_P99_MS, "client p99, the generator's own delay included"
                ),
            ),
        ),
        Scenario(
            "smoke",
            "CI smoke: a few seconds of steady load at a small rate (keeps the tooling from rotting)",
            duration=10,
            users=5,
            spawn_rate=5,
            rps=50,
            keys=200,
            zipf=1.1,
            purge_ratio=0.01,
            redis="auto",
            origin_args=["--latency", "fixed:2", "--body-size", "fixed:1024", "--max-age", "600"],
            expect=(
                Expect("hit_ratio", ">=", 0.9, "warm cache"),
                Expect("p99_ms", "<=", 250, "generous: CI machines are noisy"),
            ),
        ),
    ]
}


def log(msg: str) -> None:
    print(f"[loadtest {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Scrapes /metrics and the origin's /__stats every `interval` seconds into a JSONL file."""

    def __init__(
        self, metrics_url: str | None, origin_url: str, path: Path, interval: float = 1.0
    ) -> None:
        super().__init__(daemon=True, name="sampler")
        self.metrics_url, self.origin_url, self.path, self.interval = (
            metrics_url,
            origin_url,
            path,
            interval,
        )
        self.stop_ev = threading.Event()
        self.errors = 0
        self.pids: dict[str, int] = {}  # name -> pid whose CPU time is sampled

    def sample(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"t": time.time()}
        cpu = {name: cpu_seconds(pid) for name, pid in list(self.pids.items())}
        cpu["host (all processes)"] = procs.host_busy_seconds()
        rec["cpu_s"] = {k: v for k, v in cpu.items() if v is not None}
        if self.metrics_url:
            try:
                samples = scrape(self.metrics_url)
                rec["counters"] = {
                    M.key_str(s): v
                    for s, v in samples.items()
                    if s[0].endswith("_total") and s[0].startswith("tierproxy_")
                }
                rec["gauges"] = {M.key_str(s): v for s, v in samples.items() if _is_gauge(s[0])}
            except Exception:  # noqa: BLE001
                self.errors += 1
        try:
            rec["origin"] = origin_stats(self.origin_url)
        except Exception:  # noqa: BLE001
            self.errors += 1
        return rec

    def run(self) -> None:
        with self.path.open("a") as f:
            while not self.stop_ev.is_set():
                t = time.monotonic()
                f.write(json.dumps(self.sample(), separators=(",", ":")) + "\n")
                f.flush()
                self.stop_ev.wait(max(0.0, self.interval - (time.monotonic() - t)))


def _is_gauge(name: str) -> bool:
    return not name.endswith(("_total", "_bucket", "_count", "_sum", "_created"))


def scrape(url: str) -> dict[M.Sample, float]:
    status, body, _ = procs.http_get(url, timeout=2.0)
    if status != 200:
        raise RuntimeError(f"{url} answered {status}")
    return M.parse(body.decode("utf-8", "replace"), prefix="tierproxy_")


def origin_stats(base: str) -> dict[str, Any]:
    status, body, _ = procs.http_get(base + "/__stats", timeout=2.0)
    if status != 200:
        raise RuntimeError(f"origin /__stats answered {status}")
    stats: dict[str, Any] = json.loads(body)
    return stats


async def _warm(base: str, paths: list[str], concurrency: int = 32) -> dict[str, int]:
    import aiohttp

    counts: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(p: str) -> None:
            async with sem:
                try:
                    async with session.get(base + p) as r:
                        await r.read()
                        k = f"{r.status} {r.headers.get('X-Cache', '-')}"
                except Exception as e:  # noqa: BLE001 - counted, reported
                    k = f"error {type(e).__name__}"
                counts[k] = counts.get(k, 0) + 1

        await asyncio.gather(*(one(p) for p in paths))
    return counts


def wait_background_drained(metrics_url: str | None, timeout: float = 30.0) -> float | None:
    if not metrics_url:
        time.sleep(1.0)
        return None
    deadline = time.monotonic() + timeout
    v = None
    while time.monotonic() < deadline:
        try:
            v = M.total(scrape(metrics_url), "tierproxy_background_tasks")
            if v == 0:
                return 0.0
        except Exception:  # noqa: BLE001
            return None
        time.sleep(0.2)
    return v


def first_timeseries_second(path: Path, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with path.open() as f:
                line = f.readline()
            if line.strip():
                return int(json.loads(line)["t"])
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    return None


# ---------------------------------------------------------------------------------------------


class Fault:
    def __init__(self, kind: str | None, origin_url: str, redis_proc: procs.Proc | None) -> None:
        self.kind, self.origin_url, self.redis = kind, origin_url, redis_proc
        self.active = False

    def apply(self) -> None:
        if self.kind == "origin-hang":
            procs.http_post_json(self.origin_url + "/__control", {"hang_rate": 1.0})
        elif self.kind == "redis-stop":
            if self.redis is None:
                raise StartupError("redis-stop fault needs Redis")
            import signal

            self.redis.send(signal.SIGSTOP)
        self.active = True

    def revert(self) -> None:
        if not self.active:
            return
        self.active = False
        if self.kind == "origin-hang":
            procs.http_post_json(self.origin_url + "/__control", {"hang_rate": 0.0})
        elif self.kind == "redis-stop" and self.redis is not None:
            import signal

            self.redis.send(signal.SIGCONT)


# ---------------------------------------------------------------------------------------------


def run_scenario(
    sc: Scenario,
    out: Path,
    *,
    proxy_cmd: str | None = None,
    plots: bool = True,
    seed: int | None = None,
    extra_proxy_env: dict[str, str] | None = None,
    keep_work: bool = False,
    quiet_wait: float = 0.0,
    model: str = "closed",
    expect: list[Expect] | None = None,
) -> dict[str, Any]:
    from loadtest import report

    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    for name in (
        "timeseries.jsonl",
        "metrics_timeseries.jsonl",
        "errors.jsonl",
        "locust_final.json",
        "openloop.json",
    ):
        (out / name).unlink(missing_ok=True)
    use_redis = sc.redis == "on" or (sc.redis == "auto" and procs.redis_server_path() is not None)
    lifetime = sc.duration + 300
    run: dict[str, Any] = {
        "scenario": sc.name,
        "description": sc.description,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "params": {
            k: v
            for k, v in asdict(sc).items()
            if k not in ("name", "description", "proxy_env", "origin_args", "expect")
        },
        "expect": [e.to_json() for e in with_overrides([*COMMON, *sc.expect], expect or [])],
        "fault": sc.fault,
        "fault_window": None,
        "fault_window_rel": None,
        "uncached_errors_expected_in_fault": sc.uncached_errors_expected_in_fault,
        "purge_unavailable_expected_in_fault": sc.purge_unavailable_expected_in_fault,
        "notes": [],
        "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "command": list(sys.orig_argv),  # as typed: python -m loadtest.run NAME ...
        "model": model,
    }
    run["params"]["redis"] = use_redis
    origin_args = list(sc.origin_args)
    run["origin_args"] = origin_args
    with contextlib.suppress(ValueError, IndexError):
        run["origin_max_age"] = int(origin_args[origin_args.index("--max-age") + 1])

    group = ProcGroup()
    proxy = None
    fault = None
    sampler = None
    locust = None
    interrupted = False
    try:
        with procs.sigterm_as_interrupt():
            log(f"scenario {sc.name}: {sc.description}")
            origin, oport = procs.start_origin(group, out, origin_args, max_lifetime=lifetime)
            origin_url = f"http://{LOOPBACK}:{oport}"
            redis = None
            env: dict[str, str] = {
                "TIERPROXY_ORIGIN": origin_url,
                "TIERPROXY_SQLITE_PATH": str(work / "cache.sqlite3") if sc.sqlite else "off",
                "TIERPROXY_PURGE_TOKEN": PURGE_TOKEN,
                # a line per request would be ~100k lines a minute in proxy.log; --proxy-env to turn on
                "TIERPROXY_ACCESS_LOG": "off",
            }
            if use_redis:
                redis, rport = procs.start_redis(group, work)
                env["TIERPROXY_REDIS_URL"] = f"redis://{LOOPBACK}:{rport}/0"
            if sc.l1_max_bytes is not None:
                env["TIERPROXY_L1_MAX_BYTES"] = str(sc.l1_max_bytes)
            env.update(sc.proxy_env)
            env.update(extra_proxy_env or {})
            run["proxy_env"] = {k: v for k, v in env.items() if k != "TIERPROXY_PURGE_TOKEN"}
            run["proxy_cmd"] = procs.proxy_command(proxy_cmd)
            proxy, pport, aport = procs.start_proxy(group, out, env, cmd_override=proxy_cmd)
            environment = envinfo.collect(
                env, procs.redis_server_path() if use_redis else None, run["command"]
            )
            environment["tierproxy_env"] = envinfo.masked_env(
                envinfo.process_env(proxy.pid) or environment["tierproxy_env"]
            )
            environment["event_loop"] = envinfo.event_loop_from_log(out / "proxy.log")
            run["environment"] = environment
            proxy_url = f"http://{LOOPBACK}:{pport}"
            metrics_url: str | None = f"http://{LOOPBACK}:{aport}/metrics"
            try:
                scrape(f"http://{LOOPBACK}:{aport}/metrics")
            except Exception as e:  # noqa: BLE001
                run["notes"].append(
                    f"/metrics unusable ({e}); summary has client-side numbers only"
                )
                metrics_url = None
            log(
                f"origin {origin_url}, proxy {proxy_url} (admin :{aport})"
                + (
                    f", redis :{env['TIERPROXY_REDIS_URL'].rsplit(':', 1)[1]}"
                    if use_redis
                    else ", no redis"
                )
            )

            nwarm = sc.keys if sc.warmup_keys < 0 else min(sc.warmup_keys, sc.keys)
            if nwarm:
                t = time.monotonic()
                counts = asyncio.run(_warm(proxy_url, [f"/k/{i}" for i in range(nwarm)]))
                drained = wait_background_drained(metrics_url)
                run["warmup"] = {
                    "keys": nwarm,
                    "seconds": round(time.monotonic() - t, 2),
                    "answers": counts,
                    "background_tasks_after": drained,
                }
                log(f"warmed {nwarm} keys in {time.monotonic() - t:.1f}s: {counts}")
            if quiet_wait > 0:
                log(
                    f"waiting up to {quiet_wait:.0f}s for the machine to be quiet (host CPU "
                    "< 35% of a core over 1 s, our children idle) before the load; "
                    "--quiet-wait 0 skips this"
                )
                busy = procs.wait_quiet(quiet_wait)
                run["host_busy_pct_before_load"] = busy
                if busy is not None and busy >= 35:
                    log(
                        f"the machine is busy ({busy:.0f}% of a core outside this run): numbers will be noisy"
                    )
                    run["notes"].append(
                        f"host {busy:.0f}% busy (100 = one core) before the load started"
                    )
            run["origin_warmup_requests"] = origin_stats(origin_url)["requests"]
            run["metrics_before"] = (
                M.compact(scrape(metrics_url), drop_buckets=False, drop_zero=False)
                if metrics_url
                else {}
            )
            run["origin_before"] = origin_stats(origin_url)

            sampler = Sampler(metrics_url, origin_url, out / "metrics_timeseries.jsonl")
            sampler.pids = {
                "proxy": proxy.pid,
                "origin": origin.pid,
                **({"redis": redis.pid} if redis else {}),
            }
            sampler.start()

            rps_per_user = (sc.rps / sc.users) if sc.rps > 0 else 0
            lenv = procs.child_env(
                {
                    "LT_KEYS": str(sc.keys),
                    "LT_PREFIX": "/k/",
                    "LT_ZIPF_S": str(sc.zipf),
                    "LT_RPS_PER_USER": f"{rps_per_user:.6f}",
                    "LT_PURGE_RATIO": str(sc.purge_ratio),
                    "LT_PURGE_TOKEN": PURGE_TOKEN,
                    "LT_CLIENT_TIMEOUT": str(sc.client_timeout),
                    "LT_TIMESERIES": str(out / "timeseries.jsonl"),
                    "LT_ERRORS": str(out / "errors.jsonl"),
                    "LT_FINAL_STATS": str(out / "locust_final.json"),
                    **({"LT_SEED": str(seed)} if seed is not None else {}),
                }
            )
            if model == "open":
                lcmd = [
                    sys.executable,
                    "-m",
                    "loadtest.openloop",
                    "--url",
                    proxy_url,
                    "--rate",
                    f"{sc.rps:g}",
                    "--duration",
                    str(sc.duration),
                    "--keys",
                    str(sc.keys),
                    "--zipf",
                    str(sc.zipf),
                    "--purge-ratio",
                    str(sc.purge_ratio),
                    "--purge-token",
                    PURGE_TOKEN,
                    "--max-inflight",
                    str(max(64, 4 * sc.users)),
                    "--client-timeout",
                    str(sc.client_timeout),
                    "--timeseries",
                    str(out / "timeseries.jsonl"),
                    "--errors",
                    str(out / "errors.jsonl"),
                    "--hdr",
                    str(out / "openloop.json"),
                    *(["--seed", str(seed)] if seed is not None else []),
                ]
            else:
                lcmd = [
                    sys.executable,
                    "-m",
                    "locust",
                    "-f",
                    str(procs.REPO / "loadtest" / "locustfile.py"),
                    "--headless",
                    "--host",
                    proxy_url,
                    "-u",
                    str(sc.users),
                    "-r",
                    str(sc.spawn_rate),
                    "-t",
                    f"{sc.duration}s",
                    "--stop-timeout",
                    "5",
                    "--csv",
                    str(out / "locust"),
                    "--csv-full-history",
                    "--html",
                    str(out / "locust.html"),
                    "--only-summary",
                    "--loglevel",
                    "WARNING",
                    "--exit-code-on-error",
                    "0",
                ]
            gen = "openloop" if model == "open" else "locust"
            log(
                (
                    f"openloop: {sc.rps:g} req/s on schedule (open model), "
                    if model == "open"
                    else f"locust: {sc.users} users, target {sc.rps or 'max'} req/s, "
                )
                + f"{sc.keys} keys zipf s={sc.zipf}, {sc.duration}s"
                + (f", fault {sc.fault}" if sc.fault else "")
            )
            launch = time.time()
            locust = group.start(gen, lcmd, out / f"{gen}.log", env=lenv)
            sampler.pids[gen] = locust.pid
            t0 = first_timeseries_second(out / "timeseries.jsonl", 30)
            if t0 is None:
                raise StartupError(f"locust produced no data within 30s; log:\n{locust.tail()}")
            t0 = min(t0, int(time.time()))
            run["load_start"] = t0
            hard_stop = launch + sc.duration + 60
            if sc.fault:
                fs = sc.fault_start * sc.duration if sc.fault_start < 1 else sc.fault_start
                fl = sc.fault_length * sc.duration if sc.fault_length < 1 else sc.fault_length
                fault = Fault(sc.fault, origin_url, redis)
                _sleep_until(t0 + fs, locust)
                if locust.alive():
                    fault.apply()
                    fstart = time.time()
                    log(f"fault {sc.fault} on")
                    _sleep_until(fstart + fl, locust)
                    fault.revert()
                    fend = time.time()
                    log(f"fault {sc.fault} off")
                    run["fault_window"] = [fstart, fend]
                    run["fault_window_rel"] = [round(fstart - t0, 2), round(fend - t0, 2)]
                    run["error_grace_s"] = float(env.get("TIERPROXY_REQUEST_DEADLINE", 3.0)) + 2
            while locust.alive() and time.time() < hard_stop:
                time.sleep(0.2)
            if locust.alive():
                run["notes"].append("locust overran its time and was stopped")
            locust.stop(timeout=15, first=2)  # SIGINT: locust writes its reports on the way out
            time.sleep(1.0)  # let the last backfills land before the final scrape
            sampler.stop_ev.set()
            sampler.join(5)
            run["proxy_alive_at_end"] = proxy.alive()
            try:
                run["metrics_after"] = (
                    M.compact(scrape(metrics_url), drop_buckets=False, drop_zero=False)
                    if metrics_url
                    else {}
                )
            except Exception as e:  # noqa: BLE001 - a dead proxy is a finding, not a crash of the tool
                run["notes"].append(f"final /metrics scrape failed: {e}")
                run["metrics_after"] = {}
            run["origin_after"] = origin_stats(origin_url)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping everything")
    finally:
        if fault is not None:
            with contextlib.suppress(Exception):
                fault.revert()
        if sampler is not None:
            sampler.stop_ev.set()
        if locust is not None and locust.alive():
            locust.stop(timeout=10, first=2)
        if proxy is not None:
            run.setdefault("proxy_alive_at_end", proxy.alive())
            rc_before = proxy.popen.poll()
            run["proxy_exit"] = rc_before
        group.stop_all()
        if proxy is not None and run.get("proxy_exit") is None:
            run["proxy_exit_on_stop"] = proxy.popen.returncode
        (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    if interrupted:
        raise KeyboardInterrupt
    summary = report.build(out, plots=plots)
    return summary


def _sleep_until(t: float, proc: procs.Proc) -> None:
    while time.time() < t and proc.alive():
        time.sleep(min(0.1, max(0.0, t - time.time())))


# ---------------------------------------------------------------------------------------------


def parse_env_pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise SystemExit(f"--proxy-env wants NAME=VALUE, got {it!r}")
        out[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("scenario", nargs="?", choices=sorted(SCENARIOS))
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    ap.add_argument("--duration", type=int, help="seconds of load (bounded: at most 3600)")
    ap.add_argument("--users", type=int)
    ap.add_argument("--rps", type=float, help="total target request rate (0 = as fast as possible)")
    ap.add_argument("--keys", type=int, help="key space size")
    ap.add_argument("--zipf", type=float, help="Zipf exponent (0 = uniform)")
    ap.add_argument("--purge-ratio", type=float)
    ap.add_argument("--warmup-keys", type=int, help="-1 all, 0 none, N hottest")
    ap.add_argument("--redis", choices=("on", "off", "auto"))
    ap.add_argument("--sqlite", choices=("on", "off"))
    ap.add_argument("--l1-max-bytes", type=int)
    ap.add_argument(
        "--fault-start", type=float, help="seconds after load start (or a fraction < 1)"
    )
    ap.add_argument(
        "--fault-length", type=float, help="seconds (or a fraction < 1 of the duration)"
    )
    ap.add_argument(
        "--origin",
        dest="origin_extra",
        default="",
        help='extra origin flags, e.g. --origin="--latency fixed:50 --max-age 5"',
    )
    ap.add_argument("--proxy-env", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument(
        "--proxy-cmd",
        help="command that starts the proxy (default: python -m tierproxy serve; "
        "env LOADTEST_PROXY_CMD)",
    )
    ap.add_argument(
        "--out", type=Path, help="report folder (default loadtest/runs/<scenario>-<time>)"
    )
    ap.add_argument(
        "--model",
        choices=("closed", "open"),
        default="closed",
        help="closed: Locust users, each waits for its answer (throughput); open: requests "
        "issued on schedule at --rps (loadtest.openloop), latency from the due time, "
        "HdrHistogram percentiles",
    )
    ap.add_argument(
        "--expect",
        action="append",
        default=[],
        metavar="METRIC<=N",
        help="replace the scenario's expectation on METRIC (repeatable), e.g. when an override "
        "changes what to expect: --proxy-env TIERPROXY_L2_TIMEOUT=0.5 "
        "--expect 'p99_fault_minus_before_ms<=525'",
    )
    ap.add_argument("--seed", type=int)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument(
        "--keep-work", action="store_true", help="keep the SQLite file etc. in <out>/work"
    )
    ap.add_argument(
        "--strict",
        action="store_true",
        help="accepted for old scripts: a FAIL always exits 1 now",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="before the load, wait up to this many seconds for the machine to be idle (0 = don't)",
    )
    ns = ap.parse_args(argv)

    if ns.list or not ns.scenario:
        for s in SCENARIOS.values():
            print(f"{s.name:14s} {s.duration:4d}s  {s.description}")
        return 0 if ns.list else 2
    sc = SCENARIOS[ns.scenario]
    changes: dict[str, Any] = {}
    for attr, val in (
        ("duration", ns.duration),
        ("users", ns.users),
        ("rps", ns.rps),
        ("keys", ns.keys),
        ("zipf", ns.zipf),
        ("purge_ratio", ns.purge_ratio),
        ("warmup_keys", ns.warmup_keys),
        ("redis", ns.redis),
        ("l1_max_bytes", ns.l1_max_bytes),
        ("fault_start", ns.fault_start),
        ("fault_length", ns.fault_length),
    ):
        if val is not None:
            changes[attr] = val
    if ns.sqlite is not None:
        changes["sqlite"] = ns.sqlite == "on"
    if ns.users is not None:
        changes["spawn_rate"] = min(max(sc.spawn_rate, ns.users), 1000)
    if ns.origin_extra:
        changes["origin_args"] = [*sc.origin_args, *shlex.split(ns.origin_extra)]
    sc = replace(sc, **changes)
    if not 1 <= sc.duration <= 3600:
        ap.error("--duration must be within 1..3600 seconds")
    if sc.users < 1 or sc.keys < 1:
        ap.error("--users and --keys must be >= 1")
    try:
        extra_expect = [Expect.parse(e) for e in ns.expect]
    except ValueError as e:
        ap.error(str(e))
    if ns.model == "open" and sc.rps <= 0:
        ap.error("--model open needs a rate: --rps > 0")
    out = ns.out or (
        procs.REPO / "loadtest" / "runs" / f"{sc.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    try:
        summary = run_scenario(
            sc,
            out,
            proxy_cmd=ns.proxy_cmd,
            plots=not ns.no_plots,
            seed=ns.seed,
            extra_proxy_env=parse_env_pairs(ns.proxy_env),
            keep_work=ns.keep_work,
            quiet_wait=ns.quiet_wait,
            model=ns.model,
            expect=extra_expect,
        )
    except StartupError as e:
        log(f"could not run: {e}")
        return 2
    except KeyboardInterrupt:
        log(f"interrupted; partial files in {out}")
        return 130
    from loadtest.report import markdown

    print(markdown(summary))
    log(f"report: {out}")
    from loadtest.verdicts import exit_code

    rc = exit_code(summary["verdicts"])
    failed = [v["name"] for v in summary["verdicts"] if not v["ok"]]
    log(f"verdict: {'FAIL: ' + ', '.join(failed) if rc else 'PASS'} (exit {rc})")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
