"""What parsing a read of many Redis replies costs the pipelined L2 reader, in-process.

    python -m loadtest.redis_reply_bench [--repeat 5]

A busy proxy gets the replies of a whole batch of GETs in one read. hiredis moves what is left
of its buffer down after every reply it parses (once 1 KiB of it is consumed), so feeding
it the read at once costs time quadratic in the number of replies; the reader
(``tierproxy.tiers.redis_reads``) feeds it a slice at a time. Prints µs per reply for both
ways, for batches of 1.3 KB replies (a 1 KiB entry) and of 64 KiB ones.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time

import hiredis

from tierproxy.tiers import redis_reads


def _replies(count: int, size: int) -> bytes:
    value = b"x" * size
    return (b"$%d\r\n%s\r\n" % (size, value)) * count


def _sliced_us(data: bytes, count: int, repeat: int) -> float:
    """The reader's own parsing (``_Protocol.data_received``), µs per reply."""
    loop = asyncio.new_event_loop()
    try:
        protocol = redis_reads._Protocol()
        best = float("inf")
        for _ in range(repeat):
            futures = [loop.create_future() for _ in range(count)]
            protocol.waiting = collections.deque((future, 0.0) for future in futures)
            started = time.perf_counter()
            protocol.data_received(data)
            best = min(best, time.perf_counter() - started)
            assert all(future.done() for future in futures)
        return best / count * 1e6
    finally:
        loop.close()


def _whole_us(data: bytes, count: int, repeat: int) -> float:
    """One feed of the whole read, then every reply taken (the reader before slicing)."""
    best = float("inf")
    for _ in range(repeat):
        reader = hiredis.Reader()
        started = time.perf_counter()
        reader.feed(data)
        taken = 0
        while reader.gets() is not False:
            taken += 1
        best = min(best, time.perf_counter() - started)
        assert taken == count
    return best / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"hiredis {hiredis.__version__}; µs per reply, best of {args.repeat}")
    for count, size in ((32, 1300), (256, 1300), (1024, 1300), (32, 65536)):
        data = _replies(count, size)
        whole = _whole_us(data, count, args.repeat)
        sliced = _sliced_us(data, count, args.repeat)
        print(
            f"{count:>5} replies of {size:>6} B in one read: "
            f"one feed {whole:7.2f} µs   sliced {sliced:7.2f} µs"
        )


if __name__ == "__main__":
    main()
