"""Fixtures of the batch prediction suite: a model repository, a folder of photographs in every format
with broken files among them, a real S3 API on loopback (moto's server), and a two-node Ray cluster on this
machine (``ray start --head``, then ``ray start --address``), shared by the whole session."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from serving import DATA, export_tiny, free_port

from deepvit.bench.server import stop

pytest.importorskip("ray", reason="deepvit predict needs the batch extra")

BIN = Path(sys.executable).parent
# The files that are not images a user would expect to be classified, each with why.
BROKEN = {
    "truncated.jpg": "half of a JPEG",
    "random.jpg": "random bytes",
    "empty.jpg": "zero bytes",
    "notes/text.png": "text named .png",
}
GOOD = (
    "astronaut.jpg",
    "camera.jpg",
    "chelsea.jpg",
    "coffee.jpg",
    "rocket.jpg",
    "formats/chelsea.png",
    "formats/chelsea.webp",
    "formats/chelsea.gif",
    "formats/chelsea.bmp",
    "formats/coffee-grey.png",
    "formats/rocket-rotated.jpg",
)


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding the official tiny_cnn weights as ``tiny`` version 1."""
    root = tmp_path_factory.mktemp("predict-repo")
    export_tiny(root)
    return root


@pytest.fixture(scope="session")
def artifact(repo: Path) -> Path:
    return repo / "tiny" / "1" / "model.onnx"


@pytest.fixture(scope="session")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's photographs, the same in other formats and modes (nested folders), and broken files; a
    README.txt that is not an input."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "formats").mkdir()
    (root / "notes").mkdir()
    for photo in sorted((DATA / "photos").glob("*.jpg")):
        shutil.copy(photo, root / photo.name)
    chelsea = Image.open(root / "chelsea.jpg")
    for fmt in ("png", "webp", "bmp"):
        chelsea.save(root / "formats" / f"chelsea.{fmt}")
    chelsea.convert("P").save(root / "formats" / "chelsea.gif")
    Image.open(root / "coffee.jpg").convert("L").save(root / "formats" / "coffee-grey.png")
    rocket = Image.open(root / "rocket.jpg")
    exif = rocket.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90° clockwise to view
    rocket.save(root / "formats" / "rocket-rotated.jpg", exif=exif, quality=90)
    coffee = (root / "coffee.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(coffee[: len(coffee) // 2])
    (root / "random.jpg").write_bytes(secrets.token_bytes(4096))
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes" / "text.png").write_text("these are notes, not a picture\n")
    (root / "README.txt").write_text("not an input: not named as an image\n")
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == sorted(
        [*GOOD, *BROKEN, "README.txt"]
    )
    return root


_drains: dict[subprocess.Popen[str], threading.Thread] = {}


def _wait_for_line(proc: subprocess.Popen[str], marker: str, what: str) -> list[str]:
    """Read a starting process's output until ``marker``; its lines so far (an error if it exits first)."""
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            # What it prints from now on is read and dropped, so that a full pipe never blocks it.
            _drains[proc] = drain = threading.Thread(target=proc.stdout.read, daemon=True)
            drain.start()
            return lines
    proc.wait(30)
    raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready:\n{''.join(lines[-40:])}")


def _stop(proc: subprocess.Popen[str]) -> None:
    stop(proc)  # SIGTERM, then a kill after a minute
    drain = _drains.pop(proc, None)
    if drain is not None:
        drain.join(30)
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture(scope="session")
def s3_env() -> Iterator[dict[str, str]]:
    """moto's S3 server on loopback, and the standard AWS variables that point a client at it."""
    port = free_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_line(proc, "Running on", "moto's S3 server")
        yield env
    finally:
        _stop(proc)


def upload(folder: Path, bucket: str, prefix: str, env: dict[str, str]) -> None:
    """Every file of ``folder`` into ``bucket`` under ``prefix``, through the S3 API."""
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    s3.create_bucket(Bucket=bucket)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}")


@pytest.fixture(scope="session")
def ray_env(s3_env: dict[str, str]) -> dict[str, str]:
    """The environment of the cluster's nodes and of the drivers that join it: no usage statistics, Ray's
    token authentication with a token of this session, and the bucket's endpoint (every node reads it)."""
    return {
        **os.environ,
        **s3_env,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }


@pytest.fixture(scope="session")
def ray_cluster(ray_env: dict[str, str]) -> Iterator[str]:
    """Two Ray nodes on this machine, one CPU and a small object store each: ``ray start --head``, then
    ``ray start --address`` (both --block, so that stopping them stops what they started). Its address."""
    node = ["--num-cpus", "1", "--object-store-memory", str(100 * 2**20), "--disable-usage-stats", "--block"]
    head_cmd = [str(BIN / "ray"), "start", "--head", "--port", "0", "--include-dashboard", "false", *node]
    head = subprocess.Popen(head_cmd, env=ray_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs = [head]
    try:
        lines = _wait_for_line(head, "ray start --address=", "ray start --head")  # printed once it started
        # With Ray's dashboard installed (ray[default]) its command line colours what it prints.
        plain = re.sub(r"\x1b\[[0-9;]*m", "", lines[-1])
        address = plain.split("--address=", 1)[1].strip().strip("'\"")
        worker_cmd = [str(BIN / "ray"), "start", "--address", address, *node]
        worker = subprocess.Popen(worker_cmd, env=ray_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(worker)
        _wait_for_line(worker, "Ray runtime started", "ray start --address")
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)
