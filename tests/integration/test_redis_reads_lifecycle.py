"""The L2 pipelined reader's connection life (tierproxy.tiers.redis_reads), against a real
redis-server, and against a server that is not plain Redis:

* A connection that Redis refuses right after accepting it (``maxclients`` reached: Redis
  writes ``-ERR max number of clients reached`` and closes) is often already lost when the
  callers of the connection attempt get it: their GET (or PING) is queued on the dead
  connection, whose futures were all failed already, and waited its caller's whole budget
  instead of failing at once.
* ``close()`` while a connection attempt has just completed (its done callback not yet run):
  the callback installed the new connection after ``close()`` - the "closed" reader stayed
  connected, and the socket was never closed.
* A reply that is not what GET or PING answer on a RESP2 connection (a RESP3 boolean or push
  from a server or proxy that is not plain Redis): hiredis returned a RESP3 false exactly as
  its "no complete reply yet", so that reply vanished and every later reply went to the
  command before its own. The connection is now dropped instead.

The first two failed before the fixes (8 of 8 and 5 of 5 attempts); the third shows the
hardening.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from support.redis_server import RedisServer, find_redis_server
from support.wait import wait_for_condition

from tierproxy.tiers.redis_reads import PipelinedReader, ReadChannelError, for_url


def _reader(url: str) -> PipelinedReader:
    reader = for_url(url, connect_timeout=0.5, stale_after=0.5)
    assert reader is not None
    return reader


@pytest.fixture
def full_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, Any]]:
    """A private redis-server with ``maxclients 1``, its one slot held by a client."""
    binary = find_redis_server()
    if binary is None:
        pytest.fail("redis-server not found")
    server = RedisServer(binary, tmp_path / "redis-full", extra_args=["--maxclients", "1"])
    server.start()
    holder = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2)
    try:
        for _ in range(50):  # the start-up probe's slot may take a moment to be freed
            try:
                holder.set("k", "v")
                break
            except redis.RedisError:
                holder.connection_pool.disconnect()
                time.sleep(0.05)
        else:
            pytest.fail("could not take the only client slot")
        yield server, holder
    finally:
        holder.close()
        server.stop()


async def test_a_connection_refused_after_accept_fails_the_get_at_once_not_after_its_budget(
    full_redis: tuple[RedisServer, Any],
) -> None:
    """Redis at maxclients accepts, writes an error and closes. Without AUTH/SELECT,
    ``_connect`` returns the protocol as soon as TCP is up; the unasked-for error reply
    arrives (data_received -> abort: ``lost``) before the callers resume from
    ``asyncio.shield(attempt)``; ``_send`` then queues the GET on that lost protocol
    (``_Protocol.send`` never checks ``lost``): its future was not in ``waiting`` when
    ``_fail_all`` ran, ``_flush`` writes nothing, and nothing ever resolves it."""
    server, _holder = full_redis
    url = f"redis://127.0.0.1:{server.port}/0"
    outcomes: list[tuple[str, float]] = []
    for _attempt in range(8):  # each attempt at most 1 s
        reader = _reader(url)
        started = time.monotonic()
        try:
            async with asyncio.timeout(1.0):
                await reader.get(b"k")
            outcomes.append(("answered", time.monotonic() - started))
        except ReadChannelError:
            outcomes.append(("failed at once", time.monotonic() - started))
        except TimeoutError:
            outcomes.append(("waited the whole budget", time.monotonic() - started))
        finally:
            await reader.close()
    assert all(what == "failed at once" and took < 0.5 for what, took in outcomes), outcomes


async def test_close_right_after_a_connection_attempt_completes_leaves_nothing_connected(
    redis_url: str, redis_client: Any
) -> None:
    """``close()`` cancels ``_connecting`` (a no-op once the task is done) and drops
    ``_protocol``; ``_connect_done``, still to run, then sets ``_protocol`` to the new live
    connection: after close() the reader is ``connected``, answers GETs, and its socket to
    Redis is never closed."""
    redis_client.set("k", "v")
    baseline = int(redis_client.info("clients")["connected_clients"])
    leaked: list[int] = []
    for _attempt in range(5):
        reader = _reader(redis_url)
        getting = asyncio.ensure_future(reader.get(b"k"))
        for _ in range(10_000):  # until the connection attempt has completed
            await asyncio.sleep(0)
            attempt = reader._connecting
            if attempt is not None and attempt.done():
                break
        await reader.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await getting
        await asyncio.sleep(0.05)
        if reader.connected:
            leaked.append(_attempt)
            # (what the test itself opened: closed again, so the next test starts clean)
            protocol = reader._protocol
            if protocol is not None and protocol.transport is not None:
                protocol.transport.abort()
    await wait_for_condition(
        lambda: int(redis_client.info("clients")["connected_clients"]) == baseline,
        timeout=5,
        message="test connections closed",
    )
    assert not leaked, f"reader still connected after close() in attempts {leaked}"


async def test_a_reply_no_get_answers_drops_the_connection_instead_of_shifting_replies() -> None:
    """A server that is not plain Redis answers the first GET with a RESP3 ``false`` and the
    second with a value. Neither caller may get the other's reply: both fail (the connection
    is dropped), and a GET after that, on a new connection, gets its own reply."""
    answers = [b"#f\r\n$5\r\nsecnd\r\n", b"$5\r\nthird\r\n"]
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        answer = answers[min(connections, len(answers)) - 1]
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                async with asyncio.timeout(5):
                    want = 2 if connections == 1 else 1
                    for _ in range(want):  # one GET command: 5 lines (*2, $3, GET, $n, key)
                        for _ in range(5):
                            await reader.readline()
                    writer.write(answer)
                    await writer.drain()
                    await reader.read()  # until the client goes
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader = _reader(f"redis://127.0.0.1:{port}/0")
    try:
        first = asyncio.ensure_future(reader.get(b"first"))
        second = asyncio.ensure_future(reader.get(b"second"))
        results = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 3)
        assert all(isinstance(r, ReadChannelError) for r in results), results
        assert await asyncio.wait_for(reader.get(b"third"), 3) == b"third"
    finally:
        await reader.close()
        server.close()
        await server.wait_closed()
