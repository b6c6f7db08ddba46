"""L2 lookups on one pipelined connection (tierproxy.tiers.redis_reads), against a real Redis.

Frozen (SIGSTOP), killed and restarted Redis: a GET fails within its budget, never gets
another GET's reply, the waiting queue stays bounded, and the reader comes back by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
import redis
from support.redis_server import RedisServer
from support.wait import wait_for_condition

from tierproxy.tiers.redis_reads import PipelinedReader, ReadChannelError, for_url


def reader_for(url: str, **overrides: Any) -> PipelinedReader:
    options = {"connect_timeout": 0.5, "stale_after": 0.5, **overrides}
    if "max_pending" in options:
        max_pending = options.pop("max_pending")
        reader = for_url(url, **options)
        assert reader is not None
        reader._max_pending = max_pending
        return reader
    reader = for_url(url, **options)
    assert reader is not None
    return reader


async def get_within(reader: PipelinedReader, key: bytes, budget: float) -> bytes | None:
    async with asyncio.timeout(budget):
        return await reader.get(key)


async def test_concurrent_gets_share_one_connection_and_each_gets_its_own_value(
    redis_server: RedisServer, redis_url: str, redis_client: Any
) -> None:
    values = {f"k{i}".encode(): f"value {i}".encode() * (i + 1) for i in range(200)}
    redis_client.mset(values)
    before = redis_client.info("clients")["connected_clients"]
    reader = reader_for(redis_url)
    try:
        got = await asyncio.gather(*(reader.get(key) for key in values))
        assert got == list(values.values())
        assert await reader.get(b"missing") is None
        assert redis_client.info("clients")["connected_clients"] == before + 1
    finally:
        await reader.close()


async def test_abandoned_gets_never_answer_another_keys_get(
    redis_server: RedisServer, redis_url: str, redis_client: Any
) -> None:
    redis_client.mset({f"k{i}": f"v{i}" for i in range(100)})
    reader = reader_for(redis_url, stale_after=30)  # keep the connection: replies come late
    try:
        await reader.get(b"k0")  # connected
        with redis_server.frozen():
            for _batch in range(10):  # 1,000 GETs that give up mid-command
                results = await asyncio.gather(
                    *(get_within(reader, f"k{i}".encode(), 0.02) for i in range(100)),
                    return_exceptions=True,
                )
                assert all(isinstance(r, TimeoutError) for r in results), results[:3]
            assert reader.pending == 1000
        # After SIGCONT the 1,000 late replies arrive first and are dropped.
        for _round in range(3):
            got = await asyncio.gather(
                *(get_within(reader, f"k{i}".encode(), 5) for i in range(100))
            )
            assert got == [f"v{i}".encode() for i in range(100)]
        assert reader.pending == 0
    finally:
        await reader.close()


async def _leave_a_get_unanswered(reader: PipelinedReader) -> None:
    """With Redis frozen: a GET that gives up, and then time for it to be older than the
    reader's stale_after (0.3 s in these tests)."""
    with pytest.raises(TimeoutError):
        await get_within(reader, b"k", 0.1)
    await asyncio.sleep(0.4)


async def test_a_connection_that_stops_answering_is_dropped_and_replaced(
    redis_server: RedisServer, redis_url: str, redis_client: Any
) -> None:
    redis_client.set("k", "v")
    reader = reader_for(redis_url, stale_after=0.3)
    loop = asyncio.get_running_loop()
    try:
        assert await reader.get(b"k") == b"v"
        with redis_server.frozen():
            await _leave_a_get_unanswered(reader)
            started = loop.time()
            with pytest.raises(ReadChannelError, match="stopped answering"):
                await get_within(reader, b"k", 1.0)
            assert loop.time() - started < 0.1  # failed at once, not after the budget
            assert reader.pending == 0
        assert await get_within(reader, b"k", 2.0) == b"v"  # a new connection
    finally:
        await reader.close()


async def test_waiting_gets_are_bounded_while_redis_is_frozen(
    redis_server: RedisServer, redis_url: str, redis_client: Any
) -> None:
    redis_client.set("k", "v")
    reader = reader_for(redis_url, stale_after=30, max_pending=50)
    try:
        await reader.get(b"k")
        with redis_server.frozen():
            # (distinct keys: GETs of one key in one loop iteration share one command)
            results = await asyncio.gather(
                *(get_within(reader, b"k%d" % i, 0.2) for i in range(80)),
                return_exceptions=True,
            )
            refused = [r for r in results if isinstance(r, ReadChannelError)]
            timed_out = [r for r in results if isinstance(r, TimeoutError)]
            assert (len(timed_out), len(refused)) == (50, 30), results
            assert reader.pending == 50
        # After SIGCONT the 50 late replies arrive (and are dropped); then GETs flow again.
        await wait_for_condition(lambda: reader.pending == 0, timeout=5, message="backlog")
        assert await get_within(reader, b"k", 5.0) == b"v"
    finally:
        await reader.close()


