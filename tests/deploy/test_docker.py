"""docker/: no Docker engine here, so the images are proven piecewise: hadolint and checkov lint the
Dockerfiles, ``docker compose config`` validates the compose files, the lock files are complete and
consistent, the GPU image's library path holds every CUDA library ONNX Runtime's CUDA provider loads,
the build context keeps what the Dockerfiles copy; test_image_install.py runs the install and start
steps themselves."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import MAKE_TOOLS, require_tool
from .helpers import ROOT, Stage, dockerignore_excludes, exec_form, read_dockerfile
from .test_k8s import run_checkov

DOCKER = ROOT / "docker"
SERVE_IMAGES = {"Dockerfile": "requirements-serve-gpu.txt", "Dockerfile.cpu": "requirements-serve-cpu.txt"}
LOCKS = {**SERVE_IMAGES, "Dockerfile.export": "requirements-export.txt", "Dockerfile.batch": "requirements-batch.txt"}
ALL_DOCKERFILES = list(LOCKS)
IMAGE_ENV = {
    "python_version": "3.11",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
}


def read_lock(name: str) -> dict[str, str]:
    pins = {}
    for line in (DOCKER / name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!_-]+)", line)
            assert match, f"{name}: {line!r} is not pinned with =="
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_hadolint_finds_nothing() -> None:
    hadolint = require_tool("hadolint", MAKE_TOOLS)
    for name in ALL_DOCKERFILES:
        path = DOCKER / name
        proc = subprocess.run(
            [hadolint, "--format", "json", "--failure-threshold", "style", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        findings = json.loads(proc.stdout or "[]")
        assert findings == [], f"{name}: {findings}"
        assert proc.returncode == 0, proc.stderr
        # An ignore would have to say why on the line above it; there are none.
        assert "hadolint ignore" not in path.read_text()


def test_checkov_finds_nothing_in_docker(tmp_path: Path) -> None:
    checkov = require_tool("checkov", MAKE_TOOLS)
    report = run_checkov(checkov, DOCKER, "dockerfile", tmp_path)
    assert report["failed"] == [], report["failed"]
    assert report["skipped"] == []
    assert report["passed"] > 100


def compose_config(*files: str, tmp_path: Path) -> dict[str, Any]:
    compose = require_tool("docker-compose", MAKE_TOOLS)
    args = [compose, "--profile", "export"]
    for f in files:
        args += ["-f", str(DOCKER / f)]
    env = {**os.environ, "HOME": str(tmp_path), "DOCKER_CONFIG": str(tmp_path)}
    proc = subprocess.run(
        [*args, "config", "--format", "json"], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr
    config: dict[str, Any] = json.loads(proc.stdout)
    return config


def test_compose_file_is_valid_and_complete(tmp_path: Path) -> None:
    config = compose_config("compose.yaml", tmp_path=tmp_path)
    services = config["services"]
    assert {"deepvit", "prometheus", "grafana", "export"} <= set(services)
    app = services["deepvit"]
    assert app["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert Path(app["build"]["context"]) == ROOT
    assert app["read_only"] is True
    assert app["cap_drop"] == ["ALL"]
    (models,) = [v for v in app["volumes"] if v["target"] == "/models"]
    assert models["read_only"] is True
    assert float(app["stop_grace_period"].rstrip("s")) > float(app["environment"]["DEEPVIT_GRACE_PERIOD_S"])
    # Every file compose mounts into Prometheus and Grafana is in the repository.
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), volume["source"]
        assert re.search(r":v?\d+\.\d+", services[name]["image"]), "pin the image by version"
    targets = yaml.safe_load(config["configs"]["deepvit-targets"]["content"])
    assert targets == [{"targets": ["deepvit:8000"], "labels": {"accelerator": "cpu"}}]
    prometheus_yml = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    assert prometheus_yml["scrape_configs"][0]["file_sd_configs"][0]["files"] == ["targets/*.yml"]
    (target,) = services["prometheus"]["configs"]
    assert target["target"] == "/etc/prometheus/targets/deepvit.yml"
    datasources = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


def test_compose_gpu_override(tmp_path: Path) -> None:
    config = compose_config("compose.yaml", "compose.gpu.yaml", tmp_path=tmp_path)
    app = config["services"]["deepvit"]
    assert app["build"]["dockerfile"] == "docker/Dockerfile"
    (device,) = app["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    assert app["environment"]["DEEPVIT_PROVIDERS"].startswith("cuda")
    targets = yaml.safe_load(config["configs"]["deepvit-targets"]["content"])
    assert targets[0]["labels"] == {"accelerator": "gpu"}


def stages(name: str) -> list[Stage]:
    return read_dockerfile(DOCKER / name)


@pytest.mark.parametrize("name", ALL_DOCKERFILES)
def test_dockerfile_is_multi_stage_pinned_and_unprivileged(name: str) -> None:
    all_stages = stages(name)
    assert len(all_stages) >= 2
    for stage in all_stages:
        tag = stage.base.partition(":")[2]
        assert re.match(r"\d+\.\d+\.\d+", tag), f"{name}: pin {stage.base} by a version tag"
    final = all_stages[-1]
    user = final.last("USER")
    assert re.fullmatch(r"[1-9]\d{3,}(:[1-9]\d{3,})?", user or ""), "a numeric non-root user"
    assert any("/opt/venv" in c and "--from=build" in c for c in final.all("COPY"))
    assert final.last("SHELL") is None
    env = final.env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1", "nothing writes next to the code (read-only root)"
    assert env["PATH"].startswith("/opt/venv/bin:")


@pytest.mark.parametrize("name", list(SERVE_IMAGES))
def test_serving_image_starts_deepvit_serve_without_a_shell(name: str) -> None:
    final = stages(name)[-1]
    assert exec_form(final.last("ENTRYPOINT") or "") == ["deepvit", "serve"]
    cmd = exec_form(final.last("CMD") or "")
    flags = dict(zip(cmd[::2], cmd[1::2], strict=True))
    assert flags == {"--model-repository": "/models", "--host": "0.0.0.0", "--port": "8000", "--grpc-port": "8001"}
    assert final.last("EXPOSE") == f"{flags['--port']} {flags['--grpc-port']}"
    assert final.last("STOPSIGNAL") == "SIGTERM"
    healthcheck = final.last("HEALTHCHECK") or ""
    options, _, command = healthcheck.partition("CMD ")
    probe = exec_form(command)
    assert probe[0] == "python"
    assert f"127.0.0.1:{flags['--port']}/livez" in probe[-1]
    assert "--start-period" in options


def test_gpu_and_cpu_images_differ_only_in_runtime_and_lock() -> None:
    gpu, cpu = stages("Dockerfile"), stages("Dockerfile.cpu")
    assert [s.base for s in gpu] == [s.base for s in cpu]

    def build(s: Stage, lock: str) -> list[tuple[str, str]]:
        return [(k, a.replace(lock, "LOCK")) for k, a in s.instructions]

    assert build(gpu[0], SERVE_IMAGES["Dockerfile"]) == build(cpu[0], SERVE_IMAGES["Dockerfile.cpu"])
    for keyword in ("USER", "EXPOSE", "ENTRYPOINT", "CMD", "STOPSIGNAL", "WORKDIR"):
        assert gpu[-1].all(keyword) == cpu[-1].all(keyword), keyword
    # The same probe; only its start period differs (CUDA warm-up is slower).
    probe = [h.partition("CMD ")[2] for h in (gpu[-1].last("HEALTHCHECK"), cpu[-1].last("HEALTHCHECK"))]
    assert probe[0] == probe[1]
    assert gpu[-1].env()["DEEPVIT_PROVIDERS"] == "cuda,cpu"
    assert cpu[-1].env()["DEEPVIT_PROVIDERS"] == "cpu"


@pytest.mark.parametrize(
    ("name", "lock"),
    [
        *SERVE_IMAGES.items(),
        ("Dockerfile.export", "requirements-export.txt"),
        ("Dockerfile.batch", "requirements-batch.txt"),
    ],
)
def test_images_install_only_from_their_lock(name: str, lock: str) -> None:
    runs = stages(name)[0].all("RUN")
    pip = [r for r in runs if "pip install" in r]
    assert pip[0] == f"/opt/venv/bin/pip install --no-cache-dir --no-deps -r docker/{lock}"
    assert all("--no-deps" in r for r in pip), "nothing may be resolved at build time"
    assert f"COPY docker/{lock} docker/" in [f"COPY {c}" for c in stages(name)[0].all("COPY")]


def test_export_image_runs_deepvit_export() -> None:
    final = stages("Dockerfile.export")[-1]
    assert exec_form(final.last("ENTRYPOINT") or "") == ["deepvit", "export"]
    assert final.env()["HOME"] == "/tmp"
    assert "torch" in read_lock("requirements-export.txt")


@pytest.mark.parametrize("lock", ["requirements-serve-gpu.txt", "requirements-serve-cpu.txt"])
def test_serving_locks_hold_no_torch_and_meet_the_project(lock: str) -> None:
    pins = read_lock(lock)
    assert not {"torch", "torchvision", "timm", "onnx"} & set(pins)
    project = metadata.distribution("deepvit-serve")
    for raw in project.requires or []:
        req = Requirement(raw)
        if req.marker and not req.marker.evaluate({**IMAGE_ENV, "extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name == "onnxruntime-gpu" and "cpu" in lock:
            name = "onnxruntime"  # the CPU image's wheel of the same module
        assert name in pins, f"{lock} lacks {req}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{lock}: {name}=={pins[name]} vs {req}"


@pytest.mark.parametrize("lock", LOCKS.values())
def test_locks_are_closed(lock: str) -> None:
    """Every requirement of every locked package (read from this venv where it has the same version)
    is itself locked at a version that satisfies it: `pip install --no-deps` leaves nothing out."""
    pins = read_lock(lock)
    checked = 0
    for name, version in pins.items():
        dist_name = "onnxruntime-gpu" if name == "onnxruntime" else name
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        checked += 1
        extras = {"cuda", "cudnn"} if name == "onnxruntime-gpu" and "gpu" in lock else set()
        extras |= {"data", "default"} if name == "ray" and "batch" in lock else set()  # the cluster extra's
        for raw in dist.requires or []:
            req = Requirement(raw)
            envs = [{**IMAGE_ENV, "extra": e} for e in (extras or {""})]
            if req.marker and not any(req.marker.evaluate(e) for e in envs):
                continue
            sub = canonicalize_name(req.name)
            assert sub in pins, f"{lock}: {name} needs {req}"
            assert req.specifier.contains(pins[sub], prereleases=True), f"{lock}: {name} needs {req}"
    assert checked >= len(pins) // 2, "too few locked versions installed here to check the lock"


def test_batch_lock_is_the_cpu_images_and_the_cluster_extra() -> None:
    """The batch image decodes and computes as the CPU serving image does (the same locked versions), with
    the project's ``cluster`` extra on top (Ray Data, pyarrow, Ray's dashboard and job API)."""
    batch, cpu = read_lock("requirements-batch.txt"), read_lock("requirements-serve-cpu.txt")
    assert {name: batch.get(name) for name in cpu} == cpu
    assert not {"torch", "torchvision", "timm", "onnx", "onnxruntime-gpu"} & set(batch)
    project = metadata.distribution("deepvit-serve")
    cluster = [Requirement(r) for r in project.requires or []]
    cluster = [r for r in cluster if r.marker and 'extra == "cluster"' in str(r.marker)]
    assert {canonicalize_name(r.name) for r in cluster} == {"ray", "pyarrow"}
    for req in cluster:
        assert req.specifier.contains(batch[canonicalize_name(req.name)], prereleases=True), req
    # Ray's dashboard and job API, through which KubeRay submits the job and probes the nodes.
    assert {"aiohttp", "aiohttp-cors", "opencensus", "smart-open", "virtualenv"} <= set(batch)


def test_batch_image_is_a_ray_node_for_kuberay() -> None:
    final = stages("Dockerfile.batch")[-1]
    assert final.last("ENTRYPOINT") is None, "KubeRay gives the command (ray start); an entry point would wrap it"
    assert final.last("USER") == "1000:1000"  # Ray's images' user, which the RayJob's securityContext names
    links = [r for r in final.all("RUN") if r.startswith("ln -s")]
    assert links == ["ln -s /opt/venv/bin/ray /opt/venv/bin/deepvit /usr/local/bin/"], "bash -l resets PATH"
    assert any("--create-home --home-dir /home/ray" in r for r in final.all("RUN"))
    assert final.env()["RAY_USAGE_STATS_ENABLED"] == "0"


def test_gpu_image_library_path_holds_what_the_cuda_provider_loads() -> None:
    """LD_LIBRARY_PATH of the GPU image points at the directories where the locked NVIDIA wheels put
    the libraries that ONNX Runtime's CUDA provider links against (readelf) or loads (cuDNN, cuFFT)."""
    readelf = require_tool("readelf", "apt-get install binutils")
    try:
        ort = metadata.distribution("onnxruntime-gpu")
    except metadata.PackageNotFoundError:
        pytest.skip("onnxruntime-gpu is not installed in this venv (needed to read the CUDA provider)")
    site = Path(str(ort.locate_file("")))
    provider = site / "onnxruntime" / "capi" / "libonnxruntime_providers_cuda.so"
    proc = subprocess.run([readelf, "-d", str(provider)], capture_output=True, text=True, timeout=60)
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", proc.stdout))
    nvidia = {lib for lib in needed if re.match(r"lib(cu|nv)", lib)} - {"libcuda.so.1"}  # libcuda: the driver
    assert {"libcudart.so.13", "libcublas.so.13"} <= nvidia, needed
    wanted = nvidia | {"libcudnn.so.9", "libcufft.so.12"}
    env = stages("Dockerfile")[-1].env()
    prefix = "/opt/venv/lib/python3.11/site-packages/"
    dirs = env["LD_LIBRARY_PATH"].split(":")
    assert all(d.startswith(prefix) for d in dirs)
    if Path(sys.executable).parent.parent.joinpath("lib", "python3.11").exists() is False:
        pytest.skip("this venv is not Python 3.11: the image's site-packages layout cannot be compared")
    local_dirs = [site / d.removeprefix(prefix) for d in dirs]
    pins = read_lock("requirements-serve-gpu.txt")
    owners = {}
    for dist in metadata.distributions():
        for f in dist.files or []:
            if Path(f).name in wanted:
                owners[Path(f).name] = canonicalize_name(dist.metadata["Name"])
    for lib in wanted:
        assert any((d / lib).exists() for d in local_dirs), f"{lib} is not in the image's LD_LIBRARY_PATH"
        assert owners.get(lib) in pins, f"{lib} comes from {owners.get(lib)}, which the GPU lock lacks"


def test_build_context_keeps_what_the_dockerfiles_copy() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    for name in ALL_DOCKERFILES:
        for stage in stages(name):
            for copy in stage.all("COPY"):
                if copy.startswith("--from"):
                    continue
                *sources, _dest = copy.split()
                for source in sources:
                    path = ROOT / source
                    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
                    files = [f for f in files if "__pycache__" not in f.parts]
                    assert files, source
                    for f in files:
                        rel = f.relative_to(ROOT).as_posix()
                        assert not dockerignore_excludes(rel, patterns), f"{name} copies {rel}, .dockerignore drops it"
    for kept_out in (".venv/bin/python", ".venv-tools/bin/python", "models/a/1/model.onnx", ".git/HEAD",
                     "tests/data/tiny_cnn.json", "service/__pycache__/app.cpython-311.pyc"):  # fmt: skip
        assert dockerignore_excludes(kept_out, patterns), kept_out
