"""Access log and request ids: one line per request, JSON or text, never a secret."""

from __future__ import annotations

import json
import logging
from typing import Any, TextIO, cast

import aiohttp
import pytest
from support.fixture_types import MakeProxy, SpawnProxy
from support.origin import Origin
from support.proxy import fetch
from support.wait import wait_for_condition
from yarl import URL

from tierproxy.logs import AccessRecord

from .conftest import AUTH, TOKEN

CACHEABLE = {"Cache-Control": "max-age=300"}
AUTH_SECRET = "Bearer client-credential-4711"
COOKIE_SECRET = "sessionid=cookie-secret-0815"
ACCESS_FIELDS = {
    "method",
    "path",
    "status",
    "cache",
    "bytes",
    "duration_ms",
    "request_id",
    "client",
}


def _json_lines(stderr: str) -> list[dict[str, Any]]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line must be JSON


def _access(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line["logger"] == "tierproxy.access"]


async def test_json_access_lines_carry_the_fields_and_never_a_secret(
    origin: Origin, spawn_proxy: SpawnProxy, redis_url: str
) -> None:
    origin.set("/a", headers={**CACHEABLE, "Set-Cookie": "x=1"}, size=321)
    origin.set("/b", headers=CACHEABLE, size=10)
    proc = await spawn_proxy(LOG_FORMAT="json", PURGE_TOKEN=TOKEN)
    secrets = {"Authorization": AUTH_SECRET, "Cookie": COOKIE_SECRET}
    async with aiohttp.ClientSession() as session:
        miss = await fetch(
            session, "GET", proc.url + "/b?q=1", headers={"X-Request-ID": "rid-from-client.1"}
        )
        hit = await fetch(session, "GET", proc.url + "/b?q=1")
        # Credentials make a request private (BYPASS); its line must not show them.
        await fetch(session, "GET", proc.url + "/a", headers=secrets)
        purge = await fetch(session, "PURGE", proc.url + "/b?q=1", headers=AUTH)
        denied = await fetch(
            session, "PURGE", proc.url + "/b?q=1", headers={"Authorization": f"Bearer {TOKEN[:-1]}"}
        )
        admin = await fetch(
            session, "POST", proc.admin_url + "/purge", json={"tags": ["t"]}, headers=AUTH
        )
    assert (miss.x_cache, hit.x_cache, purge.status, denied.status, admin.status) == (
        "MISS",
        "HIT-L1",
        200,
        401,
        200,
    )

    await wait_for_condition(
        lambda: len(_access(_json_lines(proc.stderr))) >= 5, message="5 access lines"
    )
    proc.terminate()
    await proc.wait(15)
    lines = _json_lines(proc.stderr)
    access = _access(lines)

    assert len(access) == 5, access  # one per proxied request; the admin listener logs none
    first, second, third, purged, refused = access
    for line in access:
        assert ACCESS_FIELDS <= set(line), line
        assert {"ts", "level", "logger", "msg"} <= set(line)
        assert line["level"] == "INFO" and line["client"] == "127.0.0.1"
    assert first["method"] == "GET" and first["path"] == "/b?q=1" and first["status"] == 200
    assert first["cache"] == "MISS" and first["bytes"] == 10
    assert first["request_id"] == "rid-from-client.1" == miss.headers["X-Request-ID"]
    assert {"l2_ms", "l3_ms", "origin_ms"} <= set(first), first
    assert first["origin_ms"] > 0 and first["duration_ms"] >= first["origin_ms"]
    assert second["cache"] == "HIT-L1" and "origin_ms" not in second and "l2_ms" not in second
    assert second["request_id"] == hit.headers["X-Request-ID"] != first["request_id"]
    assert third["bytes"] == 321 and third["cache"] == "BYPASS"
    assert (purged["method"], purged["status"], refused["status"]) == ("PURGE", 200, 401)
    # The purge itself is logged (counts, not credentials) by tierproxy.invalidation.
    assert any(
        line["logger"] == "tierproxy.invalidation" and "purge from admin" in line["msg"]
        for line in lines
    )
    everything = proc.stderr
    for secret in (
        TOKEN,
        AUTH_SECRET,
        "client-credential-4711",
        COOKIE_SECRET,
        "cookie-secret-0815",
        "x=1",
    ):
        assert secret not in everything, secret


async def test_text_access_line_is_readable(origin: Origin, spawn_proxy: SpawnProxy) -> None:
    origin.set("/t", headers=CACHEABLE, size=5)
    proc = await spawn_proxy()
    async with aiohttp.ClientSession() as session:
        response = await fetch(
            session, "GET", proc.url + "/t", headers={"X-Request-ID": "text-rid-1"}
        )
    assert response.status == 200

    def access_lines() -> list[str]:
        return [line for line in proc.stderr.splitlines() if " tierproxy.access: " in line]

    await wait_for_condition(access_lines, message="an access line")
    line = access_lines()[0]
    assert " INFO tierproxy.access: GET /t 200 MISS 5B " in line, line
    assert "origin=" in line and "l3=" in line and "rid=text-rid-1" in line, line
    assert "client=127.0.0.1" in line


async def test_access_log_off_and_level_warning_write_no_access_lines(
    origin: Origin, spawn_proxy: SpawnProxy
) -> None:
    origin.set_default(headers=CACHEABLE)
    off = await spawn_proxy(ACCESS_LOG="off", LOG_FORMAT="json")
    quiet = await spawn_proxy(LOG_LEVEL="WARNING", LOG_FORMAT="json")
    async with aiohttp.ClientSession() as session:
        for proc in (off, quiet):
            for _ in range(3):
                assert (await fetch(session, "GET", proc.url + "/x")).status == 200
    for proc in (off, quiet):
        proc.terminate()
        await proc.wait(15)
    assert _access(_json_lines(off.stderr)) == []
    assert any(line["msg"] == "stopped" for line in _json_lines(off.stderr))  # other logs flow
    assert _access(_json_lines(quiet.stderr)) == []
    assert _json_lines(quiet.stderr) == []  # nothing at INFO at all


