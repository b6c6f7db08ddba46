"""The scale-out measurement (loadtest/scale.py): one worker against two, each serving process
held to a CPU budget by a cgroup quota.

A budget that is not enforced would make the run measure the load generator instead of the
workers, so the quota is checked on its own: a busy process put in a quarter-core budget
must use about a quarter of a core, with the cgroup reporting throttled periods, and the
group must be gone afterwards. The tool itself runs small on L1 hits; its verdict must be
able to fail (an impossible goal exits 1 with FAIL), every round must be recorded, each
budget must have been used up, and no cgroup may be left behind. Where no cgroup can be
written (not root), the run goes without budgets and the quota test is skipped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest import scale
from loadtest.procs import StartupError, cpu_seconds

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


def _cgroups_writable() -> bool:
    try:
        scale._cgroup_root()
    except (StartupError, OSError):
        return False
    return True


def _leftover_groups() -> list[Path]:
    try:
        _, root = scale._cgroup_root()
    except (StartupError, OSError):
        return []
    return sorted(root.glob("tierproxy-scale-*"))


def test_a_budget_holds_a_busy_process_to_its_share_of_a_core() -> None:
    if not _cgroups_writable():
        pytest.skip("no writable cgroup CPU controller (not root)")
    busy = subprocess.Popen(  # spins for at most 20 s, then exits by itself
        [
            sys.executable,
            "-c",
            "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 20: pass",
        ]
    )
    budget = scale.CpuBudget(f"tierproxy-scale-test-{busy.pid}", 0.25)
    try:
        budget.add(busy.pid)
        time.sleep(0.3)  # settle into the group
        c0, s0, t0 = cpu_seconds(busy.pid), budget.stat(), time.monotonic()
        time.sleep(2.0)
        c1, s1, t1 = cpu_seconds(busy.pid), budget.stat(), time.monotonic()
        assert c0 is not None and c1 is not None
        used = (c1 - c0) / (t1 - t0)
        assert 0.15 < used < 0.35, used  # a quarter of a core, with a clock tick's slack
        periods = s1["nr_periods"] - s0["nr_periods"]
        assert periods > 50, (s0, s1)  # 20 ms periods over 2 s
        assert s1["nr_throttled"] - s0["nr_throttled"] > periods // 2, (s0, s1)
        assert s1["throttled_usec"] > s0["throttled_usec"]
    finally:
        busy.kill()
        busy.wait()
        budget.remove()
    assert not budget.path.exists()


def test_one_worker_against_two_records_rounds_and_a_verdict_that_can_fail(
    tmp_path: Path,
) -> None:
    if not shutil.which("wrk") or not shutil.which("taskset"):
        pytest.skip("wrk or taskset not installed")
    budgets = _cgroups_writable()
    out = tmp_path / "scale"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.scale", "--targets", "l1", "--workers", "1,2"]
        + ["--rounds", "2", "--duration", "1", "--expect", "100", "--out", str(out)]
        + ["--cpu-per-worker", "0.4" if budgets else "0"],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]  # 100 x: FAIL
    assert "| l1 | 1 → 2 |" in done.stdout and "FAIL" in done.stdout
    result = json.loads((out / "scale.json").read_text())
    assert len(result["rounds"]["l1:1"]) == len(result["rounds"]["l1:2"]) == 2
    row = result["summary"]["l1:2"]
    assert row["pass"] is False and row["goal"] == 100
    assert row["ratio"] > 0 and row["non_2xx"] == 0 and row["hit_share"] == 1.0
    assert (out / "raw" / "l1-2w-round2.txt").read_text().count("Requests/sec") == 1
    for r in result["rounds"]["l1:2"]:
        assert len(r["cores"]) == 2  # both workers' CPU, each measured
    if budgets:
        # Each budget was the limit: 0.4 of a core at most (with a tick's slack), and the quota
        # ran out in most periods under wrk.
        for key in ("l1:1", "l1:2"):
            for r in result["rounds"][key]:
                assert all(c is not None and c < 0.5 for c in r["cores"]), r
                assert all(t > 0.5 for t in r["throttled"]), r
        assert "held to 0.4 of a core" in done.stdout
    assert _leftover_groups() == []
    # The same rounds against a goal they meet: PASS.
    met = scale.summarise(result["rounds"], ["l1"], [1, 2], 0.01)
    assert met["l1:2"]["pass"] is True and met["l1:2"]["goal"] == 0.01
    # Rounds in which a worker seldom used its quota up did not compare budgets: no verdict.
    loose = {
        k: [{**r, "throttled": [0.5] * len(r["cores"])} for r in v]
        for k, v in result["rounds"].items()
    }
    assert scale.summarise(loose, ["l1"], [1, 2], 0.01)["l1:2"]["pass"] is None
    assert scale.summarise(loose, ["l1"], [1, 2], 0.01, budgets=False)["l1:2"]["pass"] is True
