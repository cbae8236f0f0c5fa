"""``deepvit predict`` end to end, as a user runs it: on a two-node Ray cluster (``--address``), against a real
``deepvit serve`` answering the same files, from and to a bucket of a real S3 API (moto's server), and killed
with SIGKILL a third of the way through on a local Ray, then run again."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from serving import ROOT, running_server

from .conftest import BROKEN, GOOD, upload

pytestmark = pytest.mark.integration

SCORE_TOLERANCE = 1e-4


@dataclass
class Run:
    code: int
    summary: dict[str, Any]
    stderr: str


def predict(*args: object, env: dict[str, str]) -> Run:
    """``deepvit predict ARGS --json`` in a process of its own."""
    cmd = [sys.executable, "-m", "deepvit.cli", "predict", *map(str, args), "--no-progress", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1]) if lines else {}
    return Run(proc.returncode, summary, proc.stderr)


def read_rows(location: str, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every row under an output folder or prefix (files starting with _ are not rows)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    if location.startswith("s3://"):
        fs = pafs.S3FileSystem(
            endpoint_override=env["AWS_ENDPOINT_URL"] if env else None,
            access_key="test",
            secret_key="test",
            region="us-east-1",
        )
        rows: list[dict[str, Any]] = pq.read_table(location.removeprefix("s3://"), filesystem=fs).to_pylist()
        return rows
    return list(pq.read_table(location).to_pylist())


@pytest.fixture(scope="module")
def folder_run(
    mixed_folder: Path,
    artifact: Path,
    ray_cluster: str,
    ray_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Run, Path]:
    """The folder classified on the two-node cluster, once for the module."""
    out = tmp_path_factory.mktemp("predictions") / "out"
    run = predict(mixed_folder, "--artifact", artifact, "--output", out, "--address", ray_cluster, env=ray_env)
    return run, out


def test_every_file_gets_one_row_with_the_answer_of_classify(
    folder_run: tuple[Run, Path], mixed_folder: Path, repo: Path, artifact: Path, tmp_path: Path
) -> None:
    run, out = folder_run
    assert run.code == 0, run.stderr[-3000:]
    assert run.summary["cluster"].startswith("2 nodes, 2 CPUs: 2 actors"), run.summary
    assert run.summary["complete"]
    assert run.summary["written"] == len(GOOD) + len(BROKEN)
    assert run.summary["errors"] == len(BROKEN)
    assert run.summary["skipped_not_images"] == 1  # README.txt
    rows = {Path(r["path"]).relative_to(mixed_folder).as_posix(): r for r in read_rows(str(out))}
    assert sorted(rows) == sorted([*GOOD, *BROKEN])
    sha = hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert {(r["model"], r["version"], r["artifact_sha256"]) for r in rows.values()} == {("tiny", 1, sha)}
    # What computed each row: an engine the actors measured (the broken files' rows: none).
    assert {rows[n]["engine"] for n in BROKEN} == {None}
    assert {rows[n]["engine"] for n in GOOD} <= {"cpu", "openvino"}
    assert sum(run.summary["engines"].values()) == len(GOOD)

    with running_server(repo, tmp_path / "server.log") as server, server.client() as client:
        for name, row in rows.items():
            body = (mixed_folder / name).read_bytes()
            answer = client.post("/classify", content=body, headers={"Content-Type": "application/octet-stream"})
            if name in BROKEN:
                assert 400 <= answer.status_code < 500, (name, answer.text)
                assert row["predictions"] is None
                assert row["error"] == answer.json()["error"], name
                continue
            assert answer.status_code == 200, (name, answer.text)
            assert row["error"] is None
            expected = answer.json()["predictions"]
            got = row["predictions"]
            assert [(p["label"], p["class_id"]) for p in got] == [(p["label"], p["class_id"]) for p in expected]
            assert max(abs(p["score"] - e["score"]) for p, e in zip(got, expected, strict=True)) < SCORE_TOLERANCE


def test_a_rerun_of_a_finished_output_reads_nothing_again(
    folder_run: tuple[Run, Path], mixed_folder: Path, artifact: Path, ray_env: dict[str, str]
) -> None:
    _, out = folder_run
    again = predict(mixed_folder, "--artifact", artifact, "--output", out, env=ray_env)
    assert again.code == 0, again.stderr[-3000:]
    assert again.summary["written"] == 0
    assert again.summary["done_before"] == len(GOOD) + len(BROKEN)
    assert again.summary["cluster"] == ""  # nothing to do: Ray was not even started
    assert len(read_rows(str(out))) == len(GOOD) + len(BROKEN)


def test_a_bucket_gives_the_same_rows_as_the_folder(
    folder_run: tuple[Run, Path], mixed_folder: Path, artifact: Path, ray_cluster: str, ray_env: dict[str, str]
) -> None:
    upload(mixed_folder, "photos", "set-1", ray_env)
    src, out = "s3://photos/set-1", "s3://photos/predictions/set-1"
    run = predict(src, "--artifact", artifact, "--output", out, "--address", ray_cluster, env=ray_env)
    assert run.code == 0, run.stderr[-3000:]
    from_bucket = {r["path"].removeprefix(f"{src}/"): r for r in read_rows(out, ray_env)}
    from_folder = {Path(r["path"]).relative_to(mixed_folder).as_posix(): r for r in read_rows(str(folder_run[1]))}
    assert sorted(from_bucket) == sorted(from_folder)
    for name, row in from_bucket.items():
        # Each run's actors measured the engines afresh: the same answers, the scores within the tolerance.
        same = ("error", "model", "version", "artifact_sha256")
        assert {k: row[k] for k in same} == {k: from_folder[name][k] for k in same}, name
        assert _ranked(row) == _ranked(from_folder[name]), name
        for got, want in zip(row["predictions"] or [], from_folder[name]["predictions"] or [], strict=True):
            assert abs(got["score"] - want["score"]) < SCORE_TOLERANCE, name


def _ranked(row: dict[str, Any]) -> list[tuple[str, int]] | None:
    return [(p["label"], p["class_id"]) for p in row["predictions"]] if row["predictions"] is not None else None


def _descendants(pid: int) -> list[int]:
    """The processes started by ``pid``, and by them, from /proc (Ray's node processes of a local run)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rows_in_complete_files(out: Path) -> int:
    import pyarrow.parquet as pq

    n = 0
    for f in out.glob("*.parquet"):
        try:
            n += pq.read_metadata(f).num_rows
        except (OSError, ValueError):  # being written
            continue
    return n


def test_killed_a_third_of_the_way_then_rerun_every_file_is_there_once(
    artifact: Path, tmp_path: Path, ray_env: dict[str, str]
) -> None:
    """SIGKILL of the command on a local Ray (the default: its own ``ray.init``) once a third of the rows are
    written, then the same command again: every file exactly once."""
    photos = tmp_path / "photos"
    photos.mkdir()
    source = Image.open(Path(ROOT, "tests", "data", "photos", "chelsea.jpg"))
    total = 240
    for i in range(total):
        box = (i % 97, i % 71, i % 97 + 160, i % 71 + 120)
        source.crop(box).resize((64 + i % 40, 56)).save(photos / f"{i:04d}.jpg", quality=85)
    out = tmp_path / "out"
    env = {k: v for k, v in ray_env.items() if not k.startswith("RAY_AUTH")}  # a local Ray of its own
    args = ["--artifact", artifact, "--output", out, "--batch-size", "4", "--rows-per-file", "4", "--actors", "1"]
    cmd = [sys.executable, "-m", "deepvit.cli", "predict", str(photos), *map(str, args), "--no-progress"]
    log = tmp_path / "killed.log"
    with log.open("wb") as f:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    started_by_it: list[int] = []
    try:
        while proc.poll() is None and _rows_in_complete_files(out) < total // 3:
            started_by_it = _descendants(proc.pid) or started_by_it
            try:
                proc.wait(0.05)  # the command's exit, or the next look at its output
            except subprocess.TimeoutExpired:
                continue
        started_by_it = _descendants(proc.pid) or started_by_it
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        for pid in started_by_it:  # Ray's node processes outlive a killed driver: end them
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    killed_at = _rows_in_complete_files(out)
    assert total // 3 <= killed_at < total, (
        f"killed with {killed_at} of {total} rows written:\n{log.read_text()[-3000:]}"
    )

    rerun = predict(photos, *args, env=env)
    assert rerun.code == 0, rerun.stderr[-3000:]
    assert rerun.summary["done_before"] >= killed_at
    assert rerun.summary["done_before"] + rerun.summary["written"] == total
    paths = [r["path"] for r in read_rows(str(out))]
    assert len(paths) == total
    assert sorted(paths) == sorted(str(p) for p in photos.glob("*.jpg"))
