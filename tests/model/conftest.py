"""Fixtures of the training-side tests: synthetic shape sets, and one model trained and exported.

``trained_shapes_artifact`` is the expensive one (a couple of CPU minutes, once per session): it trains the
tiny config on the synthetic shapes with ``deepvit train``, exports the best checkpoint with ``deepvit
export`` into a model repository (``<repository>/shapes/1/model.onnx``) and says where everything is, so
that further end-to-end legs (serving the artifact, say) reuse it instead of training again.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deepvit.model.training.synthetic import generate

ROOT = Path(__file__).resolve().parents[2]
TINY_SHAPES_CONFIG = ROOT / "tests" / "data" / "tiny_shapes.json"


def demo_train_args() -> list[str]:
    """The training recipe of the end-to-end proof: the Makefile's DEMO_TRAIN_ARGS, so that `make demo`
    and the test cannot drift apart. Why it departs from the official defaults is said there."""
    text = (ROOT / "Makefile").read_text()
    found = re.search(r"^DEMO_TRAIN_ARGS\s*:?=\s*(.+)$", text, re.MULTILINE)
    assert found, "the Makefile defines DEMO_TRAIN_ARGS"
    return found.group(1).split()


@dataclass(frozen=True)
class TrainedShapes:
    """What ``trained_shapes_artifact`` made. ``repository`` is a model repository with one model,
    ``shapes`` version 1 (``artifact``); ``val_dir`` holds one folder of images per class."""

    repository: Path
    artifact: Path
    val_dir: Path
    train_dir: Path
    run_dir: Path  # deepvit train --output: best/last checkpoints, log.jsonl, curves.png, labels.txt
    checkpoint: Path  # the best checkpoint, the one exported
    labels: list[str]
    best_val_top1: float  # as deepvit train logged it
    train_seconds: float


@pytest.fixture(scope="session")
def tiny_shapes_config() -> Path:
    """The tiny DeepViT of the shape tests and of `make demo`: 32 px, cnn stem, 4 blocks, Re-attention in 2."""
    return TINY_SHAPES_CONFIG


@pytest.fixture(scope="session")
def small_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A very small set (8 classes, 4 train + 2 val images each) for tests of the machinery."""
    root = tmp_path_factory.mktemp("small_shapes")
    generate(root, train_per_class=4, val_per_class=2, seed=1)
    return root


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The end-to-end set, as `make demo` makes it: 8 classes, 150 train + 25 val images each."""
    root = tmp_path_factory.mktemp("shapes")
    generate(root, seed=0)
    return root


@pytest.fixture(scope="session")
def trained_shapes_artifact(
    shapes: Path, tmp_path_factory: pytest.TempPathFactory, run_deepvit: Callable[..., Any]
) -> TrainedShapes:
    """Train the tiny config on ``shapes`` (deepvit train), export the best checkpoint (deepvit export)."""
    work = tmp_path_factory.mktemp("trained_shapes")
    run = work / "run"
    t0 = time.monotonic()
    res = run_deepvit(
        "train", "--data", shapes, "--model-config", TINY_SHAPES_CONFIG, "--output", run, *demo_train_args()
    )
    seconds = time.monotonic() - t0
    assert res.code == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    artifact = work / "models" / "shapes" / "1" / "model.onnx"
    res = run_deepvit(
        "export",
        "--model-config", run / "model_config.json",
        "--checkpoint", run / "best.pth.tar",
        "--labels", run / "labels.txt",
        "--name", "shapes",
        "--output", artifact,
    )  # fmt: skip
    assert res.code == 0, f"export failed (the parity gate writes nothing on a mismatch): {res.stderr}"
    return TrainedShapes(
        repository=work / "models",
        artifact=artifact,
        val_dir=shapes / "val",
        train_dir=shapes / "train",
        run_dir=run,
        checkpoint=run / "best.pth.tar",
        labels=(run / "labels.txt").read_text().split(),
        best_val_top1=max(r["val_top1"] for r in records),
        train_seconds=seconds,
    )
