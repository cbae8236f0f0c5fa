"""The distribution installs one namespace, ``deepvit``: no global ``model`` or ``service`` package that would
shadow a user's own modules (or be shadowed by them)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(out),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("deepvit_serve-*.whl")
    return path


def test_the_wheel_holds_the_deepvit_namespace_only(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert zf.read(info).decode().split() == ["deepvit"]
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"deepvit"}
    # The design card's folders are its subpackages, with their data: every module of the tree is there.
    sources = {f"deepvit/{p.relative_to(ROOT / 'deepvit').as_posix()}" for p in (ROOT / "deepvit").rglob("*.py")}
    for folder in ("model", "service"):
        sources |= {
            f"deepvit/{folder}/{p.relative_to(ROOT / folder).as_posix()}" for p in (ROOT / folder).rglob("*.py")
        }
    sources.add("deepvit/model/data/imagenet1k_labels.txt")
    assert sources <= set(names), (
        f"not in the wheel (add the package to pyproject.toml): {sorted(sources - set(names))}"
    )


def test_after_install_model_and_service_are_not_importable(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    # -S: no site-packages, so neither this checkout's editable install nor its folders are on the path.
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = (
        "import deepvit.model, deepvit.service, importlib.util as u; "
        "print(deepvit.__file__); print(u.find_spec('model'), u.find_spec('service'))"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    location, specs = proc.stdout.splitlines()
    assert location.startswith(str(target))
    assert specs == "None None"
