"""The serving side works on the base install, which has no torch: every module of ``deepvit.service`` and of
the artifact contract ``deepvit.artifact`` imports,
``deepvit --help`` and ``deepvit inspect`` work, and the model-side commands name the extra to install.

Each check runs in a fresh interpreter whose first act is to make the train extra's packages unimportable,
as they are on a serving-only install (a meta-path finder, installed before anything else is imported).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
TRAIN_EXTRA = ("torch", "torchvision", "timm", "onnx", "onnxscript")

BLOCKER = """
import sys

class _NotInstalled:
    blocked = {blocked!r}

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in cls.blocked):
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled)
"""

IMPORT_EVERY_SERVICE_MODULE = """
import importlib, json, pkgutil
import deepvit.artifact, deepvit.service

failures = {{}}
def record(name):
    failures[name] = repr(sys.exc_info()[1])

names = []
for package in (deepvit.artifact, deepvit.service):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".", onerror=record):
        names.append(info.name)
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            failures[info.name] = repr(exc)
loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in {forbidden!r}))
print(json.dumps({{"modules": names, "failures": failures, "loaded": loaded}}))
"""

RUN_DEEPVIT = """
from deepvit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def python(code: str, *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )


def deepvit_without_torch(*args: object) -> subprocess.CompletedProcess[str]:
    return python(BLOCKER.format(blocked=TRAIN_EXTRA) + RUN_DEEPVIT, *args)


def import_every_service_module(blocked: tuple[str, ...]) -> dict[str, object]:
    forbidden = ("torch", "deepvit.model")
    proc = python(BLOCKER.format(blocked=blocked) + IMPORT_EVERY_SERVICE_MODULE.format(forbidden=forbidden))
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_blocker_really_blocks() -> None:
    proc = python(BLOCKER.format(blocked=TRAIN_EXTRA) + "import torch")
    assert proc.returncode != 0
    assert "No module named 'torch'" in proc.stderr


def test_every_service_module_imports_with_torch_and_model_blocked() -> None:
    result = import_every_service_module((*TRAIN_EXTRA, "deepvit.model"))
    assert result["failures"] == {}
    modules = result["modules"]
    assert isinstance(modules, list)
    expected = {"deepvit.artifact.pixels", "deepvit.artifact.session", "deepvit.service.cli", "deepvit.service.errors"}
    assert expected <= set(modules)


def test_service_does_not_import_torch_even_when_it_is_installed() -> None:
    # A guarded "try: import torch" would pass the blocked test above; this catches it.
    result = import_every_service_module(())
    assert result["failures"] == {}
    assert result["loaded"] == []


def test_help_works_without_torch() -> None:
    proc = deepvit_without_torch("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("export", "verify", "inspect"):
        assert command in proc.stdout


def test_inspect_works_without_torch(exported_tiny_patch: Path) -> None:
    proc = deepvit_without_torch("inspect", exported_tiny_patch)
    assert proc.returncode == 0, proc.stderr
    assert "tiny_patch (custom), 10 classes, fp32" in proc.stdout
    assert "parity" in proc.stdout

    proc = deepvit_without_torch("inspect", "--json", exported_tiny_patch)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["weights"] == "state_dict"


@pytest.mark.parametrize(
    "args",
    [
        ["export", "--arch", "deepvit_S", "--random-init", "--output", "{out}"],
        ["verify", "{out}", "--arch", "deepvit_S", "--checkpoint", "{out}"],
    ],
    ids=["export", "verify"],
)
def test_model_commands_without_torch_name_the_train_extra(tmp_path: Path, args: list[str]) -> None:
    out = tmp_path / "out" / "model.onnx"
    proc = deepvit_without_torch(*(a.format(out=out) for a in args))
    assert proc.returncode != 0
    assert "deepvit-serve[train]" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.parent.exists()


def test_the_artifact_contract_imports_neither_torch_nor_fastapi() -> None:
    # Both halves import the contract: it must not drag either half's heavy dependencies into the other.
    code = (
        "import sys, json, deepvit.artifact.metadata, deepvit.artifact.pixels, deepvit.artifact.predictions, "
        "deepvit.artifact.session\n"
        "heavy = ('torch', 'fastapi', 'starlette', 'deepvit.model', 'deepvit.service')\n"
        "print(json.dumps(sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in heavy))))"
    )
    proc = python(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
