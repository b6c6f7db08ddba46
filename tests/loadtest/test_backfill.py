"""The L1 backfill measurement (loadtest/backfill.py), run small: one key from SQLite.

``python -m loadtest.backfill`` seeds a key into L3 with one proxy (L1 off), then a second
proxy with L1 on serves it to concurrent clients; the run must show the key leaving L3 (a
first L1 hit, every answer a hit) and its verdicts must pass. About five seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_a_hot_key_moves_from_l3_to_l1_and_the_verdicts_pass(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.backfill",
            "--tiers",
            "l3",
            "--keys",
            "1",
            "--clients",
            "8",
            "--requests",
            "200",
            "--out",
            str(out),
        ],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "| l3: every answer a hit (no MISS, no error) | PASS |" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    (result,) = summary["results"]
    (key,) = result["keys"]
    assert key["responses"] == 200
    assert key["first_l1_ms"] is not None  # L1 got it
    assert 1 <= key["slow_tier_answers"] < 200  # L3 answered the first ones, then L1 took over
