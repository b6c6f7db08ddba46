"""Open-model load generator: requests issued at a constant arrival rate, on schedule.

    python -m loadtest.openloop --url http://127.0.0.1:8080 --rate 500 --duration 10

Request i is due at start + i / rate and is sent then, whether or not earlier requests have
returned (a closed-loop generator such as Locust's users waits for the previous answer, so a
stalled server also stalls the load and the stall is hidden: coordinated omission). Each
answer's latency is measured from the moment it was due, not from when it could be sent, so
a request that waited for a free connection, or for the generator itself, counts its wait.
At most ``--max-inflight`` requests are open at once (a bound on sockets and memory); a
request due while that many are open is sent as soon as one returns, and its latency still
counts from when it was due (``late_starts`` counts requests sent more than 1 ms after their
due time). The event loop's timers wake with about 1 ms granularity (epoll), so corrected
latency includes up to ~1 ms of the generator's own wake-up lag: the ``send lag`` histogram
shows it, next to the ``service`` time (from the send).

Outputs (the same per-second series as the Locust user, so ``loadtest.report`` reads both):
``--timeseries`` (JSON lines, loadtest/series.py), ``--errors``, and ``--hdr``: HdrHistograms
(1 us .. 60 s, 3 significant digits) of the corrected latency (from the due time) and of the
service time (from the send), overall and per X-Cache value / error status, as percentiles and
as HdrHistogram's base64 encoding. HdrHistogram comes from the ``hdrhistogram`` package (the
``loadtest`` extra); without it the log-bucket histograms of the series (±2 %) are used.

Every run is bounded: ``--duration`` seconds of arrivals, then at most ``--client-timeout``
seconds for the last answers. Only loopback URLs are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loadtest.series import Recorder, Zipf

LOWEST_US = 1
HIGHEST_US = 60_000_000
DIGITS = 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9, 99.99, 100.0)


class Hdr:
    """HdrHistograms by name (corrected / service, overall and per X-Cache), or None when the
    hdrhistogram package is missing."""

    def __init__(self) -> None:
        self.cls: Any = None
        # imported by name: the package ships no type information, and may be absent
        with contextlib.suppress(ImportError):
            self.cls = importlib.import_module("hdrh.histogram").HdrHistogram
        self.hists: dict[str, Any] = {}

    @property
    def available(self) -> bool:
        return self.cls is not None

    def record(self, name: str, ms: float) -> None:
        if self.cls is None:
            return
        h = self.hists.get(name)
        if h is None:
            h = self.hists[name] = self.cls(LOWEST_US, HIGHEST_US, DIGITS)
        h.record_value(min(HIGHEST_US, max(LOWEST_US, round(ms * 1000))))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, h in sorted(self.hists.items()):
            out[name] = {
                "count": h.get_total_count(),
                **{
                    f"p{p:g}_ms": round(h.get_value_at_percentile(p) / 1000, 3) for p in PERCENTILES
                },
                "encoded": h.encode().decode("ascii"),
            }
        return out


class OpenLoop:
    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns = ns
        self.rec = Recorder(ns.timeseries or "", ns.errors or "")
        rng = random.Random(ns.seed)
        self.rng = rng
        self.zipf = Zipf(ns.keys, ns.zipf, rng)
        self.hdr = Hdr()
        self.inflight = 0
        self.sent = 0
        self.late_starts = 0
        self.max_late_ms = 0.0
        self.stop = asyncio.Event()

    async def one(self, session: Any, sem: asyncio.Semaphore, due: float) -> None:
        import aiohttp

        key = f"{self.ns.prefix}{self.zipf.draw()}"
        purge = self.ns.purge_token and self.rng.random() < self.ns.purge_ratio
        async with sem:
            sent = time.perf_counter()
            late = (sent - due) * 1000
            # the generator's own delay: the event loop's timers wake up with ~1 ms
            # granularity (epoll), and a full --max-inflight makes requests wait
            self.hdr.record("send lag", late)
            if late > 1.0:
                self.late_starts += 1
                self.max_late_ms = max(self.max_late_ms, late)
            status, xcache, body = 0, None, ""
            if purge:
                self.rec.purge_started(key)
            try:
                async with session.request(
                    "PURGE" if purge else "GET",
                    self.ns.url + key,
                    headers={"Authorization": f"Bearer {self.ns.purge_token}"} if purge else None,
                ) as r:
                    data = await r.read()
                    status, xcache = r.status, r.headers.get("X-Cache")
                    if status >= 400:
                        body = data[:200].decode("utf-8", "replace")
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                body = f"{type(e).__name__}: {e}"[:200]
            end = time.perf_counter()
        corrected, service = (end - due) * 1000, (end - sent) * 1000
        if purge:
            self.rec.purge_finished(key)
            cls = self.rec.classify_purge(status)
        else:
            cls = self.rec.classify_get(key, status, sent, xcache)
            name = (xcache or "(no X-Cache)") if cls == "ok" else f"error {status or 'none'}"
            for prefix, ms in (("corrected", corrected), ("service", service)):
                self.hdr.record(prefix, ms)
                self.hdr.record(f"{prefix} {name}", ms)
        if cls not in ("ok", "purge_ok"):
            self.rec.detail(
                cls=cls,
                method="PURGE" if purge else "GET",
                key=key,
                status=status,
                ms=round(corrected, 1),
                x_cache=xcache,
                body=body,
            )
        self.rec.record(corrected, cls, xcache, status, 0, not purge)

    async def run(self) -> dict[str, Any]:
        import aiohttp

        ns = self.ns
        sem = asyncio.Semaphore(ns.max_inflight)
        timeout = aiohttp.ClientTimeout(total=ns.client_timeout)
        connector = aiohttp.TCPConnector(limit=ns.max_inflight, force_close=False)
        tasks: set[asyncio.Task[None]] = set()
        interval = 1.0 / ns.rate
        total = int(ns.rate * ns.duration)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            flusher = asyncio.create_task(self._flush_every_second())
            start = time.perf_counter()
            wall_start = time.time()
            i = 0
            while i < total and not self.stop.is_set():
                due = start + i * interval
                now = time.perf_counter()
                if due > now:
                    await asyncio.sleep(due - now)
                    continue
                # everything due by now goes out now (after a slow wake-up: several at once)
                while i < total and start + i * interval <= now:
                    t = asyncio.create_task(self.one(session, sem, start + i * interval))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    i += 1
            self.sent = i
            if tasks:
                await asyncio.wait(set(tasks), timeout=ns.client_timeout + 1)
            for t in tasks:
                t.cancel()
            flusher.cancel()
        self.rec.close()
        elapsed = time.time() - wall_start
        return {
            "generator": "loadtest.openloop (open model, constant arrival rate)",
            "rate": ns.rate,
            "duration_s": ns.duration,
            "scheduled": total,
            "sent": self.sent,
            "elapsed_s": round(elapsed, 3),
            "max_inflight": ns.max_inflight,
            "late_starts": self.late_starts,
            "max_late_ms": round(self.max_late_ms, 2),
            "hdrhistogram": self.hdr.available,
            "latency": self.hdr.to_json(),
        }

    async def _flush_every_second(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.rec.flush(upto=int(time.time()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.openloop", description=__doc__)
    ap.add_argument("--url", required=True, help="base URL, loopback only")
    ap.add_argument("--rate", type=float, required=True, help="requests per second (> 0)")
    ap.add_argument("--duration", type=float, required=True, help="seconds of arrivals")
    ap.add_argument("--keys", type=int, default=10000)
    ap.add_argument("--prefix", default="/k/")
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--purge-ratio", type=float, default=0.0)
    ap.add_argument("--purge-token", default="")
    ap.add_argument("--max-inflight", type=int, default=256)
    ap.add_argument("--client-timeout", type=float, default=10.0)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--timeseries", help="per-second series (JSON lines)")
    ap.add_argument("--errors", help="first 500 non-ok answers (JSON lines)")
    ap.add_argument("--hdr", type=Path, help="HdrHistogram results (JSON)")
    ns = ap.parse_args(argv)
    host = urlsplit(ns.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        ap.error(f"loopback targets only, got {host!r}")
    if not (0 < ns.rate <= 100_000 and 0 < ns.duration <= 3600 and ns.max_inflight >= 1):
        ap.error("--rate within (0, 100000], --duration within (0, 3600], --max-inflight >= 1")
    ns.url = ns.url.rstrip("/")

    async def go() -> dict[str, Any]:
        gen = OpenLoop(ns)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, gen.stop.set)  # stop sending; the answers still land
        return await gen.run()

    result = asyncio.run(go())
    if ns.hdr:
        ns.hdr.write_text(json.dumps(result, indent=2) + "\n")
    overall = result["latency"].get("corrected", {})
    print(
        f"openloop: {result['sent']}/{result['scheduled']} sent at {ns.rate:g}/s, "
        f"late starts {result['late_starts']}, corrected p99 {overall.get('p99_ms')} ms",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
