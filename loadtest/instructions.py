"""Instructions per cache hit, counted by callgrind: a figure the machine's noise cannot move.

    python -m loadtest.instructions                         # this checkout: l1, l2, l3
    python -m loadtest.instructions --a "env PYTHONPATH=/tmp/before python -m tierproxy serve"

Throughput on a shared 2-vCPU machine moves by several percent from one round to the next
(``loadtest.ab`` shows it), so a change that saves 3 % of a hit's work cannot be told from
noise by timing. Valgrind's callgrind counts the instructions the proxy process executes
(user space; the kernel's work is not counted): the same build, requests and environment give
the same count whatever else the machine does. This tool runs each build's proxy under
callgrind, one target at a time, sends ``--warmup`` hits, then twice zeroes the counters,
sends a batch of hits and dumps the counters (``callgrind_control``): ``--requests`` hits, then
three times as many. Instructions per hit are the difference of the two dumps divided by the
difference of their hits, so start-up, the first requests and per-dump costs cancel out.

The client sends one GET of a 1 KiB entry on each of 8 keep-alive connections, then reads the
8 answers, in turn: under callgrind (about 50 times slower) the proxy finds the 8 requests
waiting at each read, so batches are alike from run to run. Every answer is checked: 200 and
served from the target's tier (``X-Cache``). What this does not count: system calls' kernel
time, and waiting (Redis's and the L3 reader thread's own instructions are counted only where
they run in the proxy process: the L3 reader thread is, Redis is not).

Targets as ``loadtest.bench``: ``l1`` (L1 only), ``l2`` (L1 off, Redis), ``l3`` (L1 off,
SQLite). Writes ``instructions.md`` and ``instructions.json`` (every dump, the environment) to
``--out`` (default loadtest/runs/instructions-<time>). Needs valgrind (``apt-get install
valgrind``) and, for ``l2``, redis-server. Exit 0, or 2 when the run could not be made.
Loopback only; bounded (``--requests`` ≤ 20,000); everything is stopped at the end, also on
error.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loadtest import bench, procs
from loadtest import environment as envinfo
from loadtest.procs import LOOPBACK, ProcGroup, StartupError

PATH = "/bench/1"
REQUEST = f"GET {PATH} HTTP/1.1\r\nHost: tierproxy-loadtest\r\n\r\n".encode()
CONNECTIONS = 8
TARGETS = ("l1", "l2", "l3")
_SUMMARY = re.compile(rb"^summary:\s*(\d+)", re.MULTILINE)


def valgrind_command(command: str, out_file: Path) -> str:
    """``command`` (as ``loadtest.ab`` takes a build: ``[env NAME=VALUE ...] python ...``) run
    under callgrind. The interpreter is named by its real path: a launcher script (pyenv's
    shims are shell scripts) would be what valgrind counts, not the Python it starts."""
    words = shlex.split(command)
    prefix: list[str] = []
    if words and words[0] == "env":
        prefix.append(words.pop(0))
        while words and "=" in words[0] and not words[0].startswith("-"):
            prefix.append(words.pop(0))
    if not words:
        raise StartupError(f"no program in {command!r}")
    program = words[0]
    if Path(program).name.startswith("python"):
        found = shutil.which(program)
        if found is None or _is_script(found):
            found = sys.executable
        words[0] = os.path.realpath(found)
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise StartupError("valgrind not found (apt-get install valgrind)")
    return shlex.join(
        [*prefix, valgrind, "--tool=callgrind", f"--callgrind-out-file={out_file}", *words]
    )


def _is_script(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return True


def _read_answer(sock: socket.socket, expect: str) -> None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the proxy closed a connection")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 200 "):
        raise RuntimeError(f"answer {lines[0]!r}, not 200")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    if fields.get(b"x-cache") != expect.encode():
        raise RuntimeError(f"X-Cache {fields.get(b'x-cache')!r}, not {expect}")
    length = int(fields[b"content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the proxy closed a connection mid-body")
        body += chunk


def send_hits(port: int, hits: int, expect: str, timeout: float = 120.0) -> None:
    """``hits`` GETs (a multiple of :data:`CONNECTIONS`), one on each connection in turn."""
    sockets = [
        socket.create_connection((LOOPBACK, port), timeout=timeout) for _ in range(CONNECTIONS)
    ]
    try:
        for _ in range(hits // CONNECTIONS):
            for sock in sockets:
                sock.sendall(REQUEST)
            for sock in sockets:
                _read_answer(sock, expect)
    finally:
        for sock in sockets:
            sock.close()


def _dump_total(pid: int, out_file: Path, seq: int, timeout: float = 60.0) -> int:
    """Dump callgrind's counters of ``pid`` (its ``seq``-th dump) and return the total."""
    subprocess.run(
        ["callgrind_control", "--dump", str(pid)],
        check=True,
        capture_output=True,
        timeout=timeout,
    )
    path = out_file.with_name(f"{out_file.name}.{seq}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            found = _SUMMARY.search(path.read_bytes())
            if found:
                return int(found.group(1))
        time.sleep(0.1)
    raise RuntimeError(f"no callgrind dump at {path}")


def _zero(pid: int) -> None:
    subprocess.run(
        ["callgrind_control", "--zero", str(pid)], check=True, capture_output=True, timeout=60
    )


def measure(
    group: ProcGroup,
    logs: Path,
    work: Path,
    label: str,
    command: str,
    target: str,
    origin_url: str,
    redis_url: str | None,
    warmup: int,
    requests: int,
) -> dict[str, Any]:
    """One build's proxy under callgrind, one target set up as the bench sets it up
    (:func:`loadtest.bench.start_targets`): instructions per hit and the dumps. Its log goes
    to ``logs``, its L3 file and callgrind's dumps (large) to ``work``."""
    out_file = work / f"callgrind-{target}-{label}.out"
    (logs / label).mkdir(parents=True, exist_ok=True)
    setup = argparse.Namespace(
        rounds=1,
        duration=0,
        bare_loop="auto",
        proxy_env=[],
        proxy_cmd=valgrind_command(command, out_file),
    )
    started = bench.start_targets(
        group, work, logs / label, [target], setup, origin_url, redis_url, None, 180.0
    )[target]
    proc = started.proc
    port = urlsplit(started.url).port
    assert port is not None
    try:
        # (stored by the first answer; in the background for L2 and L3, slower under callgrind)
        expect = bench.prime(started, tries=300)
        send_hits(port, warmup, expect)
        dumps: list[dict[str, int]] = []
        for seq, hits in enumerate((requests, 3 * requests), start=1):
            _zero(proc.pid)
            send_hits(port, hits, expect)
            dumps.append({"hits": hits, "instructions": _dump_total(proc.pid, out_file, seq)})
    finally:
        proc.stop(timeout=30.0)
    first, second = dumps
    per_hit = (second["instructions"] - first["instructions"]) / (second["hits"] - first["hits"])
    return {"instructions_per_hit": round(per_hit), "dumps": dumps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.instructions",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--a", help="command starting build A (before); default: this checkout")
    ap.add_argument("--b", help="command starting build B (after; only with --a)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="from l1,l2,l3")
    ap.add_argument("--warmup", type=int, default=400, help="hits before counting")
    ap.add_argument("--requests", type=int, default=1000, help="hits in the first dump")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--out", type=Path)
    ns = ap.parse_args(argv)
    targets = [t.strip() for t in ns.targets.split(",") if t.strip()]
    if not targets or any(t not in TARGETS for t in targets):
        ap.error(f"--targets from {','.join(TARGETS)}")
    if not (CONNECTIONS <= ns.requests <= 20_000 and 0 <= ns.warmup <= 20_000):
        ap.error("--requests within 8..20000, --warmup within 0..20000")
    if ns.b and not ns.a:
        ap.error("--b needs --a")
    ns.requests -= ns.requests % CONNECTIONS
    ns.warmup -= ns.warmup % CONNECTIONS
    here = shlex.join(procs.proxy_command())
    builds = {"A": ns.a, "B": ns.b or here} if ns.a else {"this": here}
    ns.out = (
        ns.out
        or procs.REPO / "loadtest" / "runs" / f"instructions-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    ns.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {target: {} for target in targets}
    environment: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="tierproxy-instructions-"))
    try:
        with ProcGroup() as group, procs.sigterm_as_interrupt():
            _, oport = procs.start_origin(
                group, work, ["--body-size", f"fixed:{ns.size}", "--max-age", "86400"]
            )
            redis_url = None
            if "l2" in targets:
                _, redis_port = procs.start_redis(group, work)
                redis_url = f"redis://{LOOPBACK}:{redis_port}/0"
            environment = envinfo.collect()
            for target in targets:
                for label, command in builds.items():
                    result = measure(
                        group,
                        ns.out,
                        work,
                        label,
                        command,
                        target,
                        f"http://{LOOPBACK}:{oport}",
                        redis_url,
                        ns.warmup,
                        ns.requests,
                    )
                    results[target][label] = result
                    print(
                        f"[instructions] {target} {label}: "
                        f"{result['instructions_per_hit']:,} instructions per hit",
                        flush=True,
                    )
    except (StartupError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"[instructions] could not run: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)  # callgrind's dumps: about 1 MB each
    labels = list(builds)
    header = "| target | " + " | ".join(f"{label} instructions/hit" for label in labels)
    lines = [
        header + (" | B / A |" if len(labels) == 2 else " |"),
        "|---|" + "---:|" * (len(labels) + (1 if len(labels) == 2 else 0)),
    ]
    for target, by_build in results.items():
        cells = [f"{by_build[label]['instructions_per_hit']:,}" for label in labels]
        if len(labels) == 2:
            a, b = (by_build[label]["instructions_per_hit"] for label in labels)
            cells.append(f"{b / a:.3f}")
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    lines.append(
        f"\nCallgrind, instructions of the proxy process (user space) per hit: the difference "
        f"of {ns.requests} and {3 * ns.requests} hits after {ns.warmup} unmeasured, 8 "
        f"keep-alive connections in turn, body {ns.size} bytes."
    )
    record = {"builds": builds, "environment": environment, "results": results}
    envinfo.write_result(ns.out, "instructions", "\n".join(lines), record, ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
