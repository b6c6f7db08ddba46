"""Throughput benchmark with wrk: tierproxy's cache hits against the framework's ceiling and nginx.

    python -m loadtest.bench                          # all targets, 3 interleaved rounds of 10 s
    python -m loadtest.bench --duration 5 --rounds 1 --targets bare,l1
    python -m loadtest.bench --profile l1             # plus a py-spy profile of the L1-hit path

Targets (each serves the same stored bytes for one hot key, ``/bench/1``):
    bare          a naive aiohttp handler returning the stored bytes (loadtest/bare.py): reference (a)
    bare-asyncio  the same on the default asyncio loop (only when asked)
    floor         no framework: aiohttp's C parser and one prebuilt write per request
                  (loadtest/bare.py --floor): what an HTTP exchange costs in this runtime (f)
    l1            tierproxy, L1 hits (Redis and SQLite off)
    l2            tierproxy, L2 hits (L1 off, Redis on, SQLite off)
    l3            tierproxy, L3 hits (L1 off, no Redis, SQLite on)
    nginx         nginx proxy_cache hits in front of the same origin (1 worker), if nginx is installed

Every server is started once, on 127.0.0.1 only; the measured runs are interleaved (round 1:
bare, l1, l2, l3, nginx; round 2: the same ...) so drift on a noisy machine hits all targets
alike; the table shows the median round. By default the server under test is pinned to CPU 0
with Redis (part of the system under test: ``--redis-cpu wrk`` puts it beside the load
generator instead), and wrk with the origin to CPU 1 (``--no-pin`` to let the OS place them).

Writes ``bench.json`` (every round's numbers and raw wrk output, the environment: versions,
event loop per target, git commit, TIERPROXY_* of each proxy, the command line), ``bench.md``,
``bench.png`` (req/s per round, paced p99 per round) and ``raw/<target>-[paced-]round<k>.txt``
to ``--out`` (default loadtest/runs/bench-<time>).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from loadtest import environment as envinfo
from loadtest import metrics as M
from loadtest import procs
from loadtest.procs import LOOPBACK, ProcGroup, StartupError, host_busy_seconds

BENCH_PATH = "/bench/1"
ALL_TARGETS = ("bare", "bare-asyncio", "floor", "l1", "l2", "l3", "nginx")
DEFAULT_TARGETS = ("bare", "floor", "l1", "l2", "l3", "nginx")
EXPECT = {
    "l1": "HIT-L1",
    "l2": "HIT-L2",
    "l3": "HIT-L3",
    "nginx": "HIT",
    "bare": "HIT-L1",
    "bare-asyncio": "HIT-L1",
    "floor": "HIT-L1",
}
LABELS = {
    "bare": "(a) bare aiohttp handler, stored bytes",
    "bare-asyncio": "(a') bare aiohttp handler, asyncio loop",
    "floor": "(f) floor: aiohttp's parser, one prebuilt write",
    "l1": "(b) tierproxy L1 hit",
    "l2": "(c) tierproxy L2 hit (L1 off, Redis)",
    "l3": "(d) tierproxy L3 hit (L1 off, SQLite)",
    "nginx": "(e) nginx proxy_cache hit, 1 worker",
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# wrk

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"bad wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"(\d+) requests in ([\d.]+\w+),\s+([\d.]+\w+) read", out)
    if m:
        res["requests"] = int(m.group(1))
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+\w+)\s*$", out, re.MULTILINE)
        if m:
            res[f"p{pct}_ms"] = round(_ms(m.group(1)), 3)
    m = re.search(r"Latency\s+([\d.]+\w+)\s+([\d.]+\w+)\s+([\d.]+\w+)", out)
    if m:
        res["avg_ms"], res["max_ms"] = round(_ms(m.group(1)), 3), round(_ms(m.group(3)), 3)
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return res


def pace_script(work: Path, connections: int, rps: float, keys: int = 1) -> Path:
    """A wrk Lua script that makes each connection wait a random 0..2x(connections/rps) before
    its next request, so the offered load is about `rps` in total and the connections don't
    fire in lock-step bursts (wrk's latency numbers leave the wait out); over ``keys`` keys
    as :func:`keys_script` spreads them."""
    p = work / f"pace-{connections}-{rps:g}-{keys}.lua"
    mean_ms = connections / rps * 1000.0
    p.write_text(
        "-- generated by loadtest.bench\n"
        "local seeded = false\n"
        "function delay()\n"
        "  if not seeded then math.randomseed(os.time() + math.floor(os.clock() * 1e6)); seeded = true end\n"
        f"  return math.floor(math.random() * {2 * mean_ms:.3f})\n"
        "end\n" + _keys_lua(keys)
    )
    return p


def _keys_note(keys: int) -> str:
    return "one hot key" if keys <= 1 else f"{keys} keys in turn"


def _keys_lua(keys: int) -> str:
    if keys <= 1:
        return ""
    return (
        "local n = 0\n"
        "function request()\n"
        f"  n = n % {keys} + 1\n"
        '  return wrk.format(nil, "/bench/" .. n)\n'
        "end\n"
    )


def keys_script(work: Path, keys: int) -> Path | None:
    """A wrk Lua script that asks for ``/bench/1`` .. ``/bench/<keys>`` in turn (None for one
    key): concurrent requests then ask for different keys, so the proxy's sharing of one
    key's concurrent reads (one Redis GET, one L3 row read per loop iteration) does not
    apply - the figure for a spread of keys, beside the one hot key's."""
    if keys <= 1:
        return None
    p = work / f"keys-{keys}.lua"
    p.write_text("-- generated by loadtest.bench\n" + _keys_lua(keys))
    return p


def run_wrk(
    url: str,
    duration: float,
    connections: int,
    threads: int,
    cpu: str | None,
    script: Path | None = None,
) -> dict[str, Any]:
    if not url.startswith(f"http://{LOOPBACK}:"):
        raise ValueError("wrk targets loopback only")
    cmd = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{duration:g}s",
        "--latency",
        "--timeout",
        "5s",
        *(["-s", str(script)] if script else []),
        url,
    ]
    if cpu and shutil.which("taskset"):
        cmd = ["taskset", "-c", cpu, *cmd]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=duration + 30)
    if p.returncode != 0:
        raise RuntimeError(f"wrk failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    r = parse_wrk(p.stdout)
    r["raw"] = p.stdout
    return r


# ---------------------------------------------------------------------------------------------
# nginx

NGINX_CONF = """\
# generated by loadtest.bench: nginx proxy_cache in front of the loadtest origin, loopback only
# one process that is itself the only worker (master_process off): it is our direct child, so
# stopping it - or the driver dying, via the parent-death signal - leaves no orphaned worker
worker_processes 1;
daemon off;
master_process off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy_temp;
    fastcgi_temp_path {tmp}/fastcgi_temp;
    uwsgi_temp_path {tmp}/uwsgi_temp;
    scgi_temp_path {tmp}/scgi_temp;
    proxy_cache_path {tmp}/cache levels=1:2 keys_zone=bench:10m max_size=256m inactive=60m use_temp_path=off;
    keepalive_requests 1000000;   # like aiohttp: keep a client connection for the whole run
    upstream origin {{ server {origin}; keepalive 16; }}
    server {{
        listen {host}:{port} backlog=1024;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache bench;
            proxy_cache_lock on;
            add_header X-Cache $upstream_cache_status always;
        }}
    }}
}}
"""


def start_nginx(
    group: ProcGroup, workdir: Path, origin_hostport: str, cpu: str | None
) -> tuple[procs.Proc, int]:
    exe = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    if not exe:
        raise StartupError("nginx not installed (apt-get install nginx-light)")
    tmp = workdir / "nginx"
    tmp.mkdir(parents=True, exist_ok=True)
    port = procs.free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, origin=origin_hostport, host=LOOPBACK, port=port))
    p = group.start(
        "nginx",
        [exe, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")],
        workdir / "nginx.log",
        taskset=cpu,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not p.alive():
            raise StartupError(f"nginx exited: {p.tail()} {(tmp / 'error.log').read_text()[-500:]}")
        with contextlib.suppress(OSError):
            status, _, _ = procs.http_get(f"http://{LOOPBACK}:{port}{BENCH_PATH}", timeout=1)
            if status == 200:
                return p, port
        time.sleep(0.1)
    raise StartupError("nginx did not answer within 10s")


# ---------------------------------------------------------------------------------------------


class Target:
    def __init__(self, name: str, url: str, proc: procs.Proc, admin: int | None = None) -> None:
        self.name, self.url, self.proc, self.admin = name, url, proc, admin
        self.primed: str = ""
        self.runs: list[dict[str, Any]] = []

    def metrics(self) -> dict[M.Sample, float]:
        if self.admin is None:
            return {}
        with contextlib.suppress(Exception):
            status, body, _ = procs.http_get(f"http://{LOOPBACK}:{self.admin}/metrics", timeout=3)
            if status == 200:
                return M.parse(body.decode("utf-8", "replace"), prefix="tierproxy_")
        return {}


def prime(t: Target, tries: int = 60) -> str:
    """Request until the answer comes from the expected tier (backfills are asynchronous)."""
    want = EXPECT[t.name]
    seen: Counter[str] = Counter()
    for _ in range(tries):
        status, _, headers = procs.http_get(t.url, timeout=5)
        xc = headers.get("X-Cache", "")
        seen[f"{status} {xc}"] += 1
        if status == 200 and xc == want:
            return xc
        time.sleep(0.1)
    raise StartupError(
        f"{t.name}: never answered with X-Cache {want} in {tries} tries: {dict(seen)}"
    )


def start_targets(
    group: ProcGroup,
    work: Path,
    logs: Path,
    names: list[str],
    ns: argparse.Namespace,
    origin_url: str,
    redis_url: str | None,
    server_cpu: str | None,
    startup_timeout: float = 30.0,
) -> dict[str, Target]:
    """Start the targets ``names``; a tierproxy target gets ``startup_timeout`` seconds to
    answer its health check."""
    out: dict[str, Target] = {}
    origin_hostport = origin_url.split("//", 1)[1]
    lifetime = str(int(ns.rounds * len(names) * (ns.duration + 10) + 600))
    for name in names:
        if name in ("bare", "bare-asyncio", "floor"):
            port = procs.free_port()
            loop = "asyncio" if name == "bare-asyncio" else ns.bare_loop
            p = group.start(
                name,
                [
                    sys.executable,
                    "-m",
                    "loadtest.bare",
                    "--port",
                    str(port),
                    "--origin",
                    origin_url,
                    "--path",
                    BENCH_PATH,
                    "--loop",
                    loop,
                    "--max-lifetime",
                    lifetime,
                    *(["--floor"] if name == "floor" else []),
                ],
                logs / f"{name}.log",
                taskset=server_cpu,
            )
            procs.wait_http(f"http://{LOOPBACK}:{port}{BENCH_PATH}", p, 15, name)
            out[name] = Target(name, f"http://{LOOPBACK}:{port}{BENCH_PATH}", p)
        elif name in ("l1", "l2", "l3"):
            # like bare (a) and nginx (e, access_log off): no per-request log line
            env = {"TIERPROXY_ORIGIN": origin_url, "TIERPROXY_ACCESS_LOG": "off"}
            if name == "l1":
                env["TIERPROXY_SQLITE_PATH"] = "off"
            elif name == "l2":
                if not redis_url:
                    raise StartupError("l2 needs redis-server")
                env.update(
                    {
                        "TIERPROXY_L1_MAX_BYTES": "0",
                        "TIERPROXY_REDIS_URL": redis_url,
                        "TIERPROXY_SQLITE_PATH": "off",
                    }
                )
            else:
                env.update(
                    {
                        "TIERPROXY_L1_MAX_BYTES": "0",
                        "TIERPROXY_SQLITE_PATH": str(work / "l3.sqlite3"),
                    }
                )
            for kv in ns.proxy_env:
                k, _, v = kv.partition("=")
                env[k] = v
            p, port, admin = procs.start_proxy(
                group,
                logs,
                env,
                name=f"proxy-{name}",
                cmd_override=ns.proxy_cmd,
                taskset=server_cpu,
                timeout=startup_timeout,
            )
            out[name] = Target(name, f"http://{LOOPBACK}:{port}{BENCH_PATH}", p, admin)
        elif name == "nginx":
            p, port = start_nginx(group, work, origin_hostport, server_cpu)
            out[name] = Target(name, f"http://{LOOPBACK}:{port}{BENCH_PATH}", p)
    return out


def tier_get_ms(
    before: dict[M.Sample, float], after: dict[M.Sample, float], tier: str
) -> dict[str, float | None]:
    if not after:
        return {}
    d = M.diff(before, after)
    out: dict[str, float | None] = {}
    for q in (0.5, 0.99):
        v = M.histogram_quantile(d, "tierproxy_tier_op_seconds", q, tier=tier, op="get")
        out[f"p{int(q * 100)}"] = round(v * 1000, 3) if v is not None else None
    return out


def proc_tree_cpu(pid: int) -> float | None:
    """CPU seconds of a process and its direct children (nginx's worker is the master's child)."""
    total = procs.cpu_seconds(pid)
    if total is None:
        return None
    with contextlib.suppress(OSError, ValueError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                for child in f.read().split():
                    total += procs.cpu_seconds(int(child)) or 0.0
    return total


def served_share(
    before: dict[M.Sample, float], after: dict[M.Sample, float], want: str
) -> float | None:
    if not after:
        return None
    d = M.by_label(M.diff(before, after), "tierproxy_responses_total", "cache")
    n = sum(d.values())
    return round(d.get(want, 0.0) / n, 4) if n else None


def profile(t: Target, ns: argparse.Namespace, out: Path, wrk_cpu: str | None) -> dict[str, Any]:
    """py-spy the target while wrk loads it; collapsed stacks -> top frames."""
    spy = shutil.which("py-spy")
    if not spy:
        raise StartupError("py-spy not installed (pip install py-spy)")
    res: dict[str, Any] = {"target": t.name, "pid": t.proc.pid}
    dur = max(5, int(ns.profile_seconds))
    raw = out / f"profile-{t.name}.txt"
    svg = out / f"profile-{t.name}.svg"
    for fmt, path in (("raw", raw), ("flamegraph", svg)):
        cmd = [
            spy,
            "record",
            "--pid",
            str(t.proc.pid),
            "--duration",
            str(dur),
            "--rate",
            "250",
            "--nonblocking",
            "--format",
            fmt,
            "--output",
            str(path),
        ]
        if wrk_cpu and shutil.which("taskset"):
            cmd = ["taskset", "-c", wrk_cpu, *cmd]
        spy_p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(0.5)
        w = run_wrk(t.url, dur, ns.connections, ns.threads, wrk_cpu, ns.load_script)
        try:
            spy_out, _ = spy_p.communicate(timeout=dur + 30)
        except subprocess.TimeoutExpired:
            spy_p.kill()
            spy_out, _ = spy_p.communicate()
        if spy_p.returncode != 0:
            raise RuntimeError(f"py-spy failed: {spy_out[-800:]}")
        res[f"wrk_rps_while_{fmt}"] = w["rps"]
    res["raw"] = str(raw.name)
    res["svg"] = str(svg.name)
    res.update(top_frames(raw.read_text()))
    return res


def top_frames(collapsed: str, n: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares from py-spy's collapsed stacks, per function (the
    lines of one function summed) and per line."""
    self_f: Counter[str] = Counter()
    self_l: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, cnt = line.rpartition(" ")
        if not stack or not cnt.isdigit():
            continue
        c = int(cnt)
        total += c
        frames = stack.split(";")
        self_l[_short(frames[-1])] += c
        self_f[_short(frames[-1], lines=False)] += c
        for f in {_short(f, lines=False) for f in frames}:
            if not f.startswith(_BOOT_FRAMES):
                incl[f] += c

    def fmt(cn: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"frame": f, "share": round(v / total, 4), "samples": v} for f, v in cn.most_common(n)
        ]

    return {
        "samples": total,
        "top_self": fmt(self_f),
        "top_self_lines": fmt(self_l),
        "top_inclusive": fmt(incl),
    }


# the frames every sample of the main thread sits under; not interesting as "inclusive"
_BOOT_FRAMES = (
    "_run_module_as_main ",
    "_run_code ",
    "<module> ",
    "main (tierproxy",
    "_run (tierproxy",
    "run (uvloop",
    "Runner.run ",
    "Thread._bootstrap",
    "Thread.run ",
)


def _short(frame: str, lines: bool = True) -> str:
    # py-spy raw frames look like "func (path/to/file.py:123)"; keep the function and file:line
    m = re.match(r"(.*) \((.*?):(\d+)\)$", frame)
    if not m:
        return frame
    fn, path, line = m.groups()
    parts = path.split("/")
    if "site-packages" in parts:
        path = "/".join(parts[parts.index("site-packages") + 1 :])
    elif "tierproxy" in parts:
        path = "/".join(parts[parts.index("tierproxy") :])
    else:
        path = "/".join(parts[-2:])
    return f"{fn} ({path}:{line})" if lines else f"{fn} ({path})"


def table(results: dict[str, Any]) -> str:
    rows = results["targets"]
    base = rows.get("bare", {}).get("rps") or None
    ng = rows.get("nginx", {}).get("rps") or None
    l1p99 = rows.get("l1", {}).get("p99_ms")
    ratios = results.get("ratios", {})
    out = [
        (
            "| target | req/s | p50 ms | p99 ms | × (a) bare | × (e) nginx | × (a), × (e) per round "
            "| served as | server CPU | rounds (req/s) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for name, r in rows.items():
        if not r.get("rps"):
            out.append(
                f"| {LABELS.get(name, name)} | — | — | — | — | — | — | {r.get('error', '')} | | |"
            )
            continue
        ra = f"{r['rps'] / base:.2f}" if base else "—"
        rn = f"{r['rps'] / ng:.2f}" if ng else "—"
        share = r.get("hit_share")
        served = r.get("primed", "") + (f" ({share:.0%})" if share is not None else "")
        rounds = ", ".join(f"{x:.0f}" for x in r.get("rounds_rps", []))
        cpu = f"{r['server_cpu_pct']:.0f}%" if r.get("server_cpu_pct") is not None else "—"
        rr = ratios.get(name, {})
        per_round = (
            f"{_f(rr.get('to_bare_per_round_median'))}, {_f(rr.get('to_nginx_per_round_median'))}"
        )
        out.append(
            f"| {LABELS.get(name, name)} | {r['rps']:.0f} | {r.get('p50_ms', 0):.2f} | "
            f"{r.get('p99_ms', 0):.2f} | {ra} | {rn} | {per_round} | {served} | {cpu} | {rounds} |"
        )
    m = results["meta"]
    out.append("")
    out.append(
        f"wrk -t{m['threads']} -c{m['connections']} -d{m['duration']}s, {m['rounds']} interleaved round(s), "
        f"median round shown (per-round ratios: median of the ratios within each round); body {m['size']} bytes; {_keys_note(m.get('keys', 1))}; server pinned to CPU {m['server_cpu']} (Redis: {m.get('redis_cpu', 'wrk')}), "
        f"wrk to CPU {m['wrk_cpu']}; bare loop: {m['bare_loop']}; {m['cpus']} CPUs, Python {m['python']}."
    )
    host = envinfo.host_line(results.get("environment") or {})
    if host:
        out.append(host)
    to_floor = [
        f"{name} {_f(ratios.get(name, {}).get('to_floor_per_round_median'))}"
        for name in rows
        if name != "floor" and ratios.get(name, {}).get("to_floor_per_round_median") is not None
    ]
    if to_floor:
        out.append(
            "× (f) floor, per round: "
            + ", ".join(to_floor)
            + " (the floor is what parsing a request and one write cost in this runtime:"
            " the rest of a target's time is its own work)."
        )
    if l1p99 is not None:
        extra = []
        for name, lim in (("l2", 2.0), ("l3", 5.0)):
            p = rows.get(name, {}).get("p99_ms")
            if p is not None:
                extra.append(f"{name} p99 − l1 p99 = {p - l1p99:+.2f} ms (goal ≤ {lim:g})")
        if extra:
            out.append("Saturated (closed loop): " + "; ".join(extra) + ".")
    if any(r.get("paced") for r in rows.values()):
        out += [
            "",
            (
                f"Latency at about {m.get('paced_rps', 0):g} req/s offered over the same "
                f"{m['connections']} connections (wrk with a per-connection delay; not saturated; "
                f"{m['rounds']} interleaved round(s), the round with the median p99 shown):"
            ),
            "",
            "| target | req/s | p50 ms | p99 ms | max ms | p99 per round ms | tier get p50 / p99 ms (proxy's histogram) |",
            "|---|---:|---:|---:|---:|---|---|",
        ]
        for name, r in rows.items():
            pc = r.get("paced")
            if not pc:
                continue
            tg = pc.get("tier_get_ms") or {}
            tgs = f"{_f(tg.get('p50'))} / {_f(tg.get('p99'))}" if tg else ""
            per_round = ", ".join(_f(x) for x in pc.get("p99_rounds_ms", []))
            out.append(
                f"| {LABELS.get(name, name)} | {pc['rps']:.0f} | {_f(pc.get('p50_ms'))} | "
                f"{_f(pc.get('p99_ms'))} | {_f(pc.get('max_ms'))} | {per_round} | {tgs} |"
            )
        extra = []
        for name, lim in (("l2", 2.0), ("l3", 5.0)):
            pc = rows.get(name, {}).get("paced") or {}
            gap = pc.get("p99_minus_l1_median_ms")
            if gap is not None:
                rounds = ", ".join(f"{g:+.2f}" for g in pc.get("p99_minus_l1_rounds_ms", []))
                extra.append(
                    f"{name} p99 − l1 p99 = {gap:+.2f} ms, median of rounds ({rounds}) "
                    f"(goal ≤ {lim:g}) {'met' if gap <= lim else 'MISSED'}"
                )
        if extra:
            out += ["", "Paced: " + "; ".join(extra) + "."]
    return "\n".join(out) + "\n"


def _f(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def save_raw(out: Path, name: str, text: str) -> None:
    raw = out / "raw"
    raw.mkdir(exist_ok=True)
    (raw / f"{name}.txt").write_text(text)


def plot_bench(results: dict[str, Any], path: Path) -> None:
    """Left: req/s per target, a dot per round, the bar at the median round; right: the paced
    pass's p99 per target, a dot per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loadtest.report import save_small_png

    names = [n for n, r in results["targets"].items() if r.get("rounds")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, n in enumerate(names):
        r = results["targets"][n]
        ax1.bar(i, r["rps"], color="#9ecae1", width=0.6)
        ax1.plot([i] * len(r["rounds_rps"]), r["rounds_rps"], "o", color="#08519c", ms=4)
        p99s = [x.get("p99_ms") for x in r.get("paced_rounds") or [] if x.get("p99_ms")]
        if p99s:
            ax2.plot([i] * len(p99s), p99s, "o", color="#a63603", ms=5)
    m = results["meta"]
    ax1.set_title(f"closed loop: wrk -c{m['connections']} -d{m['duration']}s, {m['rounds']} rounds")
    ax1.set_ylabel("req/s (bar: median round, dots: rounds)")
    ax2.set_title(f"paced ~{m['paced_rps']:g} req/s: p99 per round")
    ax2.set_ylabel("p99 ms")
    ax2.set_ylim(bottom=0)
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(names)), names)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    save_small_png(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help=f"comma list from {','.join(ALL_TARGETS)} (nginx is skipped when not installed)",
    )
    ap.add_argument(
        "--duration", type=float, default=10.0, help="seconds per measured wrk run (<= 120)"
    )
    ap.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of unmeasured wrk per target first"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="wrk threads")
    ap.add_argument("--size", type=int, default=1024, help="body bytes of the benchmarked key")
    ap.add_argument(
        "--keys",
        type=int,
        default=1,
        help="keys the load spreads over, /bench/1../bench/N in turn (1: one hot key; "
        "the warm-up stores them all)",
    )
    ap.add_argument(
        "--paced-rps",
        type=float,
        default=1000.0,
        help="after the throughput rounds, one latency run per target at about this offered "
        "rate over the same connections (0 = skip)",
    )
    ap.add_argument("--bare-loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    ap.add_argument(
        "--no-pin", action="store_true", help="don't pin the server to CPU 0 and wrk to CPU 1"
    )
    ap.add_argument(
        "--redis-cpu",
        default="server",
        help="where Redis runs: 'server' (default: on the server's CPU - it is part "
        "of the system under test, not of the load generator), 'wrk' (beside "
        "wrk), a CPU list, or '' (unpinned)",
    )
    ap.add_argument(
        "--proxy-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra env for the tierproxy targets",
    )
    ap.add_argument(
        "--proxy-cmd", help="command that starts the proxy (default: python -m tierproxy serve)"
    )
    ap.add_argument(
        "--profile", default="", help="also py-spy these targets under wrk, e.g. l1 or l1,l3"
    )
    ap.add_argument("--profile-seconds", type=float, default=10.0)
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each measured run, wait up to this many seconds for the machine to be idle",
    )
    ap.add_argument("--out", type=Path)
    ns = ap.parse_args(argv)

    if not shutil.which("wrk"):
        log("wrk not found: apt-get install wrk")
        return 2
    if not 1 <= ns.duration <= 120 or not 1 <= ns.rounds <= 20 or ns.warmup < 0 or ns.warmup > 60:
        ap.error("--duration within 1..120, --rounds within 1..20, --warmup within 0..60")
    if not 1 <= ns.keys <= 100_000:
        ap.error("--keys within 1..100000")
    names = [n.strip() for n in ns.targets.split(",") if n.strip()]
    bad = [n for n in names if n not in ALL_TARGETS]
    if bad:
        ap.error(f"unknown target(s) {bad}; choose from {ALL_TARGETS}")
    notes: list[str] = []
    if "nginx" in names and not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")):
        names.remove("nginx")
        notes.append("nginx not installed: target (e) skipped (apt-get install nginx-light)")
    if "l2" in names and not procs.redis_server_path():
        names.remove("l2")
        notes.append("redis-server not installed: target (c) skipped")
    pin = not ns.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    server_cpu, wrk_cpu = ("0", "1") if pin else (None, None)
    out = ns.out or (procs.REPO / "loadtest" / "runs" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tierproxy-bench-"))
    ns.load_script = keys_script(work, ns.keys)
    results: dict[str, Any] = {
        "meta": {
            "threads": ns.threads,
            "connections": ns.connections,
            "duration": ns.duration,
            "paced_rps": ns.paced_rps,
            "rounds": ns.rounds,
            "size": ns.size,
            "keys": ns.keys,
            "server_cpu": server_cpu or "any",
            "wrk_cpu": wrk_cpu or "any",
            "redis_cpu": ns.redis_cpu or "any",
            "bare_loop": ns.bare_loop,
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wrk": subprocess.run(
                ["wrk", "--version"], check=False, capture_output=True, text=True
            ).stdout.split("\n")[0],
        },
        "targets": {},
        "notes": notes,
    }
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401

        results["meta"]["uvloop_installed"] = True
    group = ProcGroup()
    rc = 0
    try:
        with procs.sigterm_as_interrupt():
            _, oport = procs.start_origin(
                group,
                out,
                ["--body-size", f"fixed:{ns.size}", "--max-age", "86400", "--latency", "fixed:0"],
                max_lifetime=3600,
                taskset=wrk_cpu,
            )
            origin_url = f"http://{LOOPBACK}:{oport}"
            redis_url = None
            if "l2" in names:
                redis_cpu = {"server": server_cpu, "wrk": wrk_cpu}.get(
                    ns.redis_cpu, ns.redis_cpu or None
                )
                _, rport = procs.start_redis(group, work, taskset=redis_cpu)
                redis_url = f"redis://{LOOPBACK}:{rport}/0"
            targets: dict[str, Target] = {}
            for name in names:
                try:
                    targets.update(
                        start_targets(
                            group, work, out, [name], ns, origin_url, redis_url, server_cpu
                        )
                    )
                    targets[name].primed = prime(targets[name])
                except StartupError as e:
                    log(f"{name}: {e}")
                    results["targets"][name] = {"error": str(e).splitlines()[0][:200]}
                    rc = 1
            order = [n for n in names if n in targets]
            log(
                f"targets up: {', '.join(f'{n} {targets[n].url} [{targets[n].primed}]' for n in order)}"
            )
            results["environment"] = envinfo.collect(
                {"TIERPROXY_ORIGIN": origin_url, "TIERPROXY_ACCESS_LOG": "off"},
                procs.redis_server_path() if "l2" in order else None,
            )
            results["environment"]["event_loop"] = {
                n: envinfo.event_loop_from_log(
                    out / (f"proxy-{n}.log" if n in ("l1", "l2", "l3") else f"{n}.log")
                )
                for n in order
                if n != "nginx"
            }
            for n in order:
                if n in ("l1", "l2", "l3"):
                    results["environment"][f"tierproxy_env_{n}"] = envinfo.masked_env(
                        envinfo.process_env(targets[n].proc.pid) or {}
                    )
            if ns.quiet_wait > 0:
                log(
                    f"before each measured run: waiting up to {ns.quiet_wait:g}s for the host to "
                    "be quiet (CPU < 35% of a core over 1 s, the targets idle); "
                    "--quiet-wait 0 skips this"
                )
            if ns.warmup:
                for n in order:
                    run_wrk(
                        targets[n].url,
                        ns.warmup,
                        ns.connections,
                        ns.threads,
                        wrk_cpu,
                        ns.load_script,
                    )
            for rnd in range(ns.rounds):
                for n in order:
                    t = targets[n]
                    quiet = procs.wait_quiet(ns.quiet_wait) if ns.quiet_wait > 0 else None
                    before = t.metrics()
                    c0, h0, w0 = proc_tree_cpu(t.proc.pid), host_busy_seconds(), time.monotonic()
                    r = run_wrk(
                        t.url, ns.duration, ns.connections, ns.threads, wrk_cpu, ns.load_script
                    )
                    c1, h1, el = (
                        proc_tree_cpu(t.proc.pid),
                        host_busy_seconds(),
                        time.monotonic() - w0,
                    )
                    r["outside_busy_pct_before"] = quiet
                    r["server_cpu_pct"] = (
                        round((c1 - c0) / el * 100, 1)
                        if c0 is not None and c1 is not None
                        else None
                    )
                    r["host_busy_pct"] = (
                        round((h1 - h0) / el * 100, 1)
                        if h0 is not None and h1 is not None
                        else None
                    )
                    after = t.metrics()
                    r["hit_share"] = served_share(before, after, EXPECT[n])
                    if n in ("l1", "l2", "l3"):
                        r["tier_get_ms"] = tier_get_ms(before, after, n)
                    r["alive"] = t.proc.alive()
                    t.runs.append(r)
                    save_raw(out, f"{n}-round{rnd + 1}", r["raw"])
                    log(
                        f"round {rnd + 1} {n:6s} {r['rps']:9.0f} req/s  p50 {r.get('p50_ms', 0):6.2f} ms  "
                        f"p99 {r.get('p99_ms', 0):6.2f} ms  non2xx {r['non_2xx']}  sockerr {r['socket_errors']}  "
                        f"server CPU {r['server_cpu_pct']}%  host busy {r['host_busy_pct']}% (of {os.cpu_count()}00)"
                        + (
                            f"  [busy before: {quiet}%]"
                            if quiet is not None and quiet >= 35
                            else ""
                        )
                        + (
                            f"  hit share {r['hit_share']:.1%}"
                            if r["hit_share"] is not None
                            else ""
                        )
                    )
            paced: dict[str, dict[str, Any]] = {}
            if ns.paced_rps > 0:
                # Interleaved rounds like the saturated runs: a p99 from one 5-10 s run on a
                # noisy machine moves by milliseconds, so the table shows the median round and
                # the goals are judged on the per-round differences to l1.
                script = pace_script(work, ns.connections, ns.paced_rps, ns.keys)
                paced_runs: dict[str, list[dict[str, Any]]] = {n: [] for n in order}
                for rnd in range(ns.rounds):
                    for n in order:
                        t = targets[n]
                        before = t.metrics()
                        r = run_wrk(t.url, ns.duration, ns.connections, ns.threads, wrk_cpu, script)
                        after = t.metrics()
                        tier = {"l1": "l1", "l2": "l2", "l3": "l3"}.get(n)
                        run = {
                            "rps": r["rps"],
                            "p50_ms": r.get("p50_ms"),
                            "p99_ms": r.get("p99_ms"),
                            "max_ms": r.get("max_ms"),
                            "non_2xx": r["non_2xx"],
                            "hit_share": served_share(before, after, EXPECT[n]),
                            "tier_get_ms": tier_get_ms(before, after, tier) if tier else {},
                            "raw": r["raw"],
                        }
                        save_raw(out, f"{n}-paced-round{rnd + 1}", r["raw"])
                        paced_runs[n].append(run)
                        log(
                            f"paced {rnd + 1} {n:6s} {r['rps']:9.0f} req/s  p50 {r.get('p50_ms', 0):6.2f} ms  "
                            f"p99 {r.get('p99_ms', 0):6.2f} ms"
                            + (f"  tier get {run['tier_get_ms']}" if tier else "")
                        )
                for n, runs_n in paced_runs.items():
                    med = sorted(runs_n, key=lambda r: r.get("p99_ms") or 0.0)[len(runs_n) // 2]
                    paced[n] = {**med, "p99_rounds_ms": [r.get("p99_ms") for r in runs_n]}
                    if n != "l1" and "l1" in paced_runs:
                        gaps = [
                            a["p99_ms"] - b["p99_ms"]
                            for a, b in zip(runs_n, paced_runs["l1"])
                            if a.get("p99_ms") is not None and b.get("p99_ms") is not None
                        ]
                        if gaps:
                            paced[n]["p99_minus_l1_rounds_ms"] = [round(g, 2) for g in gaps]
                            paced[n]["p99_minus_l1_median_ms"] = round(statistics.median(gaps), 2)
            for n in order:
                runs = targets[n].runs
                med = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
                results["targets"][n] = {
                    "url": targets[n].url,
                    "primed": targets[n].primed,
                    "rps": med["rps"],
                    "p50_ms": med.get("p50_ms"),
                    "p99_ms": med.get("p99_ms"),
                    "max_ms": med.get("max_ms"),
                    "hit_share": med.get("hit_share"),
                    "rounds_rps": [r["rps"] for r in runs],
                    "rps_median_of_rounds": statistics.median(r["rps"] for r in runs),
                    "non_2xx": sum(r["non_2xx"] for r in runs),
                    "socket_errors": sum(r["socket_errors"] for r in runs),
                    "tier_get_ms_saturated": med.get("tier_get_ms"),
                    "server_cpu_pct": med.get("server_cpu_pct"),
                    "host_busy_pct": med.get("host_busy_pct"),
                    "paced": paced.get(n),
                    "wrk_median_output": med["raw"],
                    # every round, raw wrk output included (also raw/<target>-round<k>.txt)
                    "rounds": runs,
                    "paced_rounds": paced_runs.get(n, []) if ns.paced_rps > 0 else [],
                }
            results["targets"] = {
                n: results["targets"][n] for n in names if n in results["targets"]
            }
            base = results["targets"].get("bare", {}).get("rps")
            ng = results["targets"].get("nginx", {}).get("rps")
            results["ratios"] = {
                n: {
                    "to_bare": round(r["rps"] / base, 3) if base and r.get("rps") else None,
                    "to_nginx": round(r["rps"] / ng, 3) if ng and r.get("rps") else None,
                }
                for n, r in results["targets"].items()
            }
            # the same ratios taken within each round (both runs seconds apart), then the median:
            # steadier than a ratio of medians when the machine's speed drifts between rounds
            for ref, key in (
                ("bare", "to_bare_per_round_median"),
                ("nginx", "to_nginx_per_round_median"),
                ("floor", "to_floor_per_round_median"),
            ):
                if ref in targets and targets[ref].runs:
                    for n in order:
                        pairs = [
                            a["rps"] / b["rps"]
                            for a, b in zip(targets[n].runs, targets[ref].runs)
                            if b["rps"]
                        ]
                        if pairs:
                            results["ratios"].setdefault(n, {})[key] = round(
                                statistics.median(pairs), 3
                            )
            if ns.profile:
                results["profiles"] = {}
                for n in [x.strip() for x in ns.profile.split(",") if x.strip()]:
                    if n not in targets:
                        log(f"profile: no running target {n}")
                        continue
                    log(
                        f"profiling {n} with py-spy for {ns.profile_seconds:g}s (x2: raw + flamegraph)"
                    )
                    results["profiles"][n] = prof = profile(targets[n], ns, out, wrk_cpu)
                    for f in prof["top_self"][:15]:
                        log(f"  self {f['share']:6.1%}  {f['frame']}")
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        rc = 130
    except (StartupError, RuntimeError) as e:
        log(f"failed: {e}")
        results["notes"].append(f"failed: {e}")
        rc = 2
    finally:
        group.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    md = table(results) if results["targets"] else "no results\n"
    if results.get("notes"):
        md += "\n" + "\n".join(f"- {n}" for n in results["notes"]) + "\n"
    if results.get("profiles"):
        for n, prof in results["profiles"].items():
            md += f"\nTop self-time frames, {n} under wrk ({prof['samples']} samples, py-spy):\n\n"
            md += "| self | function |\n|---:|---|\n"
            md += "".join(f"| {f['share']:.1%} | `{f['frame']}` |\n" for f in prof["top_self"][:15])
            md += f"\nTop inclusive (self + callees), {n}:\n\n| total | function |\n|---:|---|\n"
            md += "".join(
                f"| {f['share']:.1%} | `{f['frame']}` |\n" for f in prof["top_inclusive"][:20]
            )
    if results["targets"]:
        try:
            plot_bench(results, out / "bench.png")
            md += "\n![bench](bench.png)\n"
        except ImportError as e:
            log(f"plot skipped: {e}")
    (out / "bench.md").write_text(md)
    print()
    print(md)
    log(f"results: {out}/bench.json")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
