"""A small real filesystem for disk-full tests: a tmpfs of a few MiB (needs root).

``small_disk(dir, size)`` mounts it and unmounts it afterwards; ``fill(dir)`` writes a filler
file until the filesystem is full (ENOSPC) and returns its path, so deleting it frees the
space again. Tests skip when mounting is not possible (not root, no mount permission).
"""

from __future__ import annotations

import contextlib
import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["fill", "small_disk"]


@contextlib.contextmanager
def small_disk(directory: Path, size_bytes: int) -> Iterator[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(directory)],
        capture_output=True,
        timeout=10,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for a disk-full test: {result.stderr!r}")
    try:
        yield directory
    finally:
        for _ in range(50):  # the proxy may still hold the file for a moment: bounded retries
            if (
                subprocess.run(
                    ["umount", "-l", str(directory)], capture_output=True, timeout=10, check=False
                ).returncode
                == 0
            ):
                break


def fill(directory: Path, name: str = "filler") -> Path:
    """Write into ``directory/name`` until the filesystem is full (bounded: 1 GiB)."""
    path = directory / name
    with open(path, "ab", buffering=0) as out:
        for size in (65_536, 4_096, 512, 1):  # down to the last byte the filesystem takes
            chunk = b"\0" * size
            for _ in range(16_384):
                try:
                    out.write(chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return path
