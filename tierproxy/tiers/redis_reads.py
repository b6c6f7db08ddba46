"""L2 lookups on one pipelined Redis connection: every concurrent GET shares it.

redis-py takes a pooled connection per command and gives it back afterwards (~110 us of CPU a
GET here, most of an L2 hit's cost besides the HTTP work). Redis answers the commands of one
connection in the order they were sent (RESP), so lookups need no pool: each GET is written to
one connection and waits on a future in a FIFO; replies, parsed by hiredis, resolve the futures
in order (~15 us a GET). The GETs started in one loop iteration are written together, in one
send, on the next: Redis reads them in one go and answers them in one reply write. GETs of
one key started in that iteration share one command (they would have gone one after another
in that same write, and Redis would have answered them alike): a hot key's concurrent hits cost
Redis, the socket and the reply parser one GET, each caller still with its own future. Writes,
scripts, purges and pub/sub stay on redis-py.

Why this keeps the tier budget (a redis-py command cancelled between send and read once left
its reply for the next caller: redis/redis-py#2665, CVE-2023-28858/28859):

* A GET that times out or is cancelled keeps its place in the FIFO; its reply, when it comes,
  is dropped. A late reply can never reach the next caller - the hazard that makes redis-py
  drop a connection whose command was cancelled.
* A connection whose oldest unanswered GET is older than ``stale_after`` (a frozen or
  unreachable Redis) is aborted: every waiter fails at once and the next GET reconnects.
* At most ``max_pending`` commands wait on the connection; beyond that a GET that would be a
  new command fails at once (the tier's breaker then stops sending), so a stalled Redis
  cannot make the queue grow unbounded. (GETs sharing one command are as many futures on
  it, bounded by the requests in flight.)
* Connecting (and AUTH/SELECT) happens once for all waiters, under ``connect_timeout``.
  A connection lost before a waiter resumed (Redis at ``maxclients`` accepts, writes an
  error and closes) fails that waiter's command at once; one that completes after
  ``close()`` is closed, not kept.
* Replies stay aligned with commands: hiredis is given a "not yet" value of our own (its
  default, False, is also a RESP3 boolean), and a reply that GET, PING, AUTH and SELECT never
  give on a RESP2 connection (a push, a boolean, an integer: a server or proxy that is not
  plain Redis) drops the connection rather than be handed to a waiter.

Only ``redis://`` and ``unix://`` URLs are read this way; for ``rediss://`` (TLS, with its
certificate options) :func:`for_url` returns None and lookups stay on redis-py, as they do
under Sentinel (the master moves) and on Redis Cluster (keys live on several nodes): the tier
does not build a reader for those (tierproxy.tiers.redis).
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, cast

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url

__all__ = ["PipelinedReader", "ReadChannelError", "for_url", "get_command"]

_MAX_PENDING = 4096
# Bytes of a read fed to the reply parser at a time (see _Protocol.data_received).
_FEED_BYTES = 16384


_NOT_YET = object()  # hiredis.Reader.gets(): no complete reply in the buffer yet


class ReadChannelError(ConnectionError):
    """The pipelined connection failed or refused the GET (it is a miss, counted as an error)."""


def _command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def get_command(key: bytes) -> bytes:
    """The RESP encoding of ``GET key``."""
    return _command(b"GET", key)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        # "No complete reply yet" is a sentinel of our own: hiredis's default (False) is also
        # how it returns a RESP3 boolean, which would shift every later reply by one.
        self.reader = hiredis.Reader(notEnoughData=_NOT_YET)
        # (futures, monotonic time sent), a command each: answered strictly in order, the
        # reply going to each of its futures (GETs of one key share one command: send).
        self.waiting: collections.deque[tuple[list[asyncio.Future[Any]], float]] = (
            collections.deque()
        )
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lost = False
        # Commands sent in this loop iteration, written together by _flush (one send for all
        # the lookups started together, not one each: Redis then reads them in one go too).
        self.outgoing: list[bytes] = []
        # The futures of the GETs among them, by command: a GET of the same key joins them.
        self.joinable: dict[bytes, list[asyncio.Future[Any]]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass, so no isinstance).
        self.transport = cast(asyncio.Transport, transport)
        # Kept: asking for the running loop per GET costs a system call on Python 3.11.
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        # Fed a slice at a time: hiredis moves what is left of its buffer down after every
        # reply it parses (once 1 KiB is consumed), so one feed of many replies costs time
        # quadratic in their number (1,024 replies of 1.3 KB: 10 us each, against 0.3 fed
        # by slices; 32 of 64 KiB: 27 against 6 - python -m loadtest.redis_reply_bench).
        reader = self.reader
        size = len(data)
        offset = 0
        while offset < size:
            step = min(_FEED_BYTES, size - offset)
            reader.feed(data, offset, step)
            offset += step
            if not self._take_replies(reader):
                return

    def _take_replies(self, reader: hiredis.Reader) -> bool:
        """Hand the complete replies in ``reader`` to their waiters, in order; False when
        the connection was aborted (a malformed or unasked-for reply)."""
        waiting = self.waiting
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.abort(ReadChannelError(f"Redis sent a malformed reply: {exc}"))
                return False
            if reply is _NOT_YET:
                return True
            if not waiting:
                self.abort(ReadChannelError("Redis sent a reply nothing asked for"))
                return False
            if not (reply is None or isinstance(reply, (bytes, hiredis.ReplyError))):
                # GET, PING, AUTH and SELECT answer a string, nil or an error on a RESP2
                # connection; anything else (a RESP3 push or boolean from something that is
                # not plain Redis) means replies and commands may no longer line up.
                self.abort(ReadChannelError(f"Redis sent an unexpected {type(reply).__name__}"))
                return False
            futures, _ = waiting.popleft()
            error = str(reply) if isinstance(reply, hiredis.ReplyError) else None
            for future in futures:
                if future.done():  # its caller gave up (timeout, cancellation): dropped
                    continue
                if error is not None:
                    future.set_exception(ReadChannelError(f"Redis error: {error}"))
                else:
                    future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail_all(ReadChannelError(f"Redis connection lost: {exc or 'closed'}"))

    def abort(self, exc: ReadChannelError) -> None:
        self.lost = True
        self._fail_all(exc)
        if self.transport is not None:
            self.transport.abort()

    def _fail_all(self, exc: ReadChannelError) -> None:
        self.joinable.clear()
        while self.waiting:
            futures, _ = self.waiting.popleft()
            for future in futures:
                if not future.done():
                    future.set_exception(exc)

    def send(self, payload: bytes, *, join: bool = False) -> asyncio.Future[Any]:
        """The future of ``payload``'s reply, the command written on the next loop step.
        ``join``: a read (GET) that may share the command of an identical one not yet written
        (Redis answers both alike) - never a command with an effect."""
        if self.lost:
            # (lost between its attempt's end and this caller resuming: Redis at maxclients
            # accepts, writes an error and closes. Nothing would answer a command now.)
            raise ReadChannelError("Redis connection lost; reconnecting on the next read")
        loop = self.loop
        assert self.transport is not None and loop is not None
        future = loop.create_future()
        if join:
            joined = self.joinable.get(payload)
            if joined is not None:
                joined.append(future)
                return future
        futures = [future]
        self.waiting.append((futures, time.monotonic()))
        if join:
            self.joinable[payload] = futures
        outgoing = self.outgoing
        if not outgoing:
            loop.call_soon(self._flush)
        outgoing.append(payload)
        return future

    def _flush(self) -> None:
        outgoing, self.outgoing = self.outgoing, []
        self.joinable.clear()
        transport = self.transport
        if self.lost or transport is None or transport.is_closing():
            return  # their futures failed with the connection (connection_lost, abort)
        transport.write(b"".join(outgoing))


class PipelinedReader:
    """GETs over one pipelined connection to the Redis at ``url`` (see the module docstring)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        path: str | None,
        db: int,
        username: str | None,
        password: str | None,
        connect_timeout: float,
        stale_after: float,
        max_pending: int = _MAX_PENDING,
    ) -> None:
        self._host = host
        self._port = port
        self._path = path
        self._handshake: list[bytes] = []
        if password is not None:
            self._handshake.append(
                _command(b"AUTH", *((username.encode(),) if username else ()), password.encode())
            )
        if db:
            self._handshake.append(_command(b"SELECT", str(db).encode()))
        self._connect_timeout = connect_timeout
        self._stale_after = stale_after
        self._max_pending = max_pending
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._closed = False

    async def get(self, key: bytes) -> bytes | None:
        value = await self._send(get_command(key), join=True)
        return value if isinstance(value, bytes) else None

    @property
    def connected(self) -> bool:
        """Whether a GET can be sent now, with no connecting to wait for (:meth:`get_soon`)."""
        protocol = self._protocol
        return protocol is not None and not protocol.lost

    def get_soon(self, key: bytes) -> asyncio.Future[Any]:
        """A GET sent now on the connection (:attr:`connected` must be true): a future of the
        reply (the value, or None). Cancelling it drops the reply when it comes."""
        return self.send_get_soon(get_command(key))

    def send_get_soon(self, command: bytes) -> asyncio.Future[Any]:
        """:meth:`get_soon` for a GET already encoded (:func:`get_command`): a caller that
        asks for the same keys again keeps their commands rather than encode them anew."""
        protocol = self._protocol
        if protocol is None or protocol.lost:
            # (lost since ``connected`` was asked: a variant's read after its index's reply)
            raise ReadChannelError("Redis connection lost; reconnecting on the next read")
        return self._queue(protocol, command, join=True)

    async def ping(self) -> bool:
        """Connect now if not connected (start-up), and check that Redis answers.

        A connection that looks stale is replaced first, not failed on: right after a thaw
        its old commands' replies can still be unread in the socket, and a health probe that
        failed on them would keep the tier's breaker open for another backoff window."""
        protocol = self._protocol
        if protocol is not None and not protocol.lost and self._stale(protocol):
            protocol.abort(ReadChannelError("stale Redis connection replaced by a probe"))
        return bool(await self._send(_command(b"PING")) == b"PONG")

    async def _send(self, payload: bytes, *, join: bool = False) -> Any:
        protocol = self._protocol
        if protocol is None or protocol.lost:
            protocol = await self._connected()
        return await self._queue(protocol, payload, join=join)

    def _queue(self, protocol: _Protocol, payload: bytes, *, join: bool) -> asyncio.Future[Any]:
        """``payload`` sent on ``protocol`` (:meth:`_Protocol.send`), unless it would be a new
        command that :meth:`_check_waiting` refuses; a GET that joins one adds no command."""
        if not (join and payload in protocol.joinable):
            self._check_waiting(protocol)
        return protocol.send(payload, join=join)

    def _check_waiting(self, protocol: _Protocol) -> None:
        """Refuse a command (ReadChannelError) when too many wait, or when the oldest has
        waited past ``stale_after`` (the connection is then dropped)."""
        waiting = protocol.waiting
        if waiting:
            if len(waiting) >= self._max_pending:
                raise ReadChannelError(f"{len(waiting)} Redis reads already waiting")
            if self._stale(protocol):
                protocol.abort(
                    ReadChannelError(
                        f"no Redis reply for {self._stale_after:g}s: connection dropped"
                    )
                )
                raise ReadChannelError("Redis stopped answering; reconnecting on the next read")

    def _stale(self, protocol: _Protocol) -> bool:
        waiting = protocol.waiting
        return bool(waiting) and time.monotonic() - waiting[0][1] > self._stale_after

    async def _connected(self) -> _Protocol:
        if self._closed:
            raise ReadChannelError("L2 reader is closed")
        if self._connecting is None:
            # One connection attempt for every concurrent caller; it outlives any one of them.
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connect_done)
        attempt = self._connecting
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if attempt.cancelled() and (task is None or not task.cancelling()):
                raise ReadChannelError("L2 reader closed while connecting") from None
            raise

    def _connect_done(self, attempt: asyncio.Future[_Protocol]) -> None:
        self._connecting = None
        if not attempt.cancelled() and attempt.exception() is None:
            protocol = attempt.result()
            if self._closed:
                # close() came after the attempt ended but before this callback: cancelling
                # the attempt did nothing, so the connection is closed here.
                protocol.abort(ReadChannelError("L2 reader closed"))
            else:
                self._protocol = protocol

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._path is not None:
                    _, protocol = await loop.create_unix_connection(_Protocol, self._path)
                else:
                    _, protocol = await loop.create_connection(_Protocol, self._host, self._port)
                try:
                    for command in self._handshake:
                        await protocol.send(command)
                except BaseException:
                    protocol.abort(ReadChannelError("Redis handshake failed"))
                    raise
        except TimeoutError:
            raise ReadChannelError(
                f"connecting to Redis took over {self._connect_timeout:g}s"
            ) from None
        except OSError as exc:
            raise ReadChannelError(f"cannot connect to Redis: {exc}") from None
        return protocol

    @property
    def pending(self) -> int:
        """Commands waiting for a reply (including abandoned ones whose reply is still due;
        GETs of one key sent together are one command)."""
        return len(self._protocol.waiting) if self._protocol is not None else 0

    async def close(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.abort(ReadChannelError("L2 reader closed"))
        self._protocol = None


def for_url(
    url: str, *, connect_timeout: float, stale_after: float, password: str | None = None
) -> PipelinedReader | None:
    """A reader for ``url``; None for TLS (``rediss://``), which stays on redis-py.
    ``password``: when the URL has none (TIERPROXY_REDIS_PASSWORD)."""
    options = parse_url(url)
    if options.get("connection_class") is SSLConnection:
        return None
    return PipelinedReader(
        host=str(options.get("host", "localhost")),
        port=int(options.get("port", 6379)),
        path=options.get("path"),
        db=int(options.get("db", 0) or 0),
        username=options.get("username"),
        password=options.get("password") or password,
        connect_timeout=connect_timeout,
        stale_after=stale_after,
    )
