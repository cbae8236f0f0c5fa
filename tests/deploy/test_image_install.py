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
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import require_tool
from .helpers import ROOT, ServerProcess, exec_form, free_port, http_get, read_dockerfile, start_server
from .test_docker import _dockerignore_excludes

pytestmark = pytest.mark.integration

DOCKERFILE = ROOT / "docker" / "Dockerfile.cpu"
IMAGE_VENV = "/opt/venv"
IMAGE_REPOSITORY = "/models"


@pytest.fixture(scope="module")
def image_root() -> Iterator[Path]:
    """A directory every user may traverse (pytest's own tmp is private to its user)."""
    root = Path(tempfile.mkdtemp(prefix="deepvit-image-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _traversable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents])


@pytest.fixture(scope="module")
def image_python(image_root: Path) -> Path:
    """A ``python`` (CPython 3.11, as the image's) that the image's unprivileged user can run: when this
    suite runs as root, its own interpreter may live under /root, out of that user's reach."""
    candidates = [Path(sys._base_executable).resolve(), Path("/usr/local/bin/python3.11"), Path("/usr/bin/python3.11")]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        if os.geteuid() == 0 and not _traversable_by_others(candidate):
            continue
        probe = subprocess.run(
            [str(candidate), "-c", "import sys, venv, ensurepip; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if probe.stdout.strip() == "(3, 11)":
            shims = image_root / "bin"
            shims.mkdir()
            (shims / "python").symlink_to(candidate)
            return shims
    return Path(require_tool("python3.11-for-an-unprivileged-user", "apt-get install python3.11-venv"))


@pytest.fixture(scope="module")
def installed(image_root: Path, image_python: Path, service_available: None) -> Path:
    """The build stage, run: returns the venv (the image's /opt/venv)."""
    build, _runtime = read_dockerfile(DOCKERFILE)
    workdir = build.last("WORKDIR")
    assert workdir == "/src"
    context = image_root / "src"
    context.mkdir()
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip()[:1] not in ("", "#")]
    venv = image_root / "venv"
    env = {**os.environ, **{k: v for k, v in build.env().items() if k != "PATH"}}
    # The base image's `python`: CPython 3.11.
    env["PATH"] = f"{image_python}:{os.environ.get('PATH', '')}"
    for keyword, arg in build.instructions:
        if keyword == "COPY":
            *sources, dest = arg.split()
            for source in sources:
                target = context / dest
                src = ROOT / source
                files = [p for p in src.rglob("*") if p.is_file()] if src.is_dir() else [src]
                for f in files:
                    rel = f.relative_to(ROOT).as_posix()
                    if _dockerignore_excludes(rel, ignore):
                        continue
                    inner = f.relative_to(src) if src.is_dir() else Path(f.name)
                    out = (target / inner) if (src.is_dir() or dest.endswith("/")) else target
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, out)
        elif keyword == "RUN":
            # The same command; pip's cache is allowed here (it changes where bytes come from, not what
            # is installed), the venv lives where this test can write.
            command = arg.replace(IMAGE_VENV, str(venv)).replace(" --no-cache-dir", "")
            proc = subprocess.run(
                ["bash", "-c", command], cwd=context, env=env, capture_output=True, text=True, timeout=600
            )
            assert proc.returncode == 0, f"RUN {arg}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return venv


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
