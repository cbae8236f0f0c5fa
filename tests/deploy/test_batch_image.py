"""The batch image as KubeRay uses it, without Docker or Kubernetes: the build stage of docker/Dockerfile.batch
run in a fresh venv (tests/deploy/image.py) and the runtime stage's links; then, as the image's user with the
image's environment and the PATH of the login shell KubeRay starts Ray through, a Ray head started the way
KubeRay starts one (``ulimit -n 65536; ray start --head ... --block``, dashboard on), its node health
endpoint answering KubeRay's probe, and the RayJob's own entrypoint (k8s/rayjob/, its bucket and volume
paths swapped for local ones) submitted through Ray's job API as KubeRay's submitter does
(``ray job submit``): it classifies a folder into one row per file. Nothing is installed at job start."""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from .helpers import ROOT, free_port, read_dockerfile
from .image import IMAGE_VENV, run_build_stage
from .test_rayjob import NODE_HEALTH

pytestmark = pytest.mark.integration

DOCKERFILE = ROOT / "docker" / "Dockerfile.batch"
RAYJOB = ROOT / "k8s" / "rayjob" / "rayjob.yaml"
PHOTOS = ROOT / "tests" / "data" / "photos"
# What /etc/profile gives a login shell of a user other than root (KubeRay runs `bash -lc`): the system's
# PATH, in which the image's /usr/local/bin stands for where its links are.
LOGIN_PATH = "{local_bin}:/usr/bin:/bin"


@pytest.fixture(scope="module")
def image(image_root: Path, image_python: Path) -> dict[str, Path]:
    """The build stage run, and the runtime stage's links made: the venv and the directory of the links."""
    venv = run_build_stage(DOCKERFILE, image_root, image_python)
    local_bin = image_root / "usr-local-bin"
    local_bin.mkdir()
    for run in read_dockerfile(DOCKERFILE)[-1].all("RUN"):
        if run.startswith("ln -s"):
            command = run.replace(IMAGE_VENV, str(venv)).replace("/usr/local/bin/", f"{local_bin}/")
            subprocess.run(["bash", "-c", command], check=True, timeout=30)
    return {"venv": venv, "local_bin": local_bin}


@pytest.fixture(scope="module")
def image_user() -> dict[str, int]:
    """Popen's user and group: the image's USER when this suite runs as root, else this user."""
    user, _, group = (read_dockerfile(DOCKERFILE)[-1].last("USER") or "").partition(":")
    return {"user": int(user), "group": int(group or user)} if os.geteuid() == 0 else {}


@pytest.fixture(scope="module")
def image_env(image: dict[str, Path], image_root: Path, image_user: dict[str, int]) -> dict[str, str]:
    runtime = read_dockerfile(DOCKERFILE)[-1]
    home = image_root / "home"  # the image user's home (useradd --create-home)
    home.mkdir()
    if image_user:
        os.chown(home, image_user["user"], image_user["group"])
    env = {k: v.replace(IMAGE_VENV, str(image["venv"])) for k, v in runtime.env().items()}
    env.update(
        PATH=LOGIN_PATH.format(local_bin=image["local_bin"]),
        HOME=str(home),
        # KubeRay's token authentication (authOptions), as the head and the submitter are given it.
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
    )
    return env


def test_install_is_the_batch_side(image: dict[str, Path], image_env: dict[str, str]) -> None:
    python = str(image["venv"] / "bin" / "python")
    probe = "import ray.data, ray.dashboard, pyarrow, onnxruntime, deepvit.predict.job; print(ray.__version__)"
    proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120, env=image_env)
    assert proc.returncode == 0, proc.stderr
    import ray

    assert proc.stdout.strip() == ray.__version__  # the version the suite ran, and the RayJob names
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, timeout=60)
    assert "No module named 'torch'" in no_torch.stderr
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    problems = [ln for ln in check.stdout.splitlines() if ln.strip() and "onnxruntime-gpu" not in ln]
    assert problems == [], check.stdout
    # Through the login shell's PATH: the links, each running the venv's Python.
    for command in ("ray --version", "deepvit predict --help"):
        found = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, env=image_env)
        assert found.returncode == 0, (command, found.stderr[-2000:])


