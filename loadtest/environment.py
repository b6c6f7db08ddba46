"""What a result depends on, recorded in every result folder (run.json, bench.json).

Versions of Python and the libraries on the request path, whether uvloop is installed and
which event loop the proxy actually ran (from its own start-up log line), the Redis server's
version, the CPU count and model, what the host charges for the kernel work of a cache hit
(:func:`host_costs`), the git commit (and whether the tree had local changes), the full
``TIERPROXY_*`` environment the proxy got (the purge token masked) and the command line.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("aiohttp", "redis", "hiredis", "uvloop", "aiosqlite", "locust", "hdrhistogram")
SECRET_ENV = ("TIERPROXY_PURGE_TOKEN",)


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def redis_server_version(path: str | None) -> str | None:
    out = _run([path, "--version"]) if path else None
    m = re.search(r"v=(\S+)", out or "")
    return m[1] if m else out


def git_commit() -> dict[str, Any]:
    commit = _run(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    status = _run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def event_loop_from_log(log: Path) -> str | None:
    """The proxy logs "event loop: uvloop X" or "event loop: asyncio (...)" at start-up (the
    bench's bare handler "event loop uvloop")."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"event loop:? ([A-Za-z]+(?: [0-9][^\s\"',}]*)?)", text)
    return m[1] if m else None


def process_env(pid: int, prefix: str = "TIERPROXY_") -> dict[str, str] | None:
    """The environment a running process was started with (Linux /proc), `prefix` names only."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {
        k.decode(errors="replace"): v.decode(errors="replace")
        for k, _, v in pairs
        if k.startswith(prefix.encode())
    }


def masked_env(env: dict[str, str]) -> dict[str, str]:
    return {k: ("(set)" if k in SECRET_ENV else v) for k, v in sorted(env.items())}


def cpu_model() -> str | None:
    """The CPU's model name as Linux reports it (``/proc/cpuinfo``); None where it is not
    known."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() in ("model name", "Model", "Hardware") and value.strip():
            return value.strip()
    return None


def host_costs(rounds: int = 5, calls: int = 20_000, opens: int = 5_000) -> dict[str, float]:
    """What this host charges for the kernel work of a cache hit, in microseconds, the
    fastest of ``rounds`` (a busy moment only ever makes a round slower):

    * ``syscall_us``: one system call (``getppid``, through Python: about 0.05 us of it is
      the call from Python);
    * ``file_hit_us``: open, fstat, pread of 1 KiB and close of a file in the page cache -
      what nginx's ``proxy_cache`` does for every hit (tierproxy reads no file for an L1 or
      L2 hit).

    The two differ from host to host far more than the Python work does, so a ratio to nginx
    measured on two hosts can differ too (README, Performance). Bounded: about 0.3 s."""
    best_call = best_file = float("inf")
    with tempfile.TemporaryDirectory(prefix="tierproxy-host-") as tmp:
        path = os.path.join(tmp, "hit")
        Path(path).write_bytes(b"x" * 1024)
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(calls):
                os.getppid()
            best_call = min(best_call, (time.perf_counter() - started) / calls)
            started = time.perf_counter()
            for _ in range(opens):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fstat(fd)
                    os.pread(fd, 1024, 0)
                finally:
                    os.close(fd)
            best_file = min(best_file, (time.perf_counter() - started) / opens)
    return {"syscall_us": round(best_call * 1e6, 3), "file_hit_us": round(best_file * 1e6, 3)}


def host_line(env: dict[str, Any]) -> str:
    """The host's CPU and what it charges for a hit's kernel work (environment.host_costs):
    a ratio to nginx depends on them, so a table says where it was measured."""
    costs = env.get("host_costs") or {}
    parts = []
    if env.get("cpu_model"):
        parts.append(f"CPU: {env['cpu_model']}")
    if costs:
        parts.append(
            f"a system call {costs['syscall_us']:.2f} us, a file hit (open, fstat, pread 1 KiB,"
            f" close: nginx's proxy_cache per hit) {costs['file_hit_us']:.2f} us"
        )
    return "Host: " + "; ".join(parts) + "." if parts else ""


def collect(
    proxy_env: dict[str, str] | None = None,
    redis_path: str | None = None,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Everything except the loop the proxy ran (see event_loop_from_log, known once it has
    started)."""
    tierproxy_env = {k: v for k, v in os.environ.items() if k.startswith("TIERPROXY_")}
    tierproxy_env.update(proxy_env or {})
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in PACKAGES},
        "uvloop_installed": _version("uvloop") is not None,
        "redis_server": redis_server_version(redis_path),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model(),
        "host_costs": host_costs(),
        "git": git_commit(),
        "tierproxy_env": masked_env(tierproxy_env),
        # as typed (`python -m loadtest.run ...`), not with the module resolved to a path
        "command": list(sys.orig_argv) if command is None else command,
    }


def write_result(
    out: Path, name: str, table: str, record: dict[str, Any], args: argparse.Namespace
) -> None:
    """Print ``table`` and keep it as ``<name>.md`` in ``out``, with ``record`` and the
    command's arguments as ``<name>.json`` (the side-by-side tools: ab, scale, newconn)."""
    print(table)
    (out / f"{name}.md").write_text(table + "\n")
    payload = {**record, "args": {**vars(args), "out": str(out)}}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"[{name}] results: {out}")
