"""CI smoke for the timeout benchmarks (loadtest/timeouts.py): one short round of each A/B.

Runs ``python -m loadtest.timeouts smoke`` (origin, Redis, the delay line in front of it and
``python -m tierproxy serve`` restarted per configuration, all on 127.0.0.1; about a minute):
hedging off vs on with Redis slowed, then a SIGSTOPped Redis with fixed vs adaptive L2
timeouts. The smoke judges only what does not depend on a quiet machine (hedges won, the L2
breaker opening and a probe closing it after SIGCONT, no errors), plus one expectation added
on the command line that no run can meet: the run must end with exactly that verdict FAILed
and exit code 1, so a FAIL reaches the exit code. Skipped without redis-server or matplotlib,
unless CI=true.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _need(ok: bool, reason: str) -> None:
    if not ok:
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(f"{reason}; CI=true so this is a failure, not a skip", pytrace=False)
        pytest.skip(reason)


def test_timeouts_smoke_runs_both_comparisons_and_fails_on_an_unmet_expectation(
    tmp_path: Path,
) -> None:
    _need(importlib.util.find_spec("matplotlib") is not None, "matplotlib not installed")
    _need(shutil.which("redis-server") is not None, "redis-server not installed")
    out = tmp_path / "timeouts"
    cmd = [sys.executable, "-m", "loadtest.timeouts", "smoke", "--out", str(out)]
    cmd += ["--expect", "hedges_won>=1000000000"]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    proc = subprocess.run(
        cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=220
    )
    logs = f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 1, logs
    assert "| **FAIL** | `hedges_won >= 1e+09` |" in proc.stdout, logs

    summary = json.loads((out / "summary.json").read_text())
    results = summary["results"]
    assert set(results) == {"hedge", "frozen"}, logs
    failed = [v["name"] for r in results.values() for v in r["verdicts"] if not v["ok"]]
    assert failed == ["hedges_won >= 1e+09"], (failed, logs)

    hedge = results["hedge"]
    assert hedge["metrics"]["errors"] == 0
    rounds = hedge["summary"]["rounds"]
    assert set(rounds) == {"hedge-off", "hedge-on"}
    for rows in rounds.values():
        assert len(rows) == 1 and rows[0]["n"] > 0 and rows[0]["p99_ms"] > 0, rows
    assert rounds["hedge-off"][0]["hedges_started"] == 0
    assert rounds["hedge-on"][0]["hedges_won"] > 0, rounds
    png = (out / "hedge.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000

    frozen = results["frozen"]["summary"]["rounds"]
    assert set(frozen) == {"fixed", "adaptive"}
    for name, rows in frozen.items():
        row = rows[0]
        assert row["breaker_opened_after_s"] is not None, (name, row)
        assert row["breaker_closed_after_thaw_s"] is not None, (name, row)
        assert row["n"] > 0 and row["whole_freeze"]["errors"] == 0, (name, row)
    assert frozen["fixed"][0]["learned_l2_timeout_ms"] == 100.0  # the configured timeout
    assert summary["environment"]["git"], summary["environment"]
