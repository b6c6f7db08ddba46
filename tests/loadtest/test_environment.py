"""What a result records of the host it was measured on (loadtest/environment.py).

The L1 hit path's ratio to nginx measured 0.57 on one host and 0.85 on another of the same
kind, the code unchanged, and 0.63 on the second an hour later (README, Performance). nginx's
proxy_cache opens and reads a file for every hit, and tierproxy's L1/L2 hits read none, so
the host's price of a system call moves one side more. Every bench and A/B result therefore
records the CPU and that price, measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from loadtest import environment

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


def _cpuinfo_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("model name", "Model", "Hardware") and value.strip():
            return value.strip()
    pytest.skip("/proc/cpuinfo names no model")


def test_the_record_names_the_cpu_and_what_the_host_charges_for_a_hit() -> None:
    record = environment.collect(command=["test"])
    assert record["cpu_model"] == _cpuinfo_model()
    costs = record["host_costs"]
    # Four system calls and a 1 KiB copy cost more than one system call, and both are real
    # measurements: above nothing, below a millisecond.
    assert 0 < costs["syscall_us"] < costs["file_hit_us"] < 1000, costs

    line = environment.host_line(record)
    assert line.startswith("Host: CPU: " + _cpuinfo_model()), line
    assert f"{costs['syscall_us']:.2f} us" in line and f"{costs['file_hit_us']:.2f} us" in line
    assert environment.host_line({}) == ""  # an older result: no line, not a broken one
