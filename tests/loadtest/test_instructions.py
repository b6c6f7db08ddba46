"""The instruction-count tool (loadtest/instructions.py), run small on this checkout.

It must run the proxy under callgrind, check every answer is an L1 hit, and report a count per
hit from two dumps whose hits differ; and a build's command must reach valgrind with its
environment kept and the interpreter named by its real path (not a launcher script)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.instructions import valgrind_command

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        shutil.which("valgrind") is None or shutil.which("callgrind_control") is None,
        reason="valgrind is not installed",
    ),
]


def test_a_build_command_runs_its_interpreter_under_callgrind(tmp_path: Path) -> None:
    out = tmp_path / "cg.out"
    words = valgrind_command("env PYTHONPATH=/tmp/before python -m tierproxy serve", out).split()
    assert words[:2] == ["env", "PYTHONPATH=/tmp/before"]
    assert Path(words[2]).name == "valgrind"
    assert "--tool=callgrind" in words and f"--callgrind-out-file={out}" in words
    interpreter = words[words.index(f"--callgrind-out-file={out}") + 1]
    assert os.path.isabs(interpreter) and interpreter == os.path.realpath(interpreter)
    with open(interpreter, "rb") as f:
        assert f.read(4) == b"\x7fELF"  # the interpreter itself, not a script that starts it
    assert words[-3:] == ["-m", "tierproxy", "serve"]


def test_l1_hits_are_counted_per_hit_from_two_dumps(tmp_path: Path) -> None:
    out = tmp_path / "instructions"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.instructions", "--targets", "l1"]
        + ["--requests", "160", "--warmup", "40", "--out", str(out)],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "| l1 |" in done.stdout
    result = json.loads((out / "instructions.json").read_text())
    measured = result["results"]["l1"]["this"]
    first, second = measured["dumps"]
    assert (first["hits"], second["hits"]) == (160, 480)
    assert second["instructions"] > first["instructions"] > 0
    # An L1 hit is tens of thousands of instructions (about 60k on x86-64, CPython 3.11);
    # a count outside this range would mean the dumps measured something else.
    assert 10_000 < measured["instructions_per_hit"] < 1_000_000, measured
    assert not list(out.glob("callgrind-*"))  # the large dumps are not left in the results
