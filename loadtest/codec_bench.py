"""What encoding and decoding one shared-tier (L2/L3) entry costs, in-process (no I/O).

    python -m loadtest.codec_bench [--number 20000] [--repeat 7]

Prints µs per ``codec.decode`` and ``codec.encode`` (best of ``--repeat`` runs of ``--number``
calls each) for a typical entry (7 stored headers, 1 KiB body) and a 64 KiB one. A decode is
what every L2/L3 hit pays on top of the lookup itself.
"""

from __future__ import annotations

import argparse
import timeit
from functools import partial

from tierproxy import codec
from tierproxy.entry import Entry

_HEADERS = (
    ("Content-Type", "text/html; charset=utf-8"),
    ("Cache-Control", "public, max-age=600"),
    ("Date", "Thu, 03 Dec 2026 15:00:00 GMT"),
    ("Last-Modified", "Wed, 02 Dec 2026 10:00:00 GMT"),
    ("ETag", '"5f3a-1b2c3d4e"'),
    ("Server", "origin/1.0"),
    ("Vary", "Accept-Encoding"),
)


def sample(body_bytes: int) -> Entry:
    """An entry as the proxy stores a typical origin answer."""
    return Entry(
        key="http://origin.example:8080/articles/42?page=2",
        status=200,
        headers=_HEADERS,
        body=b"x" * body_bytes,
        stored_at=1_764_770_400.0,
        fresh_until=1_764_771_000.0,
        stale_until=1_764_771_600.0,
        swr_until=1_764_771_060.0,
        expires_at=1_764_857_400.0,
        etag='"5f3a-1b2c3d4e"',
        last_modified="Wed, 02 Dec 2026 10:00:00 GMT",
        vary=(("accept-encoding", "gzip"),),
        tags=("articles", "article-42"),
    )


def per_call_us(stmt: timeit.Timer, number: int, repeat: int) -> float:
    return min(stmt.repeat(repeat=repeat, number=number)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print(f"codec format {codec.FORMAT_VERSION}")
    for label, size in (("1 KiB, 7 headers", 1024), ("64 KiB, 7 headers", 64 * 1024)):
        entry = sample(size)
        data = codec.encode(entry)
        assert codec.decode(data, entry.key) == entry
        number = args.number if size <= 1024 else max(1, args.number // 10)
        decode = per_call_us(
            timeit.Timer(partial(codec.decode, data, entry.key)), number, args.repeat
        )
        encode = per_call_us(timeit.Timer(partial(codec.encode, entry)), number, args.repeat)
        print(
            f"{label:>18}: record {len(data):>6} B  decode {decode:6.2f} µs  "
            f"encode {encode:6.2f} µs"
        )


if __name__ == "__main__":
    main()
