"""Batch prediction shares the artifact contract with the service, never its HTTP stack nor the model side:
every module of ``deepvit.predict`` imports, with Ray Data, in an interpreter where FastAPI, Starlette,
uvicorn, ``deepvit.service`` and torch cannot be imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[2]
BLOCKED = ("fastapi", "starlette", "uvicorn", "deepvit.service", "torch")

CHECK = f"""
import sys

class _Blocked:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in {BLOCKED!r}):
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, _Blocked)
import importlib, pkgutil
import deepvit.predict

for info in pkgutil.walk_packages(deepvit.predict.__path__, "deepvit.predict."):
    importlib.import_module(info.name)
import deepvit.predict.classifier, deepvit.predict.job, ray.data  # and what an actor imports
print("imported")
"""


def test_batch_prediction_imports_nothing_of_the_http_stack() -> None:
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "imported"
