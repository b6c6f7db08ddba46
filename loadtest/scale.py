"""Scale-out: N workers against one, each serving process held to the same CPU budget.

    python -m loadtest.scale                 # as root: 1 vs 2 workers, L1 hits, 0.4 core each
    python -m loadtest.scale --workers 1,2 --cpu-per-worker 0.4 --targets l1,l2,l3 --rounds 6

The goal "2 workers ≥ 1.8 × one" asks whether the workers add up: whether the second process
brings a second process's worth of hits, or loses it to something they share (the listening
port's spread of connections, the L3 file, Redis, the supervisor). Measured plainly, that needs
a core per worker plus one for the load generator; on a 2-core machine two workers and wrk
compete for the same cores and the figure says only how the machine was shared.

So this gives every serving process the same slice of one core: each worker is put in its own
cgroup with a CPU quota (``--cpu-per-worker``; 0.4 = 8 ms in every 20 ms period), all of them
on CPU 0, wrk and the origin on CPU 1 (Redis too, for l2: it is shared, not a worker's). One
worker then has 0.4 of a core; two have 0.4 each. What two workers do with two budgets,
against what one does with one, is the scaling, with the budget in place of a core. The
budgets together stay at or below 0.8 of CPU 0: with two halves (the whole core) the workers
got their quota in only 54-67 % of periods, as the kernel's own work on that CPU and the
switches between them took the rest. The cgroup's counters show whether each budget was used
up (``throttled``: the share of periods in which the quota ran out); a run where a worker's
median share is below 0.9 measured something else than the budgets, and says NOT MEASURED
instead of PASS or FAIL. With ``--cpu-per-worker 0`` no quota is set (the plain, shared run).

The proxies run side by side, started once; every round runs each in turn (reversed every other
round) and the goal is judged on the median over rounds of the per-round ratio N-workers/one.

Needs: Linux, root (or a writable cgroup): cgroup v2 with the ``cpu`` controller at
/sys/fs/cgroup, or v1 ``cpu`` at /sys/fs/cgroup/cpu; 2 CPUs, wrk and taskset. Writes
``scale.json`` (every round, per-worker CPU and throttling, the environment) and ``scale.md``
to ``--out`` (default loadtest/runs/scale-<time>), and raw wrk output under ``raw/``. Prints
PASS/FAIL for the goal; exit code 0 when it is met, 1 when not, 2 when the run could not be
made or measured. Loopback only, bounded (``--rounds`` ≤ 20, ``--duration`` ≤ 60 s), every
process stopped and every cgroup removed at the end, also on error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest import bench, procs
from loadtest import environment as envinfo
from loadtest.procs import LOOPBACK, ProcGroup, StartupError, cpu_seconds

TIERS = ("l1", "l2", "l3")
SERVER_CPU, WRK_CPU = "0", "1"
PERIOD_US = 20_000  # short periods: a worker waits at most 20 ms x (1 - share) for its budget
# All budgets on CPU 0 together: with 2 x 0.5 (the whole core) the workers got their quota in
# only 54-67 % of periods (the kernel's own work on that CPU and the switches between them take
# the rest), so the run compared what was left, not the budgets; with 2 x 0.4 in 99 %+.
MAX_BUDGETS = 0.8
# A run is a comparison of budgets only if each worker used its quota up in most periods.
MIN_THROTTLED = 0.9


class CpuBudget:
    """A cgroup holding processes to ``cores`` of CPU time (v2 ``cpu.max``, v1 CFS quota)."""

    def __init__(self, name: str, cores: float) -> None:
        self.version, root = _cgroup_root()
        self.path = root / name
        self.path.mkdir()
        quota = max(1000, round(cores * PERIOD_US))
        try:
            if self.version == 2:
                (self.path / "cpu.max").write_text(f"{quota} {PERIOD_US}\n")
            else:
                (self.path / "cpu.cfs_period_us").write_text(f"{PERIOD_US}\n")
                (self.path / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        except OSError:
            self.remove()
            raise

    def add(self, pid: int) -> None:
        """Move a whole process (every thread) into the group."""
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def stat(self) -> dict[str, int]:
        """Periods, periods throttled, throttled time in µs (both versions' names mapped)."""
        out: dict[str, int] = {}
        with contextlib.suppress(OSError, ValueError):
            for line in (self.path / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                out[key] = int(value)
        if "throttled_time" in out:  # v1: nanoseconds
            out["throttled_usec"] = out["throttled_time"] // 1000
        return {k: out.get(k, 0) for k in ("nr_periods", "nr_throttled", "throttled_usec")}

    def remove(self) -> None:
        """Empty the group into its parent, then remove it (after its processes have exited,
        the move finds nothing)."""
        with contextlib.suppress(OSError):
            pids = (self.path / "cgroup.procs").read_text().split()
            for pid in pids:
                with contextlib.suppress(OSError):
                    (self.path.parent / "cgroup.procs").write_text(f"{pid}\n")
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def _cgroup_root() -> tuple[int, Path]:
    """Where a child cgroup with a CPU quota can be made, or StartupError saying what is missing."""
    v2 = Path("/sys/fs/cgroup")
    controllers = v2 / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        subtree = v2 / "cgroup.subtree_control"
        with contextlib.suppress(OSError):
            if "cpu" not in subtree.read_text().split():
                subtree.write_text("+cpu\n")
        if os.access(v2, os.W_OK) and "cpu" in subtree.read_text().split():
            return 2, v2
    for v1 in (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpu,cpuacct")):
        if (v1 / "cpu.cfs_quota_us").exists() and os.access(v1, os.W_OK):
            return 1, v1
    raise StartupError(
        "no writable cgroup CPU controller (cgroup v2 'cpu' at /sys/fs/cgroup or v1 at "
        "/sys/fs/cgroup/cpu): run as root, or --cpu-per-worker 0 for a run without budgets"
    )


def _worker_pids(admin: int, workers: int, proc: procs.Proc) -> list[int]:
    """The serving processes: the proxy itself for one worker, else each worker's pid as the
    group's /readyz lists them once all are ready."""
    if workers == 1:
        return [proc.pid]
    deadline = time.monotonic() + 30
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            status, body, _ = procs.http_get(f"http://{LOOPBACK}:{admin}/readyz", timeout=2)
            last = json.loads(body)
            pids = [w.get("pid") for w in last.get("workers", [])]
            if status == 200 and len(pids) == workers and all(isinstance(p, int) for p in pids):
                return [int(p) for p in pids]
        time.sleep(0.2)
    raise StartupError(f"{workers} workers not all ready after 30 s: {last}")


class Proxy:
    """One proxy (a tier target with N workers) and the budgets of its serving processes."""

    def __init__(self, tier: str, workers: int, target: bench.Target, pids: list[int]) -> None:
        self.tier, self.workers, self.target, self.pids = tier, workers, target, pids
        self.budgets: list[CpuBudget] = []
        self.key = f"{tier}:{workers}"

    def snapshot(self) -> dict[str, Any]:
        return {
            "cpu": [cpu_seconds(pid) for pid in self.pids],
            "supervisor_cpu": cpu_seconds(self.target.proc.pid) if self.workers > 1 else None,
            "budgets": [b.stat() for b in self.budgets],
            "at": time.monotonic(),
        }


def _delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    el = b["at"] - a["at"]
    cpu = [
        round((y - x) / el, 3) if x is not None and y is not None else None
        for x, y in zip(a["cpu"], b["cpu"], strict=True)
    ]
    throttled = [
        round(
            (y["nr_throttled"] - x["nr_throttled"]) / max(1, y["nr_periods"] - x["nr_periods"]), 3
        )
        for x, y in zip(a["budgets"], b["budgets"], strict=True)
    ]
    sup = None
    if a["supervisor_cpu"] is not None and b["supervisor_cpu"] is not None:
        sup = round((b["supervisor_cpu"] - a["supervisor_cpu"]) / el, 3)
    return {"cores": cpu, "throttled": throttled, "supervisor_cores": sup}


def start(
    group: ProcGroup,
    ns: argparse.Namespace,
    tier: str,
    workers: int,
    origin_url: str,
    redis_url: str | None,
    l3_dir: Path,
) -> Proxy:
    logs = ns.out / f"{tier}-{workers}w"
    logs.mkdir(parents=True, exist_ok=True)
    target = bench.start_targets(
        group,
        l3_dir,
        logs,
        [tier],
        argparse.Namespace(
            **{
                **vars(ns),
                "proxy_cmd": None,
                "proxy_env": [f"TIERPROXY_WORKERS={workers}", *ns.proxy_env],
            }
        ),
        origin_url,
        redis_url,
        SERVER_CPU,
    )[tier]
    target.primed = bench.prime(target)
    assert target.admin is not None
    return Proxy(tier, workers, target, _worker_pids(target.admin, workers, target.proc))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.scale",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--workers", default="1,2", help="worker counts; the first is the base")
    ap.add_argument(
        "--cpu-per-worker",
        type=float,
        default=0.4,
        help="cores each serving process may use (a cgroup quota; 0: none, the plain run); "
        "all budgets together at most 0.8 of CPU 0",
    )
    ap.add_argument("--targets", default="l1", help="from l1,l2,l3")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--expect", type=float, default=1.8, help="goal: N workers ≥ this × one")
    ap.add_argument("--proxy-env", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--out", type=Path)
    ns = ap.parse_args(argv)
    tiers = [n.strip() for n in ns.targets.split(",") if n.strip()]
    try:
        counts = [int(x) for x in ns.workers.split(",")]
    except ValueError:
        ap.error("--workers: comma-separated numbers, e.g. 1,2")
    if not tiers or any(t not in TIERS for t in tiers):
        ap.error("--targets: from l1,l2,l3")
    if len(counts) < 2 or len(set(counts)) != len(counts) or not all(1 <= c <= 8 for c in counts):
        ap.error("--workers: at least two different counts within 1..8")
    if not (1 <= ns.rounds <= 20 and 1 <= ns.duration <= 60 and 0 <= ns.cpu_per_worker <= 1):
        ap.error("--rounds within 1..20, --duration within 1..60, --cpu-per-worker within 0..1")
    if ns.cpu_per_worker * max(counts) > MAX_BUDGETS:
        ap.error(
            f"--cpu-per-worker × the most workers must leave CPU 0 room (≤ {MAX_BUDGETS:g} "
            "core), or the budgets would not all be there to use"
        )
    if (os.cpu_count() or 1) < 2 or not shutil.which("wrk") or not shutil.which("taskset"):
        print("[scale] needs 2 CPUs, wrk and taskset (apt-get install wrk)", file=sys.stderr)
        return 2
    ns.out = ns.out or procs.REPO / "loadtest" / "runs" / f"scale-{time.strftime('%Y%m%d-%H%M%S')}"
    ns.out.mkdir(parents=True, exist_ok=True)
    ns.keys, ns.bare_loop = 1, "auto"
    proxies: list[Proxy] = []
    runs: dict[str, list[dict[str, Any]]] = {}
    environment: dict[str, Any] = {}
    try:
        with ProcGroup() as group, procs.sigterm_as_interrupt():
            work = Path(tempfile.mkdtemp(prefix="tierproxy-scale-"))
            try:
                _, oport = procs.start_origin(
                    group,
                    ns.out,
                    ["--body-size", f"fixed:{ns.size}", "--max-age", "86400"],
                    taskset=WRK_CPU,
                )
                origin_url = f"http://{LOOPBACK}:{oport}"
                redis_url = None
                if "l2" in tiers:
                    _, rport = procs.start_redis(group, work, taskset=WRK_CPU)
                    redis_url = f"redis://{LOOPBACK}:{rport}/0"
                for tier in tiers:
                    for n in counts:
                        l3_dir = work / f"{tier}-{n}"
                        l3_dir.mkdir()
                        proxies.append(start(group, ns, tier, n, origin_url, redis_url, l3_dir))
                if ns.cpu_per_worker:
                    for p in proxies:
                        for i, pid in enumerate(p.pids):
                            b = CpuBudget(
                                f"tierproxy-scale-{os.getpid()}-{p.key}-{i}".replace(":", "-"),
                                ns.cpu_per_worker,
                            )
                            p.budgets.append(b)
                            b.add(pid)
                environment = envinfo.collect(
                    redis_path=procs.redis_server_path() if redis_url else None
                )
                for p in proxies:  # every worker's L1 (or connection pool) warm
                    bench.run_wrk(p.target.url, 2, ns.connections, 1, WRK_CPU)
                for rnd in range(ns.rounds):
                    for p in proxies if rnd % 2 == 0 else proxies[::-1]:
                        before, m0 = p.snapshot(), p.target.metrics()
                        r = bench.run_wrk(p.target.url, ns.duration, ns.connections, 1, WRK_CPU)
                        after, m1 = p.snapshot(), p.target.metrics()
                        bench.save_raw(
                            ns.out, f"{p.tier}-{p.workers}w-round{rnd + 1}", r.pop("raw")
                        )
                        r.update(_delta(before, after))
                        r["hit_share"] = bench.served_share(m0, m1, bench.EXPECT[p.tier])
                        runs.setdefault(p.key, []).append(r)
                    print(
                        f"[scale] round {rnd + 1}/{ns.rounds}: "
                        + "  ".join(
                            f"{k} {v[-1]['rps']:.0f} req/s (cores {v[-1]['cores']})"
                            for k, v in runs.items()
                        ),
                        flush=True,
                    )
                restarted = [
                    p.key
                    for p in proxies
                    if p.workers > 1
                    and p.target.admin is not None
                    and _worker_pids(p.target.admin, p.workers, p.target.proc) != p.pids
                ]
                if restarted:
                    raise RuntimeError(f"a worker was restarted during the run: {restarted}")
            finally:
                group.stop_all()
                for p in proxies:
                    for b in p.budgets:
                        b.remove()
                shutil.rmtree(work, ignore_errors=True)
    except (StartupError, RuntimeError, OSError) as exc:
        print(f"[scale] could not run: {exc}", file=sys.stderr)
        return 2
    summary = summarise(runs, tiers, counts, ns.expect, budgets=ns.cpu_per_worker > 0)
    record = {
        "environment": environment,
        "period_us": PERIOD_US,
        "rounds": runs,
        "summary": summary,
    }
    envinfo.write_result(ns.out, "scale", table(summary, ns, environment), record, ns)
    if any(row["pass"] is None for row in summary.values()):
        return 2
    return 0 if all(row["pass"] for row in summary.values()) else 1


def summarise(
    runs: dict[str, list[dict[str, Any]]],
    tiers: list[str],
    counts: list[int],
    expect: float,
    budgets: bool = True,
) -> dict[str, Any]:
    """Per tier and worker count beyond the first: median req/s of each, the median per-round
    ratio to the base count, the goal (expect × (N / base)) and whether it was met: ``pass``
    is None (not measured) when, with budgets, a worker's median share of periods in which its
    quota ran out is below MIN_THROTTLED - that budget was not what limited it."""
    out: dict[str, Any] = {}
    base = counts[0]
    for tier in tiers:
        a = runs[f"{tier}:{base}"]
        for n in counts[1:]:
            b = runs[f"{tier}:{n}"]
            ratios = [y["rps"] / x["rps"] for x, y in zip(a, b, strict=True) if x["rps"] > 0]
            ratio = round(statistics.median(ratios), 3) if ratios else 0.0
            goal = round(expect * n / (2 * base), 3)  # 2 x base: expect; linear otherwise
            throttled = _median_list(a, "throttled") + _median_list(b, "throttled")
            limited = not budgets or min(throttled, default=0.0) >= MIN_THROTTLED
            out[f"{tier}:{n}"] = {
                "base_rps": round(statistics.median(r["rps"] for r in a)),
                "rps": round(statistics.median(r["rps"] for r in b)),
                "ratio": ratio,
                "ratios": [round(x, 3) for x in ratios],
                "goal": goal,
                "pass": ratio >= goal if limited else None,
                "base_cores": _median_sum(a, "cores"),
                "cores": _median_sum(b, "cores"),
                "throttled": _median_list(b, "throttled"),
                "base_throttled": _median_list(a, "throttled"),
                "non_2xx": sum(r["non_2xx"] for r in a + b),
                "hit_share": min(
                    (r["hit_share"] for r in a + b if r["hit_share"] is not None), default=None
                ),
            }
    return out


def _median_sum(rows: list[dict[str, Any]], key: str) -> float | None:
    sums = [sum(v for v in r[key] if v is not None) for r in rows if r.get(key)]
    return round(statistics.median(sums), 3) if sums else None


def _median_list(rows: list[dict[str, Any]], key: str) -> list[float]:
    cols = list(zip(*(r[key] for r in rows if r.get(key)), strict=True))
    return [round(statistics.median(c), 3) for c in cols]


def _verdict(passed: bool | None) -> str:
    if passed is None:
        return f"NOT MEASURED: a budget was not the limit (throttled < {MIN_THROTTLED:g})"
    return "PASS" if passed else "FAIL"


def table(summary: dict[str, Any], ns: argparse.Namespace, environment: dict[str, Any]) -> str:
    budget = (
        f"each serving process held to {ns.cpu_per_worker:g} of a core (cgroup quota, "
        f"{PERIOD_US // 1000} ms periods), all on CPU 0; wrk and the origin on CPU 1"
        if ns.cpu_per_worker
        else "no CPU budget: the workers share all of CPU 0; wrk and the origin on CPU 1"
    )
    lines = [
        (
            "| target | workers | base req/s | req/s | × base (per round) | goal | verdict "
            "| cores used (base → N) | periods throttled (N) | hit share |"
        ),
        "|---|---:|---:|---:|---:|---:|---|---|---|---:|",
    ]
    base = ns.workers.split(",")[0]
    for key, row in summary.items():
        tier, n = key.split(":")
        lines.append(
            f"| {tier} | {base} → {n} | {row['base_rps']} | {row['rps']} | {row['ratio']:.3f} "
            f"| ≥ {row['goal']:g} | {_verdict(row['pass'])} "
            f"| {row['base_cores']} → {row['cores']} | {row['throttled']} "
            f"| {row['hit_share'] if row['hit_share'] is not None else '—'} |"
        )
    lines.append(
        f"\nwrk -t1 -c{ns.connections} -d{ns.duration:g}s, {ns.rounds} rounds, medians; {budget}; "
        "× base: the median of the ratios within each round."
    )
    host = envinfo.host_line(environment)
    if host:
        lines.append(host)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
