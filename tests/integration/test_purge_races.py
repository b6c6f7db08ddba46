"""Once a PURGE has answered 200, no replica serves a copy it removed: not when a backfill
write it overtook lands in L2 meanwhile, nor when another replica's write lands there before
that replica heard of the purge, nor when a write that timed out reaches Redis after its undo.

Guaranteed by (tierproxy.purge, tierproxy.invalidation, tierproxy.tiers.redis): a purge is
*held* until the writes it overtook are undone and, with replicas, until L2 was purged a second
time - no copy of a key it covers is written anywhere meanwhile; a second round then purges
every other replica's L1 again; and an L2 write that got no reply is withdrawn (Redis refuses it
from then on) rather than merely deleted. Before, each test here served the purged copy after
the 200 (from L1 until its TTL, or from L2 for every replica).

Every test here runs real in-process proxies against the session's redis-server. The one
fault injected is timing on the wire: a small TCP proxy (``HoldingLink``, below) in front of
Redis that holds back one chosen command (found by a marker in the bytes a client sends: the
body of a cached copy, which L2 writes carry verbatim) and/or the reply to it, or the
pub/sub delivery of one purge message - what a slow or lossy link (a TCP retransmission on one
connection, a loaded replica) does to a command. Nothing in tierproxy is patched or mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from typing import Any

from support.fixture_types import MakeProxy
from support.origin import Origin
from support.proxy import Fetched, ProxyHandle
from support.redis_server import RedisServer
from support.storage import redis_key
from support.wait import wait_for_condition

TOKEN = "purge-races-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CACHEABLE = {"Cache-Control": "max-age=300"}
OLD = b"OLD-COPY-before-the-purge " * 4
NEW = b"NEW-COPY-after-the-purge " * 4


class HoldingLink:
    """A loopback TCP proxy in front of Redis that delays chosen traffic (bounded sleeps).

    * ``hold_up(marker, before, reply)``: the first client->Redis chunk containing ``marker``
      is forwarded ``before`` seconds late (and everything after it on that connection, kept
      in order), and the next Redis->client chunk on that connection ``reply`` seconds late.
      Bytes a client sent before it closed its socket are still delivered, as TCP does.
    * ``hold_down(marker, before)``: the first Redis->client chunk containing ``marker`` (e.g.
      a pub/sub message) is delivered ``before`` seconds late (order kept).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._up: tuple[bytes, float, float] | None = None
        self._down: tuple[bytes, float] | None = None
        self.up_held = asyncio.Event()  # the marked command reached Redis
        self.down_held = asyncio.Event()  # the marked message was delivered

    async def start(self) -> HoldingLink:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def hold_up(self, marker: bytes, before: float, reply: float = 0.0) -> None:
        self._up = (marker, before, reply)
        self.up_held.clear()

    def hold_down(self, marker: bytes, before: float) -> None:
        self._down = (marker, before)
        self.down_held.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            _, stuck = await asyncio.wait(list(self._tasks), timeout=3)
            for task in stuck:
                task.cancel()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(2):
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._writers.add(up_writer)
            reply_delay = [0.0]
            down = asyncio.ensure_future(self._downstream(up_reader, writer, reply_delay))
            await self._upstream(reader, up_writer, reply_delay)
            # The client is done sending; what it sent is delivered, its replies drained.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await asyncio.shield(down)
            down.cancel()
        except (OSError, TimeoutError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.close()
            self._tasks.discard(task)

    async def _upstream(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, reply_delay: list[float]
    ) -> None:
        with contextlib.suppress(OSError):
            for _ in range(10_000_000):  # bounded: until EOF
                data = await src.read(65536)
                if not data:
                    break
                up = self._up
                if up is not None and up[0] in data:
                    self._up = None
                    await asyncio.sleep(up[1])
                    reply_delay[0] = up[2]
                    dst.write(data)
                    await dst.drain()
                    self.up_held.set()
                    continue
                dst.write(data)
                await dst.drain()
            with contextlib.suppress(OSError):
                dst.write_eof()

    async def _downstream(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, reply_delay: list[float]
    ) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            for _ in range(10_000_000):  # bounded: until EOF
                data = await src.read(65536)
                if not data:
                    return
                if reply_delay[0]:
                    delay, reply_delay[0] = reply_delay[0], 0.0
                    await asyncio.sleep(delay)
                down = self._down
                if down is not None and down[0] in data:
                    self._down = None
                    await asyncio.sleep(down[1])
                    dst.write(data)
                    await dst.drain()
                    self.down_held.set()
                    continue
                dst.write(data)
                await dst.drain()


async def _trusting(proxy: ProxyHandle) -> None:
    invalidation = proxy.state.invalidation
    await wait_for_condition(
        lambda: invalidation.state == "connected" and invalidation.trusted(),
        timeout=20,
        message="replica subscribed and holding its lease",
    )


def _purged_copy(response: Fetched) -> bool:
    return response.body == OLD


async def _none_serves_the_purged_copy(
    origin: Origin, proxies: Sequence[ProxyHandle], answered: object
) -> None:
    """The origin has a new copy now: none of ``proxies`` may answer with the purged one."""
    origin.set("/k", headers=CACHEABLE, body=NEW)
    for proxy in proxies:
        after = await proxy.get("/k")
        assert not _purged_copy(after), (
            f"served the purged copy after PURGE answered {answered!r}: {after}"
        )


async def _l2_has(redis_client: Any, origin: Origin, path: str, timeout: float = 5.0) -> None:
    name = redis_key(path, origin.url)
    await wait_for_condition(
        lambda: bool(redis_client.exists(name)), timeout=timeout, message=f"{path} in L2"
    )


async def test_a_lookup_while_an_overtaken_l2_write_is_being_undone_does_not_refill_l1(
    origin: Origin,
    make_proxy: MakeProxy,
    redis_server: RedisServer,
    redis_url: str,
    redis_client: Any,
) -> None:
    """One replica, L1 + L2. A backfill write into L2 overtaken by a PURGE lands after the
    purge removed the key from L2 (and L1), and is undone once its reply is back. A lookup in
    between finds it in L2 (and may answer with it: the PURGE has not answered yet) but does
    not write it into L1: the purge is held until the undo. After the 200 the copy is gone.
    (Before: the purge's closing generation bump came before that wait, so the lookup stored
    the copy in L1 under the new generation, and L1 served it until its TTL.)"""
    link = await HoldingLink(redis_server.port).start()
    try:
        origin.set_default(headers=CACHEABLE)
        origin.set("/k", headers=CACHEABLE, body=OLD)
        a = await make_proxy(
            PURGE_TOKEN=TOKEN, SQLITE_PATH="off", REDIS_URL=link.url, L2_WRITE_TIMEOUT=4.0
        )
        await _trusting(a)
        assert (await a.get("/warm")).status == 200  # loads the L2 write script
        await a.settle()

        link.hold_up(OLD, before=0.5, reply=1.5)  # the write lands late; its reply later
        first = await a.get("/k")
        assert first.x_cache == "MISS" and first.body == OLD, first
        purge = asyncio.create_task(a.request("PURGE", "/k", headers=AUTH))
        await asyncio.wait_for(link.up_held.wait(), 5)  # the overtaken write has landed
        await _l2_has(redis_client, origin, "/k")
        during = await a.get("/k")  # the PURGE has not answered yet: any answer is fine
        assert during.status == 200, during
        answered = await asyncio.wait_for(purge, 15)
        assert answered.status == 200, answered
        assert not redis_client.exists(redis_key("/k", origin.url)), "the undo did not happen"

        await _none_serves_the_purged_copy(origin, [a], answered.body)
    finally:
        await link.close()


async def test_a_replica_s_late_l2_write_is_purged_again_and_no_l1_keeps_it(
    origin: Origin,
    make_proxy: MakeProxy,
    redis_server: RedisServer,
    redis_url: str,
    redis_client: Any,
) -> None:
    """Two replicas. B's backfill into L2 lands after A's PURGE removed the key from L2 but
    before B hears of the purge (its pub/sub delivery is slow): B's write completes. A waits
    for B's acknowledgement, then purges L2 once more - for exactly this write. A's own lookup
    meanwhile finds B's copy in L2 but stores it nowhere (A holds the purge until that second
    L2 purge), and a second round purges the other replicas' L1 again. After the 200 A
    serves a new copy. (Before: A's lookup stored B's copy in A's L1, which nothing purged
    again, and A served it after its PURGE answered.)"""
    link = await HoldingLink(redis_server.port).start()
    try:
        origin.set_default(headers=CACHEABLE)
        origin.set("/k", headers=CACHEABLE, body=OLD)
        a = await make_proxy(PURGE_TOKEN=TOKEN, SQLITE_PATH="off", L2_WRITE_TIMEOUT=2.0)
        b = await make_proxy(
            PURGE_TOKEN=TOKEN, SQLITE_PATH="off", REDIS_URL=link.url, L2_WRITE_TIMEOUT=2.0
        )
        await _trusting(a)
        await _trusting(b)
        assert (await b.get("/warm")).status == 200  # loads the L2 write script
        await b.settle()

        link.hold_up(OLD, before=0.4)  # B's L2 write of the old copy reaches Redis late
        link.hold_down(b'"keys": ["/k"]', before=1.5)  # ...and the purge reaches B late
        first = await b.get("/k")
        assert first.x_cache == "MISS" and first.body == OLD, first
        purge = asyncio.create_task(a.request("PURGE", "/k", headers=AUTH))
        await asyncio.wait_for(link.up_held.wait(), 5)
        await _l2_has(redis_client, origin, "/k")
        during = await a.get("/k")  # the PURGE has not answered yet: any answer is fine
        assert during.status == 200, during
        answered = await asyncio.wait_for(purge, 15)
        body = json.loads(answered.body)
        assert answered.status == 200 and body["replicas_acked"] == 2, body
        assert not redis_client.exists(redis_key("/k", origin.url)), "L2 was not purged again"

        await _none_serves_the_purged_copy(origin, [a], body)
    finally:
        await link.close()


async def test_an_l2_write_that_timed_out_and_arrives_after_its_undo_is_refused(
    origin: Origin,
    make_proxy: MakeProxy,
    redis_server: RedisServer,
    redis_url: str,
    redis_client: Any,
) -> None:
    """One replica. A backfill's L2 write times out on its connection (the link is slow for
    that one connection) while a PURGE of its key runs; the writer undoes it on another
    connection, so nothing orders the undo with the write: the undo runs first and the PURGE
    answers 200 before the write reaches Redis. The undo withdrew the write (its marker), so
    Redis refuses it when it arrives, and no replica finds the purged copy. (Before: the undo
    was a plain DEL, and the late SET left the purged copy in L2 for its whole TTL, served to
    every replica.)"""
    link = await HoldingLink(redis_server.port).start()
    try:
        origin.set_default(headers=CACHEABLE)
        origin.set("/k", headers=CACHEABLE, body=OLD)
        a = await make_proxy(
            PURGE_TOKEN=TOKEN, SQLITE_PATH="off", REDIS_URL=link.url, L2_WRITE_TIMEOUT=0.5
        )
        await _trusting(a)
        assert (await a.get("/warm")).status == 200  # loads the L2 write script
        await a.settle()

        link.hold_up(OLD, before=1.5)  # past the 0.5 s write timeout
        first = await a.get("/k")
        assert first.x_cache == "MISS" and first.body == OLD, first
        started = time.monotonic()
        answered = await a.request("PURGE", "/k", headers=AUTH)
        assert answered.status == 200, answered
        assert time.monotonic() - started < 1.5
        await asyncio.wait_for(link.up_held.wait(), 5)  # the timed-out SET arrives now
        await asyncio.sleep(0.2)
        assert not redis_client.exists(redis_key("/k", origin.url)), "the late SET landed"

        other = await make_proxy(PURGE_TOKEN=TOKEN, SQLITE_PATH="off")  # another replica
        await _trusting(other)
        await _none_serves_the_purged_copy(origin, [a, other], answered.body)
    finally:
        await link.close()


async def test_a_timed_out_l2_write_is_withdrawn_before_its_replica_hears_of_a_purge(
    origin: Origin,
    make_proxy: MakeProxy,
    redis_server: RedisServer,
    redis_url: str,
    redis_client: Any,
) -> None:
    """Two replicas. B's L2 write times out before anyone purges its key, and reaches Redis
    only after A's whole PURGE (both rounds, B's acknowledgements, the second L2 purge) is
    over - so no purge overtook it on B, and nothing would undo it. B withdrew it when it
    timed out, so Redis refuses it when it arrives. (Before: it landed and stayed in L2 for
    its whole TTL, served to every replica after the PURGE answered.)"""
    link = await HoldingLink(redis_server.port).start()
    try:
        origin.set_default(headers=CACHEABLE)
        origin.set("/k", headers=CACHEABLE, body=OLD)
        a = await make_proxy(PURGE_TOKEN=TOKEN, SQLITE_PATH="off", L2_WRITE_TIMEOUT=0.5)
        b = await make_proxy(
            PURGE_TOKEN=TOKEN, SQLITE_PATH="off", REDIS_URL=link.url, L2_WRITE_TIMEOUT=0.5
        )
        await _trusting(a)
        await _trusting(b)
        assert (await b.get("/warm")).status == 200  # loads the L2 write script
        await b.settle()

        link.hold_up(OLD, before=2.5)  # far past B's 0.5 s write timeout, and A's PURGE
        first = await b.get("/k")
        assert first.x_cache == "MISS" and first.body == OLD, first
        await b.settle()  # B's write has timed out (and was withdrawn)
        assert not link.up_held.is_set()
        answered = await a.request("PURGE", "/k", headers=AUTH)
        body = json.loads(answered.body)
        assert answered.status == 200 and body["replicas_acked"] == 2, body
        assert not link.up_held.is_set(), "the write arrived before the PURGE answered"
        await asyncio.wait_for(link.up_held.wait(), 5)  # it arrives now
        await asyncio.sleep(0.2)
        assert not redis_client.exists(redis_key("/k", origin.url)), "the late SET landed"

        await _none_serves_the_purged_copy(origin, [a, b], body)
    finally:
        await link.close()
