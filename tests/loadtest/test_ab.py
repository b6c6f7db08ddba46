"""The before/after tool (loadtest/ab.py), run small: one build against itself, L1 hits.

Two proxies of the same build, one round each: the run must finish with a table, a B/A ratio
that is a number near 1 (the same code; generous: CI machines are noisy) and ab.json holding
every round. A few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_one_build_against_itself_gives_a_ratio_near_one(tmp_path: Path) -> None:
    if not shutil.which("wrk") or not shutil.which("taskset"):
        if os.environ.get("CI", "").strip().lower() == "true":  # .ci/run installs wrk
            pytest.fail("wrk or taskset missing; CI=true so this is a failure", pytrace=False)
        pytest.skip("wrk or taskset not installed")
    command = f"{sys.executable} -m tierproxy serve"
    out = tmp_path / "ab"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.ab", "--a", command, "--b", command]
        + ["--targets", "l1", "--rounds", "2", "--duration", "1", "--out", str(out)],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "| l1 |" in done.stdout
    result = json.loads((out / "ab.json").read_text())
    assert len(result["rounds"]["A:l1"]) == len(result["rounds"]["B:l1"]) == 2
    assert 0.33 < result["summary"]["l1"]["b_over_a"] < 3.0


def test_each_build_runs_its_own_code_and_the_run_says_which(tmp_path: Path) -> None:
    """Build A from another directory (``env PYTHONPATH=DIR python -m tierproxy serve``, as the
    docstring shows) must run DIR's code, not this checkout's: the proxies start in the
    repository, and ``python -m`` puts the working directory first on sys.path, which once
    made both "builds" this checkout's. ab.json records each build's code; a run whose two
    builds are the same code says so."""
    if not shutil.which("wrk") or not shutil.which("taskset"):
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail("wrk or taskset missing; CI=true so this is a failure", pytrace=False)
        pytest.skip("wrk or taskset not installed")
    other = tmp_path / "before"
    shutil.copytree(REPO / "tierproxy", other / "tierproxy")
    out = tmp_path / "ab"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.ab"]
        + ["--a", f"env PYTHONPATH={other} {sys.executable} -m tierproxy serve"]
        + ["--targets", "l1", "--rounds", "1", "--duration", "1", "--out", str(out)],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    code = json.loads((out / "ab.json").read_text())["code"]
    assert code == {"A": str(other / "tierproxy"), "B": str(REPO / "tierproxy")}
    assert "same code" not in done.stdout

    same = subprocess.run(
        [sys.executable, "-m", "loadtest.ab", "--a", f"{sys.executable} -m tierproxy serve"]
        + ["--targets", "l1", "--rounds", "1", "--duration", "1", "--out", str(tmp_path / "aa")],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert same.returncode == 0, same.stdout[-2000:] + same.stderr[-2000:]
    assert "A and B run the same code" in same.stdout
