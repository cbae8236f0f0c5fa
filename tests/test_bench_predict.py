"""`deepvit bench --predict` keeps working: one short run on the tiny model writes its table and chart.
(Speed itself is never asserted: the figures belong in the benchmark's table, not in a test.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from serving import DATA, ROOT, export_tiny

pytest.importorskip("ray", reason="deepvit predict needs the batch extra")


@pytest.mark.integration
def test_the_predict_run_sets_the_command_beside_the_service_and_the_limit(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    export_tiny(repo)
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "deepvit.cli", "bench", "--predict", "--model-repository", str(repo)]
    cmd += ["--output", str(out), "--photos", str(DATA / "photos"), "--images", "20", "--duration", "1"]
    cmd += ["--min-time", "0.1", "--rounds", "2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    table = (out / "tiny-predict.md").read_text()
    for row in ("folder's limit", "deepvit predict, whole command", "HTTP service, concurrency 32"):
        assert f"| {row} |" in table
    assert "deepvit predict, whole command |" in table
    assert table.count("rounds: ") >= 3  # each figure's rounds beside its median
    assert "| the service's engine |" in table
    assert (out / "tiny-predict.png").stat().st_size > 0
