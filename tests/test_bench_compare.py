"""`deepvit bench --compare`: int8 beside fp32 in one run, every figure also as a ratio to the first model's.
(Speed itself is never asserted: the figures belong in the table.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from serving import DATA, ROOT, export_tiny
from test_bench import require_hey


def test_compare_puts_int8_beside_fp32_in_one_table(tmp_path: Path) -> None:
    require_hey()
    repo = tmp_path / "repo"
    export_tiny(repo, name="tiny")
    export_tiny(repo, name="tiny8", precision="int8")
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "deepvit.cli", "bench", "--model-repository", str(repo), "--output", str(out)]
    cmd += ["--compare", "tiny", "tiny8", "--photos", str(DATA / "photos"), "--concurrency", "2"]
    cmd += ["--batch-sizes", "1", "4", "--duration", "1", "--min-time", "0.2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (out / "tiny-vs-tiny8.md").read_text()
    assert "| layer | setting | model | precision | images/s | × tiny |" in table
    for model, precision in (("tiny", "fp32"), ("tiny8", "int8")):
        for setting in ("batch 1", "batch 4"):
            assert f"| onnxruntime | {setting} | {model} | {precision} |" in table
        assert f"| HTTP service | hey, concurrency 2 | {model} | {precision} |" in table
        assert f"| gRPC service | tritonclient.grpc.aio, concurrency 2 | {model} | {precision} |" in table
    assert "| onnxruntime | batch 1 | tiny | fp32 | " in table
    first = next(line for line in table.splitlines() if line.startswith("| onnxruntime | batch 1 | tiny |"))
    assert first.split("|")[6].strip() == "1.00"  # the first model is the unit
    http_rows = [line for line in table.splitlines() if line.startswith(("| HTTP service", "| gRPC service"))]
    assert all(line.endswith("| 0 |") for line in http_rows), "requests failed under the benchmark"
    assert not list(out.glob(".bench-*")), "the server log was left behind"