async def test_killed_redis_fails_gets_at_once_and_the_reader_reconnects_after_restart(
    redis_server: RedisServer, redis_url: str, redis_client: Any
) -> None:
    redis_client.set("k", "v")
    reader = reader_for(redis_url)
    loop = asyncio.get_running_loop()
    try:
        assert await reader.get(b"k") == b"v"
        redis_server.kill()
        for _ in range(3):
            started = loop.time()
            with pytest.raises(ReadChannelError):
                await get_within(reader, b"k", 2.0)
            assert loop.time() - started < 0.6  # refused or lost, never the whole budget
        redis_server.restart()
        redis.Redis.from_url(redis_url, socket_timeout=2).set("k", "v2")
        assert await get_within(reader, b"k", 2.0) == b"v2"
    finally:
        await reader.close()


async def test_database_number_and_password_in_the_url_are_used(
    redis_server: RedisServer, redis_url: str, redis_client: Any
) -> None:
    base = redis_url.rsplit("/", 1)[0]
    db3 = redis.Redis.from_url(base + "/3", socket_timeout=2)
    db3.set("k", "in db 3")
    reader = reader_for(base + "/3")
    try:
        assert await reader.get(b"k") == b"in db 3"
    finally:
        await reader.close()
        db3.flushdb()

    password = "pipelined-reader-secret"
    redis_client.config_set("requirepass", password)
    try:
        authed = base.replace("redis://", f"redis://:{password}@") + "/3"
        redis.Redis.from_url(authed, socket_timeout=2).set("k", "secret value")
        reader = reader_for(authed)
        wrong = reader_for(base.replace("redis://", "redis://:not-the-password@") + "/3")
        try:
            assert await reader.get(b"k") == b"secret value"
            with pytest.raises(ReadChannelError):
                await get_within(wrong, b"k", 2.0)
        finally:
            await reader.close()
            await wrong.close()
    finally:
        with contextlib.suppress(redis.RedisError):
            admin = redis.Redis.from_url(
                base.replace("redis://", f"redis://:{password}@"), socket_timeout=2
            )
            admin.flushall()
            admin.config_set("requirepass", "")


def test_tls_urls_stay_on_redis_py() -> None:
    assert for_url("rediss://127.0.0.1:6380/0", connect_timeout=1, stale_after=1) is None


def test_reader_runs_on_uvloop(
    redis_server: RedisServer, redis_url: str, redis_client: Any
) -> None:
    """``tierproxy serve`` runs on uvloop, whose transports are not asyncio.Transport s."""
    uvloop = pytest.importorskip("uvloop")
    redis_client.mset({f"u{i}": f"uv {i}" for i in range(50)})

    async def main() -> list[bytes | None]:
        reader = reader_for(redis_url)
        try:
            assert await reader.ping()
            return await asyncio.gather(
                *(get_within(reader, f"u{i}".encode(), 2) for i in range(50))
            )
        finally:
            await reader.close()

    assert uvloop.run(main()) == [f"uv {i}".encode() for i in range(50)]


async def test_gets_started_together_reach_redis_in_one_write(
    redis_server: RedisServer, redis_url: str, redis_client: Any
) -> None:
    """Concurrent lookups are written to the socket together, once per loop iteration, not
    one send per GET: Redis then reads them in a few read events (its ``total_reads_processed``
    counts them) instead of one each, which costs both processes far less on a busy core."""
    redis_client.mset({f"k{i}": f"v{i}" for i in range(200)})
    reader = reader_for(redis_url)
    try:
        await reader.get(b"k0")  # connected
        for _round in range(3):
            before = int(redis_client.info("stats")["total_reads_processed"])
            got = await asyncio.gather(*(reader.get(f"k{i}".encode()) for i in range(200)))
            assert got == [f"v{i}".encode() for i in range(200)]
            reads = int(redis_client.info("stats")["total_reads_processed"]) - before
            # One INFO command of this test is among them; a socket read of Redis takes at
            # most 16 KiB, and the 200 GETs are under 6 KiB.
            assert reads <= 5, reads
    finally:
        await reader.close()


