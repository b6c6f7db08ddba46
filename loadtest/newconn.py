"""New connections, one hit each: what the proxy spends per connection, two builds side by side.

    python -m loadtest.newconn --a "env PYTHONPATH=/tmp/before python -m tierproxy serve"
    python -m loadtest.newconn --a CMD_A --b CMD_B --connections 3000 --rounds 4

wrk keeps its connections for the whole run, so ``loadtest.bench`` and ``loadtest.ab`` never
measure a client that opens a connection per request (scripts, health checkers, many HTTP
libraries without a pool). This does: a client on CPU 1 opens ``--connections`` connections
one after another, each sending one GET of an L1-hit key (1 KiB) at once and closing after
the answer; each build's proxy (L1 only, on CPU 0, started once) is measured by the CPU
seconds it used (``/proc``), per connection, and the connections per second the client got.
Rounds alternate the builds (reversed every other round); the table shows medians.

Writes ``newconn.json`` (every round, the environment as the bench records it) to ``--out``
(default loadtest/runs/newconn-<time>). Exit 0, or 2 when the run could not be made.
Loopback only, bounded (``--connections`` ≤ 20,000, ``--rounds`` ≤ 20), everything stopped at
the end, also on error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest import environment as envinfo
from loadtest import procs
from loadtest.procs import LOOPBACK, ProcGroup, StartupError

PATH = "/bench/1"
REQUEST = f"GET {PATH} HTTP/1.1\r\nHost: tierproxy-loadtest\r\n\r\n".encode()


async def _burst(port: int, connections: int, size: int) -> None:
    for _ in range(connections):
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        try:
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            if b"X-Cache: HIT-L1" not in head:
                raise RuntimeError(f"not an L1 hit: {head[:200]!r}")
            await reader.readexactly(size)
        finally:
            writer.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.newconn",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--a", required=True, help="command starting build A (before)")
    ap.add_argument("--b", help="command starting build B (after; default: this checkout)")
    ap.add_argument("--connections", type=int, default=3000, help="per build and round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--out", type=Path)
    ns = ap.parse_args(argv)
    if not (1 <= ns.connections <= 20_000 and 1 <= ns.rounds <= 20):
        ap.error("--connections within 1..20000, --rounds within 1..20")
    ns.out = (
        ns.out or procs.REPO / "loadtest" / "runs" / f"newconn-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    ns.out.mkdir(parents=True, exist_ok=True)
    builds = {"A": ns.a, "B": ns.b or " ".join(procs.proxy_command())}
    rounds: dict[str, list[dict[str, float]]] = {label: [] for label in builds}
    environment: dict[str, Any] = {}
    try:
        with ProcGroup() as group, procs.sigterm_as_interrupt():
            work = Path(tempfile.mkdtemp(prefix="tierproxy-newconn-"))
            _, oport = procs.start_origin(
                group, work, ["--body-size", f"fixed:{ns.size}", "--max-age", "86400"], taskset="1"
            )
            proxies: dict[str, tuple[procs.Proc, int]] = {}
            for label, command in builds.items():
                env = {
                    "TIERPROXY_ORIGIN": f"http://{LOOPBACK}:{oport}",
                    "TIERPROXY_SQLITE_PATH": "off",
                    "TIERPROXY_ACCESS_LOG": "off",
                }
                proc, port, _ = procs.start_proxy(
                    group, ns.out, env, name=f"proxy-{label}", cmd_override=command, taskset="0"
                )
                procs.http_get(f"http://{LOOPBACK}:{port}{PATH}")  # stored: L1 hits from now on
                proxies[label] = (proc, port)
            environment = envinfo.collect()
            if len(os.sched_getaffinity(0)) >= 2:
                os.sched_setaffinity(0, {1})  # the client beside the origin, off the proxies' CPU
            for rnd in range(ns.rounds):
                order = list(builds) if rnd % 2 == 0 else list(builds)[::-1]
                for label in order:
                    proc, port = proxies[label]
                    cpu0, t0 = procs.cpu_seconds(proc.pid), time.perf_counter()
                    asyncio.run(_burst(port, ns.connections, ns.size))
                    cpu1, elapsed = procs.cpu_seconds(proc.pid), time.perf_counter() - t0
                    if cpu0 is None or cpu1 is None:
                        raise RuntimeError(f"no CPU time for pid {proc.pid}")
                    rounds[label].append(
                        {
                            "cpu_us_per_connection": round((cpu1 - cpu0) / ns.connections * 1e6, 1),
                            "connections_per_s": round(ns.connections / elapsed),
                        }
                    )
                print(
                    f"[newconn] round {rnd + 1}/{ns.rounds}: "
                    + "  ".join(
                        f"{k} {v[-1]['cpu_us_per_connection']:.0f} µs CPU, "
                        f"{v[-1]['connections_per_s']} conn/s"
                        for k, v in rounds.items()
                    ),
                    flush=True,
                )
    except (StartupError, RuntimeError, OSError) as exc:
        print(f"[newconn] could not run: {exc}", file=sys.stderr)
        return 2
    summary = {
        label: {
            key: statistics.median(r[key] for r in runs)
            for key in ("cpu_us_per_connection", "connections_per_s")
        }
        for label, runs in rounds.items()
    }
    lines = [
        "| build | proxy CPU per connection (µs) | connections/s (client) |",
        "|---|---:|---:|",
        *(
            f"| {label} | {row['cpu_us_per_connection']:.0f} | {row['connections_per_s']:.0f} |"
            for label, row in summary.items()
        ),
        (
            f"\n{ns.connections} new connections per build and round, one L1 hit each, "
            f"{ns.rounds} rounds, medians; proxy on CPU 0, client and origin on CPU 1."
        ),
    ]
    host = envinfo.host_line(environment)
    if host:
        lines.append(host)
    record = {"builds": builds, "environment": environment, "rounds": rounds, "summary": summary}
    envinfo.write_result(ns.out, "newconn", "\n".join(lines), record, ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
