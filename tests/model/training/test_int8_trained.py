"""int8 of a trained model keeps what it learned: the `make demo` model (trained once per session by the
``trained_shapes_artifact`` fixture) exported int8 and evaluated on the validation images through the
service's pixel path, within one point of the float32 artifact's top-1. Dynamic quantization (the default)
must pass its gate; static QDQ must either pass it and keep the accuracy, or be refused with nothing written
(on a weaker model, trained 12 epochs to 35%, static agreed 98.4% over the gate's images and was refused)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deepvit.artifact.session import read_metadata

MAX_TOP1_LOSS = 0.01


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_int8_keeps_validation_accuracy_within_one_point(
    trained_shapes_artifact: Any, run_deepvit: Callable[..., Any], tmp_path: Path, method: str
) -> None:
    t = trained_shapes_artifact  # conftest.TrainedShapes
    out = tmp_path / "shapes_int8" / "1" / "model.onnx"
    args = ["export", "--model-config", t.run_dir / "model_config.json", "--checkpoint", t.checkpoint]
    args += ["--labels", t.run_dir / "labels.txt", "--name", "shapes_int8", "--precision", "int8", "--output", out]
    # Gated in the model's own domain: views of a few training images of each class (the project's photographs
    # are far out of a shapes model's domain, where its decisions are near ties), judged on the validation set.
    gate = tmp_path / "gate"
    gate.mkdir()
    for folder in sorted(p for p in t.train_dir.iterdir() if p.is_dir()):
        for image in sorted(folder.iterdir())[:3]:
            shutil.copy(image, gate / image.name)
    args += ["--gate-images", gate]
    if method == "static":
        args += ["--calibration", t.train_dir]  # calibrated on training images, judged on validation ones
    res = run_deepvit(*args)
    if method == "static" and res.code == 2:
        assert "accuracy gate failed, nothing written" in res.stderr, res.stderr
        assert not out.exists()
        return
    assert res.code == 0, res.stderr
    meta = read_metadata(out)
    assert meta.quantization["method"] == method
    assert meta.accuracy["passed"] is True

    top1 = {}
    for artifact in (t.artifact, out):
        res = run_deepvit("evaluate", "--artifact", artifact, "--data", t.val_dir, "--workers", 0)
        assert res.code == 0, res.stderr
        top1[artifact] = json.loads(res.stdout)["top1"]
    fp32, int8 = top1[t.artifact], top1[out]
    print(f"validation top-1: float32 {fp32:.2%}, int8 ({method}) {int8:.2%}")
    assert int8 >= fp32 - MAX_TOP1_LOSS
