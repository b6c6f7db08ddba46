"""The before/after tool (loadtest/ab.py), run small on L1 hits: one build against itself,
and a copy of the package as the build before.

The run must finish with a table, a B/A ratio that is a number near 1 for the same code
(generous: CI machines are noisy), ab.json holding every round and where each build's code
came from. A few seconds each.
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


def _needs_wrk() -> None:
    if not shutil.which("wrk") or not shutil.which("taskset"):
        if os.environ.get("CI", "").strip().lower() == "true":  # .ci/run installs wrk
            pytest.fail("wrk or taskset missing; CI=true so this is a failure", pytrace=False)
        pytest.skip("wrk or taskset not installed")


def _ab(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m loadtest.ab ARGS`` on L1 hits, one-second rounds, run to its end."""
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.ab", *args]
        + ["--targets", "l1", "--duration", "1", "--out", str(out)],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def test_one_build_against_itself_gives_a_ratio_near_one(tmp_path: Path) -> None:
    _needs_wrk()
    command = f"{sys.executable} -m tierproxy serve"
    out = tmp_path / "ab"
    done = _ab(out, "--a", command, "--b", command, "--rounds", "2")
    assert "| l1 |" in done.stdout
    result = json.loads((out / "ab.json").read_text())
    assert len(result["rounds"]["A:l1"]) == len(result["rounds"]["B:l1"]) == 2
    assert 0.33 < result["summary"]["l1"]["b_over_a"] < 3.0
    # Where it was measured: a ratio to nginx differs from host to host (environment.py).
    host = result["environment"]["host_costs"]
    assert host["syscall_us"] > 0 and host["file_hit_us"] > 0, result["environment"]
    assert "Host: " in done.stdout


def test_each_build_runs_its_own_code_and_the_run_says_which(tmp_path: Path) -> None:
    """Build A from another directory (``env PYTHONPATH=DIR python -m tierproxy serve``, as the
    docstring shows) must run DIR's code, not this checkout's: the proxies start in the
    repository, and ``python -m`` puts the working directory first on sys.path, which once
    made both "builds" this checkout's. ab.json records each build's code; a run whose two
    builds are the same code says so."""
    _needs_wrk()
    other = tmp_path / "before"
    shutil.copytree(REPO / "tierproxy", other / "tierproxy")
    out = tmp_path / "ab"
    command = f"env PYTHONPATH={other} {sys.executable} -m tierproxy serve"
    done = _ab(out, "--a", command, "--rounds", "1")
    code = json.loads((out / "ab.json").read_text())["code"]
    assert code == {"A": str(other / "tierproxy"), "B": str(REPO / "tierproxy")}
    assert "same code" not in done.stdout

    same = _ab(tmp_path / "aa", "--a", f"{sys.executable} -m tierproxy serve", "--rounds", "1")
    assert "A and B run the same code" in same.stdout
