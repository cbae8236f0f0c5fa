"""Fixtures of the deployment suite: the external tools it drives, the rendered Kubernetes overlays, a
tiny exported model repository and a real ``deepvit serve`` process on loopback.

A tool that is missing skips its tests with the way to install it, except under CI (``CI=true``, set by
.ci/run), where a missing tool fails: CI installs every one (apt: prometheus; ``make tools``: the
.venv-tools venv with checkov, hadolint, kubernetes-validate, docker compose, and the CRD schemas).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helpers import ROOT, TOOLS_VENV, ServerProcess, start_server

SERVED_BODY_LIMIT = 65536
# The overlays a user renders, and the KServe alternative.
KUSTOMIZATIONS = ("overlays/gpu", "overlays/cpu", "overlays/gpu-keda", "kserve")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_tool(name: str, how: str) -> str:
    """Path of an executable from .venv-tools/bin or PATH; skip (locally) or fail (CI) without it."""
    candidates = [TOOLS_VENV / "bin" / name]
    found = next((str(c) for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
    found = found or shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed: {how}"
    if _in_ci():
        pytest.fail(f"CI must provide every tool: {message}")
    pytest.skip(message)


MAKE_TOOLS = "run `make tools` (creates .venv-tools from tests/deploy/requirements-tools.txt)"
APT_PROMETHEUS = "apt-get install prometheus (Debian's package brings promtool and the server)"


@pytest.fixture(scope="session")
def kubectl() -> str:
    return require_tool("kubectl", "install kubectl (its built-in kustomize renders the overlays)")


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool", APT_PROMETHEUS)


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return require_tool("prometheus", APT_PROMETHEUS)


@pytest.fixture(scope="session")
def rendered(kubectl: str) -> dict[str, list[dict[str, Any]]]:
    """``kubectl kustomize k8s/<dir>`` for every kustomization: dir -> its objects."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name in KUSTOMIZATIONS:
        proc = subprocess.run(
            [kubectl, "kustomize", str(ROOT / "k8s" / name)], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, f"kubectl kustomize k8s/{name} failed:\n{proc.stderr}"
        out[name] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def _service_missing() -> str | None:
    if not (ROOT / "service" / "app.py").exists():
        return "the service (service/app.py) is not written yet"
    proc = subprocess.run(
        [sys.executable, "-c", "import deepvit.service.app"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        return f"the service does not import yet ({tail[0]})"
    return None


@pytest.fixture(scope="session")
def service_available() -> None:
    reason = _service_missing()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory, service_available: None) -> Path:
    """A model repository holding one tiny exported DeepViT (random weights: a few seconds on a CPU)."""
    pytest.importorskip("torch", reason="exporting the tiny model needs the train extra")
    repo = tmp_path_factory.mktemp("repository")
    out = repo / "tiny_cnn" / "1" / "model.onnx"
    deepvit = Path(sys.executable).parent / "deepvit"
    proc = subprocess.run(
        [
            str(deepvit),
            "export",
            "--model-config",
            str(ROOT / "tests" / "data" / "tiny_cnn.json"),
            "--random-init",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return repo


@pytest.fixture(scope="session")
def served(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``deepvit serve`` (this venv) on loopback over the tiny repository, ready."""
    deepvit = Path(sys.executable).parent / "deepvit"
    log = tmp_path_factory.mktemp("served") / "server.log"
    # A small body limit, so that one oversized request produces a rejection the metrics count.
    env = {**os.environ, "DEEPVIT_MAX_BODY_BYTES": str(SERVED_BODY_LIMIT), "DEEPVIT_LOG_FORMAT": "json"}
    server = start_server([str(deepvit), "serve"], tiny_repository, log, env=env)
    try:
        yield server
    finally:
        server.stop()


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
