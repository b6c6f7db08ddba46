"""A simulated origin with fault knobs, for load tests.

    python -m loadtest.origin --port 9000 --latency lognormal:20,200 --body-size fixed:4096

Every path except ``/__*`` is content: the body for a path is deterministic (its size is
drawn once per path from ``--body-size``, so the same key always has the same bytes until
``version`` changes), with ``Cache-Control``, ``ETag`` and ``Last-Modified`` as configured,
and conditional requests (``If-None-Match`` / ``If-Modified-Since``) answered with 304.

Knobs, on the command line and at run time through the control endpoint:

    GET  /__control            current knobs (JSON)
    POST /__control            JSON object with any knobs to change, e.g.
                               {"hang_rate": 1.0}  {"error_rate": 0.2, "latency": "fixed:50"}
    GET  /__stats              request counts (JSON); /__stats?keys=1 adds per-key counts
    POST /__stats/reset        zero the counters
    GET  /__health             200

| knob                   | meaning                                                          |
|------------------------|------------------------------------------------------------------|
| latency                | ms before the answer: fixed:N, uniform:A,B, lognormal:P50,P99     |
| error_rate             | share of requests answered with ``error_status`` (500)           |
| hang_rate              | share that sleep ``hang_seconds`` before answering (a hung origin)|
| reset_rate             | share whose connection is reset after half the body was sent      |
| body_size              | bytes per key: fixed:N, uniform:A,B, lognormal:P50,P99            |
| max_age                | Cache-Control max-age; -1 = send no Cache-Control at all          |
| stale_while_revalidate | seconds, 0 = leave the directive out                              |
| stale_if_error         | seconds, 0 = leave the directive out                              |
| cache_control          | a literal Cache-Control value, overrides the three above          |
| etag / last_modified   | send validators (and honour conditional requests)                 |
| version                | bump to change every body (and its ETag)                          |

The process exits by itself after ``--max-lifetime`` seconds (default one hour).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import hashlib
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Any

from aiohttp import web

from loadtest.dist import Dist

MAX_TRACKED_KEYS = 200_000  # per-key counters stop growing past this many distinct keys
MAX_BODY = 16 * 1024 * 1024
_BLOCK_SIZE = 1 << 20


@dataclass
class Knobs:
    latency: str = "fixed:0"
    error_rate: float = 0.0
    error_status: int = 500
    hang_rate: float = 0.0
    hang_seconds: float = 30.0
    reset_rate: float = 0.0
    body_size: str = "fixed:1024"
    max_age: int = 60
    stale_while_revalidate: int = 0
    stale_if_error: int = 0
    cache_control: str = ""
    etag: bool = True
    last_modified: bool = True
    version: int = 1
    seed: int = 1

    def validate(self) -> None:
        Dist.parse(self.latency)
        Dist.parse(self.body_size)
        for name in ("error_rate", "hang_rate", "reset_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {v}")
        if self.error_rate + self.hang_rate + self.reset_rate > 1.0 + 1e-9:
            raise ValueError("error_rate + hang_rate + reset_rate must be <= 1")
        if not 100 <= self.error_status <= 599:
            raise ValueError(f"error_status must be an HTTP status, got {self.error_status}")
        if not 0 <= self.hang_seconds <= 3600:
            raise ValueError(f"hang_seconds must be within 0..3600, got {self.hang_seconds}")
        if self.stale_while_revalidate < 0 or self.stale_if_error < 0:
            raise ValueError("stale_while_revalidate / stale_if_error must be >= 0")

    def update(self, changes: dict[str, Any]) -> Knobs:
        names = {f.name: f.type for f in fields(self)}
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise ValueError(
                f"unknown knob(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        data = asdict(self)
        for k, v in changes.items():
            cur = data[k]
            if isinstance(cur, bool):
                if not isinstance(v, bool):
                    raise TypeError(f"{k} must be true or false")
            elif isinstance(cur, int):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
                    raise TypeError(f"{k} must be an integer")
                v = int(v)
            elif isinstance(cur, float):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise TypeError(f"{k} must be a number")
                v = float(v)
            else:
                if (
                    isinstance(v, (int, float))
                    and not isinstance(v, bool)
                    and k in ("latency", "body_size")
                ):
                    v = f"fixed:{v}"
                if not isinstance(v, str):
                    raise TypeError(f"{k} must be a string")
            data[k] = v
        new = Knobs(**data)
        new.validate()
        return new


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.started = time.time()
        self.requests = 0
        self.by_method: Counter[str] = Counter()
        self.by_outcome: Counter[str] = Counter()
        self.per_key: Counter[str] = Counter()
        self.untracked = 0
        self.inflight = 0
        self.max_inflight = 0
        self.inflight_by_key: Counter[str] = Counter()
        self.max_inflight_per_key = 0
        self.overlapping = 0  # requests that started while another for the same key was in flight
        self.conditional = 0

    def to_json(self, with_keys: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "since": self.started,
            "requests": self.requests,
            "by_method": dict(self.by_method),
            "by_outcome": dict(self.by_outcome),
            "distinct_keys": len(self.per_key),
            "inflight": self.inflight,
            "max_inflight": self.max_inflight,
            "max_inflight_per_key": self.max_inflight_per_key,
            "overlapping_same_key": self.overlapping,
            "conditional_requests": self.conditional,
        }
        if with_keys:
            out["per_key"] = dict(self.per_key.most_common())
            out["untracked"] = self.untracked
        return out


class Origin:
    def __init__(self, knobs: Knobs) -> None:
        knobs.validate()
        self.knobs = knobs
        self.stats = Stats()
        self._block = random.Random(knobs.seed).randbytes(_BLOCK_SIZE)
        self._born = email.utils.formatdate(time.time() - 3600, usegmt=True)

    # content -----------------------------------------------------------------
    def body_for(self, path: str, k: Knobs) -> bytes:
        rng = random.Random(f"{k.seed}:{path}")
        size = int(min(MAX_BODY, max(0.0, Dist.parse(k.body_size).sample(rng))))
        head = f"{path} v{k.version}\n".encode()
        if size <= len(head):
            return head[:size]
        need = size - len(head)
        off = rng.randrange(_BLOCK_SIZE)
        chunks = [head]
        while need > 0:
            piece = self._block[off : off + need]
            chunks.append(piece)
            need -= len(piece)
            off = 0
        return b"".join(chunks)

    @staticmethod
    def cache_control(k: Knobs) -> str | None:
        if k.cache_control:
            return k.cache_control
        if k.max_age < 0:
            return None
        parts = ["public", f"max-age={k.max_age}"]
        if k.stale_while_revalidate:
            parts.append(f"stale-while-revalidate={k.stale_while_revalidate}")
        if k.stale_if_error:
            parts.append(f"stale-if-error={k.stale_if_error}")
        return ", ".join(parts)

    # handlers ----------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path_qs
        if request.path.startswith("/__"):
            return await self.control(request)
        k = self.knobs
        st = self.stats
        st.requests += 1
        st.by_method[request.method] += 1
        if path in st.per_key or len(st.per_key) < MAX_TRACKED_KEYS:
            st.per_key[path] += 1
        else:
            st.untracked += 1
        st.inflight += 1
        st.max_inflight = max(st.max_inflight, st.inflight)
        if st.inflight_by_key[path] > 0:
            st.overlapping += 1
        st.inflight_by_key[path] += 1
        st.max_inflight_per_key = max(st.max_inflight_per_key, st.inflight_by_key[path])
        outcome = "cancelled"
        try:
            outcome, resp = await self._answer(request, path, k)
            return resp
        finally:
            st.inflight -= 1
            left = st.inflight_by_key[path] - 1
            if left:
                st.inflight_by_key[path] = left
            else:
                del st.inflight_by_key[path]
            st.by_outcome[outcome] += 1

    async def _answer(
        self, request: web.Request, path: str, k: Knobs
    ) -> tuple[str, web.StreamResponse]:
        roll = random.random()
        if roll < k.error_rate:
            fault = "error"
        elif roll < k.error_rate + k.hang_rate:
            fault = "hang"
        elif roll < k.error_rate + k.hang_rate + k.reset_rate:
            fault = "reset"
        else:
            fault = ""
        if fault == "hang":
            await asyncio.sleep(k.hang_seconds)
        else:
            delay = Dist.parse(k.latency).sample() / 1000.0
            if delay > 0:
                await asyncio.sleep(delay)
        if fault == "error":
            return "error", web.Response(
                status=k.error_status,
                text=f"origin: injected error {k.error_status}\n",
                headers={"Cache-Control": "no-store"},
            )
        body = self.body_for(path, k)
        headers = {"Content-Type": "application/octet-stream", "X-Origin-Version": str(k.version)}
        cc = self.cache_control(k)
        if cc:
            headers["Cache-Control"] = cc
        etag = None
        if k.etag:
            etag = (
                '"'
                + hashlib.blake2b(
                    f"{k.seed}:{k.version}:{path}:{len(body)}".encode(), digest_size=8
                ).hexdigest()
                + '"'
            )
            headers["ETag"] = etag
        if k.last_modified:
            headers["Last-Modified"] = self._born
        inm = request.headers.get("If-None-Match")
        ims = request.headers.get("If-Modified-Since")
        if inm is not None or ims is not None:
            self.stats.conditional += 1
        if etag and inm is not None:
            if etag in [t.strip().removeprefix("W/") for t in inm.split(",")] or inm.strip() == "*":
                return "not_modified", web.Response(status=304, headers=headers)
        elif k.last_modified and ims is not None and inm is None and ims == self._born:
            return "not_modified", web.Response(status=304, headers=headers)
        if fault == "reset" and request.method != "HEAD":
            resp = web.StreamResponse(headers=headers)
            resp.content_length = len(body)
            await resp.prepare(request)
            with contextlib.suppress(ConnectionError):
                await resp.write(body[: max(1, len(body) // 2)])
            if request.transport is not None:
                request.transport.abort()
            return "reset", resp
        return ("hang" if fault == "hang" else "ok"), web.Response(body=body, headers=headers)

    async def control(self, request: web.Request) -> web.StreamResponse:
        p = request.path
        if p == "/__health":
            return web.Response(text="ok\n")
        if p == "/__control":
            if request.method == "GET":
                return web.json_response(asdict(self.knobs))
            if request.method == "POST":
                try:
                    changes = await request.json()
                    if not isinstance(changes, dict):
                        raise TypeError("want a JSON object")
                    reset = bool(changes.pop("reset_stats", False))
                    self.knobs = self.knobs.update(changes)
                except (ValueError, TypeError) as e:
                    return web.json_response({"error": str(e)}, status=400)
                if reset:
                    self.stats.reset()
                return web.json_response(asdict(self.knobs))
        if p == "/__stats" and request.method == "GET":
            return web.json_response(self.stats.to_json(with_keys=request.query.get("keys") == "1"))
        if p == "/__stats/reset" and request.method == "POST":
            self.stats.reset()
            return web.json_response({"ok": True})
        return web.json_response({"error": f"no control endpoint {request.method} {p}"}, status=404)


def make_app(origin: Origin) -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    app.router.add_route("*", "/{tail:.*}", origin.handle)
    return app


def install_loop(choice: str) -> str:
    """Use uvloop when asked or, with 'auto', when it is installed. Returns the loop's name."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop  # type: ignore[import-not-found]
        except ImportError:
            if choice == "uvloop":
                raise SystemExit("--loop uvloop: uvloop is not installed")
            return "asyncio"
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    return "asyncio"


