"""How fast a hot key leaves the slow tiers: L1 backfill from L2 and L3 hits, measured.

    python -m loadtest.backfill                  # both tiers, 20 keys, 64 clients
    python -m loadtest.backfill --tiers l3 --keys 5

For each tier (``l2``: Redis, ``l3``: SQLite) a seeding proxy with L1 off stores ``--keys``
keys in that tier (one MISS each, then checked to be a hit there) and stops. A second proxy,
with L1 on and the same tier, then gets each key from ``--clients`` concurrent keep-alive
clients at once, back to back, ``--requests`` responses per key in all. Per key it records
which tier answered each response (``X-Cache``) and when: how many answers came from the slow
tier before L1 had the key, the time from the first request to the first ``HIT-L1``, and to
the last slow-tier answer (after it, every answer is an L1 hit). The first wave of concurrent
requests finds L1 empty and asks the slow tier; the first of them to be answered backfills L1
in a background task, so the count is about the number of clients, and the time about one
slow-tier lookup under that load.

Verdicts (exit 1 on any FAIL, 2 when the run could not be made): per tier, the median over
keys of the time to the last slow-tier answer is at most ``--max-ms`` (200 ms), and no
response is an error or a MISS. Everything runs on 127.0.0.1 (Redis on its own port, never
6379), bounded in time, and is stopped at the end, also on error. Results:
``loadtest/runs/backfill-<time>/summary.json`` and ``summary.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from . import procs
from .procs import LOOPBACK, ProcGroup, StartupError

SLOW = {"l2": "HIT-L2", "l3": "HIT-L3"}


def _tier_env(tier: str, redis_url: str | None, sqlite_path: Path) -> dict[str, str]:
    if tier == "l2":
        assert redis_url is not None
        return {"TIERPROXY_REDIS_URL": redis_url, "TIERPROXY_SQLITE_PATH": "off"}
    return {"TIERPROXY_SQLITE_PATH": str(sqlite_path)}


async def _seed(url: str, keys: list[str], tier: str) -> None:
    async with aiohttp.ClientSession() as session:
        for key in keys:
            async with session.get(url + key) as resp:
                await resp.read()
                if resp.status != 200:
                    raise StartupError(f"seeding {key}: status {resp.status}")
        await asyncio.sleep(0.5)  # the stores are background writes
        for key in keys:
            async with session.get(url + key) as resp:
                await resp.read()
                if resp.headers.get("X-Cache") != SLOW[tier]:
                    raise StartupError(f"{key} not stored in {tier}: {resp.headers.get('X-Cache')}")


async def _burst(
    session: aiohttp.ClientSession, url: str, clients: int, requests: int
) -> list[tuple[float, str]]:
    """``requests`` GETs of ``url`` from ``clients`` concurrent clients: (ms since the first
    request was sent, X-Cache) per response, in the order they completed."""
    started = time.perf_counter()
    remaining = requests
    out: list[tuple[float, str]] = []

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            async with session.get(url) as resp:
                await resp.read()
                label = resp.headers.get("X-Cache", "") if resp.status == 200 else str(resp.status)
            out.append(((time.perf_counter() - started) * 1000, label))

    await asyncio.gather(*(client() for _ in range(clients)))
    return out


def _key_figures(answers: list[tuple[float, str]], slow: str) -> dict[str, Any]:
    l1_times = [t for t, label in answers if label == "HIT-L1"]
    slow_times = [t for t, label in answers if label == slow]
    return {
        "responses": len(answers),
        "slow_tier_answers": len(slow_times),
        "first_l1_ms": round(min(l1_times), 2) if l1_times else None,
        "last_slow_ms": round(max(slow_times), 2) if slow_times else 0.0,
        "other": sorted({label for _, label in answers} - {"HIT-L1", slow}),
    }


async def _measure(url: str, keys: list[str], tier: str, ns: argparse.Namespace) -> list[Any]:
    connector = aiohttp.TCPConnector(limit=ns.clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Open the clients' connections first (on a key not measured), so the bursts time the
        # tiers, not TCP handshakes.
        await _burst(session, url + "/warm-connections", ns.clients, ns.clients * 2)
        return [
            _key_figures(await _burst(session, url + key, ns.clients, ns.requests), SLOW[tier])
            for key in keys
        ]


def run_tier(tier: str, ns: argparse.Namespace, out: Path) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"tierproxy-backfill-{tier}-"))
    keys = [f"/backfill/{tier}/{i}" for i in range(ns.keys)]
    with ProcGroup() as group:
        _, origin_port = procs.start_origin(
            group, work, ["--body-size", str(ns.size), "--max-age", "3600"], max_lifetime=600
        )
        origin = f"http://{LOOPBACK}:{origin_port}"
        redis_url = None
        if tier == "l2":
            _, redis_port = procs.start_redis(group, work)
            redis_url = f"redis://{LOOPBACK}:{redis_port}/0"
        tier_env = _tier_env(tier, redis_url, work / "l3.sqlite3")
        base = {"TIERPROXY_ORIGIN": origin, "TIERPROXY_ACCESS_LOG": "off", **tier_env}
        seeder, port, _ = procs.start_proxy(
            group, work, {**base, "TIERPROXY_L1_MAX_BYTES": "0"}, name="seeder"
        )
        asyncio.run(_seed(f"http://{LOOPBACK}:{port}", keys, tier))
        seeder.stop()
        _, port, _ = procs.start_proxy(group, work, base, name="measured")
        per_key = asyncio.run(_measure(f"http://{LOOPBACK}:{port}", keys, tier, ns))
    last = [k["last_slow_ms"] for k in per_key]
    firsts = [k["first_l1_ms"] for k in per_key if k["first_l1_ms"] is not None]
    return {
        "tier": tier,
        "keys": per_key,
        "median_slow_tier_answers": statistics.median(k["slow_tier_answers"] for k in per_key),
        "median_first_l1_ms": round(statistics.median(firsts), 2) if firsts else None,
        "median_last_slow_ms": round(statistics.median(last), 2),
        "max_last_slow_ms": round(max(last), 2),
        "other_labels": sorted({x for k in per_key for x in k["other"]}),
    }


def verdicts(result: dict[str, Any], max_ms: float) -> list[tuple[str, bool, str]]:
    tier = result["tier"]
    return [
        (
            f"{tier}: median time to the last slow-tier answer <= {max_ms:g} ms",
            result["median_last_slow_ms"] <= max_ms,
            f"{result['median_last_slow_ms']} ms",
        ),
        (
            f"{tier}: every answer a hit (no MISS, no error)",
            not result["other_labels"],
            ", ".join(result["other_labels"]) or "none other",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.backfill",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--tiers", default="l2,l3", help="comma list from l2,l3")
    ap.add_argument("--keys", type=int, default=20)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=1000, help="responses per key")
    ap.add_argument("--size", type=int, default=1024, help="body bytes")
    ap.add_argument("--max-ms", type=float, default=200.0)
    ap.add_argument("--out", type=Path)
    ns = ap.parse_args(argv)
    tiers = [t.strip() for t in ns.tiers.split(",") if t.strip()]
    if not tiers or any(t not in SLOW for t in tiers):
        ap.error("--tiers: l2 and/or l3")
    if not (1 <= ns.keys <= 200 and 1 <= ns.clients <= 512 and 1 <= ns.requests <= 100_000):
        ap.error("--keys within 1..200, --clients within 1..512, --requests within 1..100000")
    out = ns.out or procs.REPO / "loadtest" / "runs" / f"backfill-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        with procs.sigterm_as_interrupt():
            for tier in tiers:
                print(f"[backfill] {tier}: seeding {ns.keys} keys, then {ns.clients} clients")
                results.append(run_tier(tier, ns, out))
    except StartupError as exc:
        print(f"[backfill] could not run: {exc}", file=sys.stderr)
        return 2
    lines = [
        "| tier | slow-tier answers per key | first L1 hit | last slow-tier answer (median, max) |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['tier']} | {r['median_slow_tier_answers']:g} | {r['median_first_l1_ms']} ms "
            f"| {r['median_last_slow_ms']} ms, {r['max_last_slow_ms']} ms |"
        )
    judged = [v for r in results for v in verdicts(r, ns.max_ms)]
    lines += ["", "| verdict | result | value |", "|---|---|---|"]
    lines += [f"| {name} | {'PASS' if ok else 'FAIL'} | {value} |" for name, ok, value in judged]
    text = "\n".join(lines)
    print(text)
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(
        json.dumps({"args": vars(ns) | {"out": str(out)}, "results": results}, indent=2)
    )
    print(f"[backfill] results: {out}")
    return 0 if all(ok for _, ok, _ in judged) else 1


if __name__ == "__main__":
    sys.exit(main())
