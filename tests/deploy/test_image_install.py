"""The CPU image's very install and start steps, without Docker: the build stage's RUN commands of
docker/Dockerfile.cpu (read from the file) run in a fresh venv over a build context made of its COPY
lines filtered by .dockerignore; then the runtime stage's ENV, USER, ENTRYPOINT and CMD start the
server as that unprivileged user over a read-only model repository; /livez answers, the HEALTHCHECK
command passes, and SIGTERM ends it with status 0. The GPU image runs the same steps with its own lock
(test_docker.py proves the two Dockerfiles differ only there)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .helpers import ROOT, ServerProcess, exec_form, free_port, http_get, read_dockerfile, start_server
from .image import IMAGE_VENV, run_build_stage

pytestmark = pytest.mark.integration

DOCKERFILE = ROOT / "docker" / "Dockerfile.cpu"
IMAGE_REPOSITORY = "/models"


@pytest.fixture(scope="module")
def installed(image_root: Path, image_python: Path, service_available: None) -> Path:
    """The build stage, run: returns the venv (the image's /opt/venv)."""
    return run_build_stage(DOCKERFILE, image_root, image_python)


def test_install_is_the_serving_side_only(installed: Path) -> None:
    python = str(installed / "bin" / "python")
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, timeout=60)
    assert no_torch.returncode != 0
    assert "No module named 'torch'" in no_torch.stderr
    ort = subprocess.run(
        [python, "-c", "import onnxruntime as o; print(','.join(o.get_available_providers()))"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    providers = ort.stdout.strip().split(",")
    assert "CPUExecutionProvider" in providers, ort.stderr
    assert "CUDAExecutionProvider" not in providers
    # The CPU's matrix engine: the OpenVINO plugin loads into the image's onnxruntime and offers its engines.
    engines = subprocess.run(
        [python, "-c", "from deepvit.artifact.engines import host_engines; print(host_engines().offered)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "openvino" in engines.stdout, engines.stderr
    # Nothing is missing from the lock; the one requirement pip reports is the GPU wheel's name, which
    # the CPU image replaces with the CPU wheel of the same module and version.
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    problems = [ln for ln in check.stdout.splitlines() if ln.strip() and "onnxruntime-gpu" not in ln]
    assert problems == [], check.stdout


def test_image_starts_unprivileged_on_a_read_only_repository(
    installed: Path, image_root: Path, tiny_repository: Path
) -> None:
    _build, runtime = read_dockerfile(DOCKERFILE)
    # The model repository as the image sees it: owned by someone else, not writable by the server.
    repository = image_root / "models"
    shutil.copytree(tiny_repository, repository)
    for path in [repository, *repository.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = sorted(p.relative_to(repository).as_posix() for p in repository.rglob("*"))

    user, _, group = (runtime.last("USER") or "").partition(":")
    as_root = os.geteuid() == 0
    port = free_port()

    def image_path(value: str) -> str:
        return value.replace(IMAGE_VENV, str(installed)).replace(IMAGE_REPOSITORY, str(repository))

    env = {k: image_path(v) for k, v in runtime.env().items()}
    env["HOME"] = "/nonexistent"  # the image user's home (useradd --no-create-home)
    argv = [image_path(a) for a in exec_form(runtime.last("ENTRYPOINT") or "") + exec_form(runtime.last("CMD") or "")]
    argv[0] = str(installed / "bin" / argv[0])
    argv = [a.replace("0.0.0.0", "127.0.0.1") for a in argv]
    argv[argv.index("--port") + 1] = str(port)
    assert argv[argv.index("--model-repository") + 1] == str(repository)
    workdir = image_root / "workdir"  # the image's WORKDIR /tmp: writable by anyone
    workdir.mkdir()
    workdir.chmod(0o1777)
    bytecode_before = set(installed.rglob("*.pyc"))
    server: ServerProcess = start_server(
        argv,
        repository,
        image_root / "server.log",
        env=env,
        user=int(user) if as_root else None,
        group=int(group or user) if as_root else None,
        cwd=workdir,
    )
    try:
        assert http_get(f"{server.url}/livez")[0] == 200
        assert http_get(f"{server.url}/readyz")[0] == 200
        probe = exec_form((runtime.last("HEALTHCHECK") or "").partition("CMD ")[2])
        probe = [installed / "bin" / probe[0], *[a.replace(":8000/", f":{port}/") for a in probe[1:]]]
        assert subprocess.run([str(a) for a in probe], env=env, timeout=30).returncode == 0
        if as_root:
            status = Path(f"/proc/{server.proc.pid}/status").read_text()
            uid_line = next(ln for ln in status.splitlines() if ln.startswith("Uid:"))
            assert uid_line.split()[1] == user, uid_line
    finally:
        started = time.monotonic()
        code = server.stop(timeout=40)
    grace = float(env.get("DEEPVIT_GRACE_PERIOD_S", "30"))
    assert code == 0, server.log_tail()
    assert time.monotonic() - started < grace
    after = sorted(p.relative_to(repository).as_posix() for p in repository.rglob("*"))
    assert after == before, "the server wrote into the model repository"
    written = set(installed.rglob("*.pyc")) - bytecode_before
    assert not written, "bytecode written next to the code: a read-only root file system would refuse it"