async def test_replies_split_across_parser_slices_reach_their_own_gets(
    redis_server: RedisServer, redis_url: str, redis_client: Any
) -> None:
    """Replies are parsed a slice of the read at a time (hiredis moves its buffer after every
    reply, quadratic in one big feed): replies of every size around the slice's, errors and
    nils among them, still each reach the GET that asked, in one read or many."""
    sizes = [0, 1, 100, 16_383, 16_384, 16_385, 16_400, 40_000, 70_000, 1_300]
    values = {
        f"k{i}".encode(): (b"%d:" % i + bytes([65 + i % 26]) * sizes[i % len(sizes)])
        for i in range(300)
    }
    redis_client.mset(values)
    redis_client.rpush("a-list", "x")  # GET on it: a WRONGTYPE error reply
    reader = reader_for(redis_url)
    try:
        await reader.get(b"k0")  # connected
        for _round in range(3):
            keys = [*values, b"missing", b"a-list", *reversed(values)]
            got = await asyncio.gather(*(reader.get(key) for key in keys), return_exceptions=True)
            assert got[: len(values)] == list(values.values())
            assert got[len(values)] is None
            failed = got[len(values) + 1]
            assert isinstance(failed, ReadChannelError) and "WRONGTYPE" in str(failed)
            assert got[len(values) + 2 :] == list(reversed(values.values()))
        assert reader.pending == 0
    finally:
        await reader.close()


async def test_a_get_started_after_the_connection_was_lost_fails_at_once(
    redis_server: RedisServer, redis_url: str, redis_client: Any
) -> None:
    """A lookup's second read (a variant's record, after its index's reply) can start after the
    connection went down in the same loop iteration: it fails at once instead of waiting on a
    dead connection for its whole timeout, and the next GET reconnects."""
    redis_client.set("k", "v")
    reader = reader_for(redis_url)
    try:
        assert await reader.get(b"k") == b"v"
        assert reader.connected
        redis_client.client_kill_filter(_type="normal", skipme=True)
        await wait_for_condition(lambda: not reader.connected, message="connection lost")
        with pytest.raises(ReadChannelError, match="lost"):
            reader.get_soon(b"k")
        assert await get_within(reader, b"k", 5) == b"v"  # reconnected
        assert reader.connected
    finally:
        await reader.close()


async def test_a_probe_after_a_thaw_is_not_failed_by_the_frozen_connections_backlog(
    redis_server: RedisServer, redis_url: str, redis_client: Any
) -> None:
    """A health probe (ping) that finds the connection stale - its oldest command older than
    ``stale_after``, its reply not yet read because Redis was frozen until just now - asks on
    a fresh connection instead of failing: the first probe after a thaw closes the breaker
    instead of backing off for another window (seen as a flake of the probe-backoff test)."""
    redis_client.set("k", "v")
    reader = reader_for(redis_url, stale_after=0.3)
    try:
        assert await reader.get(b"k") == b"v"
        with redis_server.frozen():
            await _leave_a_get_unanswered(reader)
        # Thawed; the GET's late reply is still in the socket, unread: the probe goes now.
        assert await asyncio.wait_for(reader.ping(), 2.0)
        assert await get_within(reader, b"k", 2.0) == b"v"
        assert reader.pending == 0
    finally:
        await reader.close()


async def test_gets_of_one_key_started_together_share_one_command_each_with_its_own_fate(
    redis_server: RedisServer, redis_url: str, redis_client: Any
) -> None:
    """GETs of the same key started in one loop iteration are written as one command, whose
    reply answers them all (they would have gone in the same write, one after another: Redis
    answers them alike). Each keeps its own future: one given up does not take the others
    with it. A GET started after the write is a command of its own, and sees what Redis
    holds by then."""
    redis_client.set("hot", "v1")
    redis_client.set("cold", "c")
    reader = reader_for(redis_url)
    try:
        await reader.get(b"cold")  # connected
        before = int(redis_client.info("commandstats")["cmdstat_get"]["calls"])
        hot = [reader.get_soon(b"hot") for _ in range(50)]
        cold = [reader.get_soon(b"cold") for _ in range(3)]
        hot[7].cancel()  # its caller gave up: the others still get the reply
        assert reader.pending == 2
        got = await asyncio.gather(*hot[:7], *hot[8:], *cold)
        assert got == [b"v1"] * 49 + [b"c"] * 3
        assert hot[7].cancelled()
        calls = int(redis_client.info("commandstats")["cmdstat_get"]["calls"]) - before
        assert calls == 2, calls
        # Written: a later GET of that key is a command of its own.
        redis_client.set("hot", "v2")
        assert await reader.get(b"hot") == b"v2"
        # Errors reach every GET that shared the command.
        redis_client.delete("hot")
        redis_client.rpush("hot", "x")
        failed = await asyncio.gather(
            *(reader.get(b"hot") for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(f, ReadChannelError) and "WRONGTYPE" in str(f) for f in failed)
        assert reader.pending == 0
    finally:
        await reader.close()