def _entrypoint(folder: Path, artifact: Path, output: Path) -> list[str]:
    """The RayJob's entrypoint with its bucket and volume paths replaced by local ones."""
    args = shlex.split(yaml.safe_load(RAYJOB.read_text())["spec"]["entrypoint"])
    assert args[:2] == ["deepvit", "predict"]
    assert args[2].startswith("s3://")
    args[2] = str(folder)
    args[args.index("--artifact") + 1] = str(artifact)
    args[args.index("--output") + 1] = str(output)
    return args


def _wait_http(url: str, proc: subprocess.Popen[str], deadline_s: float = 120.0) -> int:
    """The status of ``url`` once it answers 200 (or the last one when the deadline passes)."""
    end, status = time.monotonic() + deadline_s, 0
    while time.monotonic() < end and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                status = answer.status
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            status = getattr(exc, "code", 0)
        if status == 200:
            return status
        threading.Event().wait(0.5)  # the node's agent is still starting
    return status


@pytest.fixture
def ray_head(
    image_env: dict[str, str], image_root: Path, image_user: dict[str, int]
) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    """``ray start --head`` as KubeRay runs it in the image (one CPU here, a small object store, its own
    temporary directory): the process, the dashboard's port and the dashboard agent's."""
    dashboard, agent = free_port(), free_port()
    temp = image_root / "ray"
    temp.mkdir(exist_ok=True)
    if image_user:
        os.chown(temp, image_user["user"], image_user["group"])
    start = (
        f"ulimit -n 65536; ray start --head --port {free_port()} --num-cpus 1 --object-store-memory {100 * 2**20} "
        f"--dashboard-host 127.0.0.1 --dashboard-port {dashboard} --dashboard-agent-listen-port {agent} "
        f"--temp-dir {temp} --disable-usage-stats --block"
    )
    log = (image_root / "ray-head.log").open("w")
    proc = subprocess.Popen(
        ["bash", "-c", start], env=image_env, stdout=log, stderr=subprocess.STDOUT, text=True, **image_user
    )
    try:
        yield proc, dashboard, agent
    finally:
        proc.terminate()  # --block: stopping it stops what it started
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        log.close()


def test_the_rayjobs_entrypoint_runs_in_the_image_as_kuberay_submits_it(
    image_env: dict[str, str],
    image_root: Path,
    image_user: dict[str, int],
    ray_head: tuple[subprocess.Popen[str], int, int],
    tiny_repository: Path,
) -> None:
    proc, dashboard, agent = ray_head
    # The RayJob's probes (and KubeRay's own for Ray >= 2.53): HTTP GET of the dashboard agent's health.
    status = _wait_http(f"http://127.0.0.1:{agent}{NODE_HEALTH['path']}", proc)
    assert status == 200, (image_root / "ray-head.log").read_text()[-3000:]

    folder = image_root / "photos"
    folder.mkdir()
    for photo in sorted(PHOTOS.glob("*.jpg")):
        shutil.copy(photo, folder / photo.name)
    (folder / "empty.jpg").write_bytes(b"")
    output = image_root / "predictions"
    output.mkdir(mode=0o777)
    output.chmod(0o777)  # the image's user writes it
    # The model repository volume, as the image's user reads it (pytest's own tmp is private to this user).
    artifact = image_root / "models" / "tiny_cnn" / "1" / "model.onnx"
    shutil.copytree(tiny_repository, image_root / "models")
    for path in [image_root / "models", *(image_root / "models").rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    submit = ["ray", "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--submission-id", "deepvit-1"]
    command = shlex.join([*submit, "--", *_entrypoint(folder, artifact, output)])
    job = subprocess.run(
        ["bash", "-c", command], env=image_env, capture_output=True, text=True, timeout=600, **image_user
    )
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    assert "Job 'deepvit-1' succeeded" in job.stdout, job.stdout[-4000:]

    import pyarrow.parquet as pq

    rows = pq.read_table(output).to_pylist()
    assert sorted(Path(r["path"]).name for r in rows) == sorted(p.name for p in folder.iterdir())
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["empty.jpg"]["error"]
    assert by_name["empty.jpg"]["predictions"] is None
    good = [r for name, r in by_name.items() if name != "empty.jpg"]
    assert all(r["error"] is None and len(r["predictions"]) == 5 for r in good)
    assert {r["engine"] for r in good} <= {"cpu", "openvino"}
    assert {(r["model"], r["version"]) for r in rows} == {("tiny_cnn", 1)}
