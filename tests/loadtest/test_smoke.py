"""CI smoke for the load-test tooling: one short scenario end to end.

Runs ``python -m loadtest.run smoke`` (origin + Redis if installed + ``python -m tierproxy
serve`` + Locust headless at ~50 req/s for a few seconds, all on 127.0.0.1) and checks that
the run produced a summary with traffic, no unexpected errors, and its plots — so the
tooling does not rot between manual full runs. Skipped when Locust or matplotlib is missing,
unless CI=true (then it is a failure: install the ``loadtest`` extra).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        reason = f"{module} not installed (pip install -e '.[loadtest]')"
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(f"{reason}; CI=true so this is a failure, not a skip", pytrace=False)
        pytest.skip(reason)


def test_smoke_scenario_produces_a_report(tmp_path: Path) -> None:
    _need("locust")
    _need("matplotlib")
    out = tmp_path / "smoke"
    cmd = [
        sys.executable,
        "-m",
        "loadtest.run",
        "smoke",
        "--duration",
        "8",
        "--quiet-wait",
        "0",
        "--out",
        str(out),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    proc = subprocess.run(
        cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    logs = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, logs

    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario"] == "smoke"
    assert summary["requests"] > 0, logs
    assert summary["errors"]["unexpected"] == 0, (summary["errors"], logs)
    hits = sum(v for k, v in summary["x_cache"].items() if k.startswith("HIT"))
    assert hits > 0, summary["x_cache"]
    assert summary["origin"]["requests"] is not None
    assert summary["latency_ms"]["p50_ms"] > 0
    failed = [c for c in summary["checks"] if not c["ok"]]
    assert not failed, failed

    for name in ("latency.png", "hit_ratio.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        assert 5_000 < len(data) < 1_000_000, (name, len(data))
    assert (out / "locust.html").stat().st_size > 0
    assert (out / "locust_stats.csv").stat().st_size > 0
