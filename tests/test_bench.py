"""`deepvit bench` keeps working: one short run on the tiny model writes the table with every layer.
(Speed itself is never asserted: the figures belong in the benchmark's table, not in a test.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from serving import DATA, ROOT, export_tiny


def require_hey() -> None:
    if shutil.which("hey") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("hey is missing in CI: install Debian's hey package")
        pytest.skip("hey not installed (apt-get install hey)")


def test_bench_writes_a_table_with_every_layer(tmp_path: Path) -> None:
    require_hey()
    repo = tmp_path / "repo"
    export_tiny(repo)
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "deepvit.cli", "bench", "--model-repository", str(repo), "--output", str(out)]
    cmd += ["--photos", str(DATA / "photos"), "--concurrency", "1", "4", "--batch-sizes", "1", "4"]
    cmd += ["--duration", "1", "--min-time", "0.2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (out / "tiny.md").read_text()
    for row in ("| onnxruntime | batch 1 |", "| onnxruntime | batch 4 |", "| in-process pipeline |"):
        assert row in table
    assert "| HTTP service | hey, concurrency 1 |" in table
    assert "| HTTP service | hey, concurrency 4 |" in table
    assert "HTTP throughput / in-process pipeline" in table
    assert "concurrency 1: HTTP p50" in table  # the service's overhead over raw ONNX Runtime and one decode
    assert "batches of at most " in table  # what the warm-up chose, as GET /models says
    assert "| gRPC service | tritonclient.grpc.aio, concurrency 1 |" in table
    assert "| gRPC service | tritonclient.grpc.aio, concurrency 4 |" in table
    assert "gRPC throughput / HTTP throughput" in table
    assert "| naive baseline | hey, concurrency 4 |" in table
    assert "HTTP throughput / naive baseline's" in table
    assert "| naive OpenVINO | hey, concurrency 4 |" in table  # OpenVINO's own runtime, its throughput hint
    assert "HTTP throughput / naive OpenVINO server's" in table
    # Raw engines × precisions × batch sizes, and the limit on the fastest engine the gate allows.
    assert "| engine cpu (fp32), 1 thread | batch 4 |" in table
    assert "| engine openvino (fp32), 1 thread | batch 4 |" in table
    assert "limits by engine" in table
    assert "served with engine " in table  # which engine the server chose, as GET /models says
    assert "the most any server could lead it by here" in table  # the limit over the baseline
    assert "machine limit" in table
    assert "HTTP throughput / machine limit" in table
    assert (out / "tiny.png").read_bytes().startswith(b"\x89PNG"), "the chart of throughput and p99"
    served = [line for line in table.splitlines() if line.startswith(("| HTTP service", "| gRPC service", "| naive "))]
    assert all(line.endswith("| 0 |") for line in served), "requests failed under the benchmark"
    assert not list(out.glob(".bench-*")), "the server log was left behind"


def test_the_overload_run_reports_goodput_refusals_probes_and_memory(tmp_path: Path) -> None:
    require_hey()
    repo = tmp_path / "repo"
    export_tiny(repo)
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "deepvit.cli", "bench", "--overload", "--model-repository", str(repo)]
    cmd += ["--output", str(out), "--photos", str(DATA / "photos"), "--overload-seconds", "2", "--factor", "2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (out / "tiny-overload-2x.md").read_text()
    for row in ("| capacity (closed loop, c=8) |", "| goodput |", "| p99 of refusals (503) |", "| /livez p99 / max |"):
        assert row in table
    assert "| offered (open loop, Poisson arrivals) |" in table
    assert "| without an answer | none |" in table  # every request the generator sent got an answer
    assert "| RSS, second 10 → end |" in table
    assert "200: " in table  # some requests were answered


def test_the_slow_clients_run_cuts_them_off_and_serves_the_normal_client(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    export_tiny(repo)
    out = tmp_path / "results"
    env = {**os.environ, "DEEPVIT_BODY_TIMEOUT_S": "2", "DEEPVIT_HEADER_TIMEOUT_S": "1.5"}
    cmd = [sys.executable, "-m", "deepvit.cli", "bench", "--slow-clients", "--model-repository", str(repo)]
    cmd += ["--output", str(out), "--photos", str(DATA / "photos"), "--slow", "4", "--slow-seconds", "2"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (out / "tiny-slow-clients.md").read_text()
    assert "| slow bodies (deadline 2 s) | 4 × 408; cut off after" in table
    assert "| slow heads (deadline 1.5 s) | 4 × 408; cut off after" in table
    normal = re.search(r"\| normal client \(one photograph every 0.5 s\) \| (\d+) requests: (\d+) × 200 \|", table)
    assert normal is not None, table
    assert normal.group(1) == normal.group(2)  # every one answered 200


def test_the_upload_flood_run_reports_answers_and_memory(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    export_tiny(repo)
    out = tmp_path / "results"
    # Room for two 3 MB bodies at once: the others are refused from their heads.
    env = {**os.environ, "DEEPVIT_MAX_BODY_BYTES": "4000000", "DEEPVIT_MAX_UPLOAD_BYTES": "8000000"}
    cmd = [sys.executable, "-m", "deepvit.cli", "bench", "--upload-flood", "--model-repository", str(repo)]
    cmd += ["--output", str(out), "--photos", str(DATA / "photos"), "--uploads", "8", "--upload-bytes", "3000000"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (out / "tiny-upload-flood.md").read_text()
    assert "| JSON answers (200/400/408/413, or 503 with Retry-After) | 8 of 8 |" in table, table
    assert "× 503" in table
    assert "| RSS before → peak → after |" in table


def test_the_refusal_cost_run_compares_the_two_paths(tmp_path: Path) -> None:
    require_hey()
    repo = tmp_path / "repo"
    export_tiny(repo)
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "deepvit.cli", "bench", "--refusal-cost", "--model-repository", str(repo)]
    cmd += ["--output", str(out), "--photos", str(DATA / "photos"), "--requests", "320"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (out / "refusal-cost.md").read_text()
    assert "| refused by the HTTP protocol, from the head (now) |" in table
    assert "| refused by the ASGI middleware, before routing (before) |" in table
    assert "HTTP protocol: {'503': 320}; middleware: {'503': 320}" in table  # every request refused, answered


def test_the_decode_memory_run_sends_lying_images_and_reports_rss(tmp_path: Path) -> None:
    import io

    from PIL import Image

    from deepvit.bench.decode_memory import claim_size, lying_images

    photo = (DATA / "photos" / "astronaut.jpg").read_bytes()
    jpeg = next(body for content_type, body in lying_images(photo, 2, 6000, seed=1) if content_type == "image/jpeg")
    sides = Image.open(io.BytesIO(jpeg)).size  # what the header claims; the data is 128 px a side
    assert min(sides) >= 1500
    assert max(sides) <= 6000
    with pytest.raises(ValueError, match="neither"):
        claim_size(b"GIF89a", 10, 10)

    repo = tmp_path / "repo"
    export_tiny(repo)
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "deepvit.cli", "bench", "--decode-memory", "--model-repository", str(repo)]
    cmd += ["--output", str(out), "--photos", str(DATA / "photos"), "--requests", "40"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (out / "tiny-decode-memory.md").read_text()
    assert "| lying images sent | 40 " in table
    assert "| RSS after (ordinary photographs again) |" in table
    assert "500" not in table.split("answers by status")[1].splitlines()[0]  # bad input is never a 500


def test_the_jpeg_draft_run_compares_time_and_pixels_with_the_reference(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    export_tiny(repo)
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "deepvit.cli", "bench", "--jpeg-draft", "--model-repository", str(repo)]
    cmd += ["--output", str(out), "--photos", str(DATA / "photos")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (out / "tiny-jpeg-draft.md").read_text()
    assert "| astronaut at 12 MP | 4032x3024 |" in table
    assert "| mean abs diff |" in table
