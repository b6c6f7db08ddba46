"""The new-connection benchmark (loadtest/newconn.py), run small: one build against itself.

It must finish with a table and newconn.json holding every round, each build's proxy CPU per
connection a positive number (each connection's answer was checked to be an L1 hit)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_one_build_against_itself_reports_cpu_per_connection(tmp_path: Path) -> None:
    command = f"{sys.executable} -m tierproxy serve"
    out = tmp_path / "newconn"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.newconn", "--a", command, "--b", command]
        + ["--connections", "200", "--rounds", "2", "--out", str(out)],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "| A |" in done.stdout and "| B |" in done.stdout
    result = json.loads((out / "newconn.json").read_text())
    for label in ("A", "B"):
        assert len(result["rounds"][label]) == 2
        row = result["summary"][label]
        assert row["cpu_us_per_connection"] > 0 and row["connections_per_s"] > 0, row
