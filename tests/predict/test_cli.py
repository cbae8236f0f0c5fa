"""``deepvit predict``'s refusals: each a clear line and exit code 2, before any Ray starts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-k", "0"], "--top-k must be at least 1"),
        (["--top-k", "99"], "--top-k 99 must be between 1 and the model's 7 classes"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--actors", "0"], "--actors must be at least 1"),
        # The tiny artifact records no bf16 gate (and this host may have no BF16 either): said before Ray starts.
        (["--engine", "openvino-bf16"], "--engine openvino-bf16 cannot compute this artifact here: "),
        (["--engine", "tensorrt"], "invalid choice: 'tensorrt'"),
    ],
)
def test_bad_arguments(
    run_deepvit: Callable[..., Any],
    mixed_folder: Path,
    artifact: Path,
    tmp_path: Path,
    args: list[str],
    message: str,
) -> None:
    result = run_deepvit("predict", mixed_folder, "--artifact", artifact, "--output", tmp_path / "out", *args)
    assert result.code == 2
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_artifact_that_is_not_one(run_deepvit: Callable[..., Any], mixed_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    result = run_deepvit("predict", mixed_folder, "--artifact", tmp_path / "model.onnx", "--output", tmp_path / "o")
    assert result.code == 2
    assert "is not a loadable ONNX model" in result.stderr
    missing = run_deepvit("predict", mixed_folder, "--artifact", tmp_path / "nowhere.onnx", "--output", tmp_path / "o")
    assert missing.code == 2
    assert "cannot be read" in missing.stderr


def test_a_source_with_nothing_to_classify(run_deepvit: Callable[..., Any], artifact: Path, tmp_path: Path) -> None:
    result = run_deepvit("predict", tmp_path / "nowhere", "--artifact", artifact, "--output", tmp_path / "o")
    assert result.code == 2
    assert "does not exist" in result.stderr


def test_an_output_of_another_top_k(run_deepvit: Callable[..., Any], artifact: Path, tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    (out).mkdir()
    (out / "_deepvit_predict.json").write_text('{"artifact_sha256": "x", "top_k": 5}')
    result = run_deepvit("predict", tmp_path / "photos", "--artifact", artifact, "--output", out)
    assert result.code == 2
    assert "holds rows computed with artifact_sha256 'x'" in result.stderr
