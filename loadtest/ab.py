"""Before/after on a noisy machine: two proxy commands, the same targets, alternated round by round.

    python -m loadtest.ab --a "env PYTHONPATH=/tmp/before python -m tierproxy serve" \\
        --targets l2,l3 --rounds 8
    python -m loadtest.ab --a CMD_A --b CMD_B --targets l1,l2,l3,nginx --duration 4

``loadtest.bench`` compares targets with each other; this compares two builds of tierproxy
(``--a``, ``--b``: commands that start ``tierproxy serve``; ``--b`` defaults to this
checkout's). Each tierproxy target (``l1``, ``l2``, ``l3``, set up as the bench does: one hot
key - or ``--keys N`` in turn -, a 1 KiB body, L1 off for l2/l3, Redis beside the server) is started once per build, all
pinned to CPU 0 with wrk and the origin on CPU 1, and every round runs each of them in turn
(reversed every other round), so a slow phase of the host hits A and B alike. On a machine
whose rounds move by 2x, one run of each build shows nothing; the median over rounds of
the ratio B/A taken within each round does. ``nginx`` among the targets adds nginx
``proxy_cache`` and each build's ratio to it, per round.

Prints a table: per target and build the median req/s, then the median per-round ratio
B/A (and × nginx); writes ``ab.json`` (every round, the environment as ``loadtest.bench``
records it) and ``ab.md`` into ``--out``
(``loadtest/runs/ab-<time>/``). Exit code 0, or 2 when the run could not be made.
Loopback only, bounded (``--rounds`` ≤ 30, ``--duration`` ≤ 60 s), everything stopped at the
end, also on error.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest import bench, procs
from loadtest import environment as envinfo
from loadtest.procs import LOOPBACK, ProcGroup, StartupError

TIERS = ("l1", "l2", "l3")


def _start_build(
    group: ProcGroup,
    label: str,
    command: str,
    tiers: list[str],
    ns: argparse.Namespace,
    origin_url: str,
    redis_url: str | None,
) -> dict[str, bench.Target]:
    work = Path(tempfile.mkdtemp(prefix=f"tierproxy-ab-{label}-"))
    logs = ns.out / label
    logs.mkdir(parents=True, exist_ok=True)
    started = bench.start_targets(
        group,
        work,
        logs,
        tiers,
        argparse.Namespace(**{**vars(ns), "proxy_cmd": command, "proxy_env": []}),
        origin_url,
        redis_url,
        "0",
    )
    for target in started.values():
        bench.prime(target)
    return started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.ab",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--a", required=True, help="command starting build A (before)")
    ap.add_argument("--b", help="command starting build B (after; default: this checkout)")
    ap.add_argument("--targets", default="l1,l2,l3,nginx", help="from l1,l2,l3,nginx")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument(
        "--keys",
        type=int,
        default=1,
        help="keys the load spreads over, in turn (as loadtest.bench --keys; 1: one hot key)",
    )
    ap.add_argument("--out", type=Path)
    ns = ap.parse_args(argv)
    names = [n.strip() for n in ns.targets.split(",") if n.strip()]
    tiers = [n for n in names if n in TIERS]
    if not tiers or any(n not in (*TIERS, "nginx") for n in names):
        ap.error("--targets: at least one of l1,l2,l3, and nginx if wanted")
    if not (1 <= ns.rounds <= 30 and 1 <= ns.duration <= 60):
        ap.error("--rounds within 1..30, --duration within 1..60")
    if not 1 <= ns.keys <= 100_000:
        ap.error("--keys within 1..100000")
    if not shutil.which("wrk") or not shutil.which("taskset"):
        print("wrk and taskset are needed (apt-get install wrk util-linux)", file=sys.stderr)
        return 2
    ns.out = ns.out or procs.REPO / "loadtest" / "runs" / f"ab-{time.strftime('%Y%m%d-%H%M%S')}"
    ns.out.mkdir(parents=True, exist_ok=True)
    builds = {"A": ns.a, "B": ns.b or " ".join(procs.proxy_command())}
    runs: dict[str, list[float]] = {}
    code: dict[str, str | None] = {}
    environment: dict[str, Any] = {}
    try:
        with ProcGroup() as group, procs.sigterm_as_interrupt():
            work = Path(tempfile.mkdtemp(prefix="tierproxy-ab-"))
            _, oport = procs.start_origin(
                group,
                ns.out,
                ["--body-size", f"fixed:{ns.size}", "--max-age", "86400", "--latency", "fixed:0"],
                taskset="1",
            )
            origin_url = f"http://{LOOPBACK}:{oport}"
            redis_url = None
            if "l2" in tiers:
                _, rport = procs.start_redis(group, work, taskset="0")
                redis_url = f"redis://{LOOPBACK}:{rport}/0"
            urls: dict[str, str] = {}
            for label, command in builds.items():
                started = _start_build(group, label, command, tiers, ns, origin_url, redis_url)
                urls.update({f"{label}:{name}": t.url for name, t in started.items()})
                code[label] = _code_of(ns.out / label / f"proxy-{tiers[0]}.log")
            if code["A"] is not None and code["A"] == code["B"]:
                print(f"[ab] A and B run the same code ({code['A']}): an A/A run", flush=True)
            environment = envinfo.collect(
                redis_path=procs.redis_server_path() if redis_url else None
            )
            if "nginx" in names:
                _, port = bench.start_nginx(group, work, f"{LOOPBACK}:{oport}", "0")
                urls["nginx"] = f"http://{LOOPBACK}:{port}{bench.BENCH_PATH}"
            keys = list(urls)
            script = bench.keys_script(work, ns.keys)
            for key in keys:  # warm every target's connections and caches once (every key)
                bench.run_wrk(urls[key], 1 if ns.keys <= 1 else 3, ns.connections, 1, "1", script)
            for rnd in range(ns.rounds):
                for key in keys if rnd % 2 == 0 else keys[::-1]:
                    r = bench.run_wrk(urls[key], ns.duration, ns.connections, 1, "1", script)
                    runs.setdefault(key, []).append(float(r["rps"]))
                print(
                    f"[ab] round {rnd + 1}/{ns.rounds}: "
                    + "  ".join(f"{k} {runs[k][-1]:.0f}" for k in keys),
                    flush=True,
                )
    except (StartupError, RuntimeError) as exc:
        print(f"[ab] could not run: {exc}", file=sys.stderr)
        return 2
    summary = summarise(runs, tiers)
    record = {
        "builds": builds,
        "code": code,
        "environment": environment,
        "rounds": runs,
        "summary": summary,
    }
    envinfo.write_result(ns.out, "ab", table(summary, ns, environment), record, ns)
    return 0


def _code_of(log: Path) -> str | None:
    """Where a proxy's code came from, as it logs it at start-up ("tierproxy code: DIR"; the
    last such line: a reused --out folder holds earlier runs' logs too). None for a build
    older than that line."""
    found = re.findall(r"tierproxy code: (\S+)", log.read_text(errors="replace"))
    return found[-1] if found else None


def _per_round(a: list[float], b: list[float]) -> float:
    return round(statistics.median(y / x for x, y in zip(a, b, strict=True) if x > 0), 3)


def summarise(runs: dict[str, list[float]], tiers: list[str]) -> dict[str, Any]:
    """Per tier: each build's median req/s, the median per-round B/A ratio and, with nginx,
    each build's median per-round ratio to it."""
    out: dict[str, Any] = {}
    nginx = runs.get("nginx")
    for tier in tiers:
        a, b = runs[f"A:{tier}"], runs[f"B:{tier}"]
        row: dict[str, Any] = {
            "a_rps": round(statistics.median(a)),
            "b_rps": round(statistics.median(b)),
            "b_over_a": _per_round(a, b),
        }
        if nginx:
            row["a_to_nginx"] = _per_round(nginx, a)
            row["b_to_nginx"] = _per_round(nginx, b)
        out[tier] = row
    if nginx:
        out["nginx"] = {"rps": round(statistics.median(nginx))}
    return out


def table(
    summary: dict[str, Any], ns: argparse.Namespace, environment: dict[str, Any] | None = None
) -> str:
    lines = [
        "| target | A req/s | B req/s | B / A (per round) | A × nginx | B × nginx |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for tier, row in summary.items():
        if tier == "nginx":
            continue
        lines.append(
            f"| {tier} | {row['a_rps']} | {row['b_rps']} | {row['b_over_a']:.3f} "
            f"| {row.get('a_to_nginx', '—')} | {row.get('b_to_nginx', '—')} |"
        )
    if "nginx" in summary:
        lines.append(f"| nginx | {summary['nginx']['rps']} | | | | |")
    lines.append(
        f"\nwrk -t1 -c{ns.connections} -d{ns.duration:g}s, {ns.rounds} rounds, medians, "
        f"{bench._keys_note(ns.keys)}; "
        "ratios: the median of the ratios within each round."
    )
    host = envinfo.host_line(environment or {})
    if host:
        lines.append(host)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