async def serve(
    origin: Origin, host: str, port: int, max_lifetime: float, ready_line: bool = True
) -> None:
    runner = web.AppRunner(make_app(origin), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, shutdown_timeout=1.0, backlog=1024)
    await site.start()
    if ready_line:
        print(
            f"loadtest.origin listening on http://{host}:{port} knobs={json.dumps(asdict(origin.knobs))}",
            flush=True,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        if max_lifetime > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), max_lifetime)
        else:
            await stop.wait()
    finally:
        await runner.cleanup()


def build_parser() -> argparse.ArgumentParser:
    d = Knobs()
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.origin", description="Simulated origin with fault knobs."
    )
    ap.add_argument("--host", default="127.0.0.1", help="listen address (loopback only by default)")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument(
        "--latency", default=d.latency, help="ms: fixed:N | uniform:A,B | lognormal:P50,P99"
    )
    ap.add_argument("--error-rate", type=float, default=d.error_rate)
    ap.add_argument("--error-status", type=int, default=d.error_status)
    ap.add_argument("--hang-rate", type=float, default=d.hang_rate)
    ap.add_argument("--hang-seconds", type=float, default=d.hang_seconds)
    ap.add_argument("--reset-rate", type=float, default=d.reset_rate)
    ap.add_argument(
        "--body-size", default=d.body_size, help="bytes: fixed:N | uniform:A,B | lognormal:P50,P99"
    )
    ap.add_argument("--max-age", type=int, default=d.max_age, help="-1 = no Cache-Control header")
    ap.add_argument("--stale-while-revalidate", type=int, default=d.stale_while_revalidate)
    ap.add_argument("--stale-if-error", type=int, default=d.stale_if_error)
    ap.add_argument("--cache-control", default=d.cache_control, help="literal Cache-Control value")
    ap.add_argument("--no-etag", dest="etag", action="store_false")
    ap.add_argument("--no-last-modified", dest="last_modified", action="store_false")
    ap.add_argument("--version", type=int, default=d.version, help="content version")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    ap.add_argument(
        "--max-lifetime",
        type=float,
        default=3600.0,
        help="exit after this many seconds (0 = never)",
    )
    return ap


def knobs_from_args(ns: argparse.Namespace) -> Knobs:
    names = {f.name for f in fields(Knobs)}
    k = Knobs(**{n: getattr(ns, n) for n in names if hasattr(ns, n)})
    k.validate()
    return k


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        knobs = knobs_from_args(ns)
    except ValueError as e:
        print(f"loadtest.origin: {e}", file=sys.stderr)
        return 2
    loop_name = install_loop(ns.loop)
    print(f"loadtest.origin: event loop {loop_name}, pid {os.getpid()}", flush=True)
    asyncio.run(serve(Origin(knobs), ns.host, ns.port, ns.max_lifetime))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