async def test_request_id_is_passed_through_or_generated_and_forwarded_to_the_origin(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set_default(headers={"Cache-Control": "no-store"})
    proxy = await make_proxy()

    given = await proxy.get("/r1", headers={"X-Request-ID": "abc-123_x:y"})
    generated = await proxy.get("/r2")
    replaced = await proxy.get("/r3", headers={"X-Request-ID": "bad id\twith spaces"})
    too_long = await proxy.get("/r4", headers={"X-Request-ID": "a" * 200})
    posted = await proxy.request("POST", "/r5", data=b"x", headers={"X-Request-ID": "post-1"})

    assert given.headers["X-Request-ID"] == "abc-123_x:y"
    ids = [r.headers["X-Request-ID"] for r in (generated, replaced, too_long)]
    assert len(set(ids)) == 3 and all(0 < len(i) <= 64 and " " not in i for i in ids), ids
    assert posted.headers["X-Request-ID"] == "post-1"
    seen = {r.path: r.headers.getall("X-Request-ID") for r in origin.requests}
    assert seen == {
        "/r1": ["abc-123_x:y"],
        "/r2": [ids[0]],
        "/r3": [ids[1]],
        "/r4": [ids[2]],
        "/r5": ["post-1"],
    }


async def test_request_id_is_on_hits_streams_and_errors(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/big", headers=CACHEABLE, size=200_000)
    origin.set("/hit", headers=CACHEABLE)
    proxy = await make_proxy(MAX_ENTRY_BYTES=10_000, ORIGIN_TIMEOUT=0.3)
    await proxy.get("/hit")
    hit = await proxy.get("/hit", headers={"X-Request-ID": "h1"})
    streamed = await proxy.get("/big", headers={"X-Request-ID": "s1"})
    origin.set("/slow", hang=True)
    failed = await proxy.get("/slow", headers={"X-Request-ID": "e1"})
    bad = await proxy.request("GET", URL("/%zz", encoded=True), headers={"X-Request-ID": "b1"})

    assert (hit.x_cache, hit.headers["X-Request-ID"]) == ("HIT-L1", "h1")
    assert len(streamed.body) == 200_000 and streamed.headers["X-Request-ID"] == "s1"
    assert (failed.status, failed.headers["X-Request-ID"]) == (504, "e1")
    assert (bad.status, bad.headers["X-Request-ID"]) == (400, "b1")


async def test_access_record_has_the_tier_timings(
    origin: Origin, make_proxy: MakeProxy, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tierproxy.access")
    origin.set("/timed", headers=CACHEABLE)
    proxy = await make_proxy()
    await proxy.get("/timed")
    await proxy.settle()
    proxy.state.tier("l1").backend.clear()
    await proxy.get("/timed")  # HIT-L2

    records = [r for r in caplog.records if r.name == "tierproxy.access"]
    assert len(records) == 2
    miss, hit = (cast(AccessRecord, record.msg).fields for record in records)
    assert miss["cache"] == "MISS" and {"l2_ms", "l3_ms", "origin_ms"} <= set(miss)
    assert hit["cache"] == "HIT-L2" and "l2_ms" in hit and "l3_ms" not in hit
    assert 0 < hit["l2_ms"] < 100 and hit["duration_ms"] >= hit["l2_ms"]
    assert records[1].getMessage().startswith("GET /timed 200 HIT-L2 ")


def test_access_line_is_the_same_through_log_records_and_the_direct_path() -> None:
    from tierproxy.logs import AccessRecord, JsonFormatter, TextFormatter

    fields = {
        "method": "GET",
        "path": '/a b"\u00e9\n',
        "status": 200,
        "cache": "MISS",
        "bytes": None,
        "duration_ms": 1.5,
        "origin_ms": 1.25,
        "request_id": "r",
        "client": None,
    }
    record = logging.LogRecord(
        "tierproxy.access", logging.INFO, "", 0, AccessRecord(fields), None, None
    )
    for formatter in (JsonFormatter(), TextFormatter()):
        assert formatter.format(record) == formatter.format_access(fields, record.created)
    parsed = json.loads(JsonFormatter().format(record))
    assert {k: parsed[k] for k in fields} == fields
    text = TextFormatter().format(record)
    assert "\n" not in text and 'GET "/a b\\"\\u00e9\\n" 200 MISS -B 1.5ms origin=1.25ms' in text


def test_a_blocked_stderr_never_blocks_the_caller_lines_are_dropped_and_counted() -> None:
    import threading
    import time

    from tierproxy import logs

    release = threading.Event()
    written: list[str] = []

    class BlockedStream:
        def write(self, text: str) -> int:
            release.wait(10)
            written.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    handler = logs.BatchingStreamHandler(
        cast(TextIO, BlockedStream()), max_lines=100, interval=0.01
    )
    handler.setFormatter(logs.TextFormatter())
    logger = logging.getLogger("tierproxy.test-blocked")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    dropped_before = logs.dropped_lines()
    try:
        started = time.perf_counter()
        for i in range(2000):
            logger.info("line %d", i)
        elapsed = time.perf_counter() - started
    finally:
        release.set()
        logger.removeHandler(handler)
        handler.close()
    assert elapsed < 1.0, elapsed  # never waited on the stream
    dropped = logs.dropped_lines() - dropped_before
    lines = "".join(written).splitlines()
    assert dropped >= 1700 and len(lines) + dropped == 2000, (dropped, len(lines))
