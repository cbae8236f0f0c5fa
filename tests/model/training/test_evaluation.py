"""deepvit evaluate: top-k counting, and a checkpoint and its artifact giving the same answers per image."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from deepvit.model.checkpoint import save_checkpoint
from deepvit.model.config import DeepViTConfig
from deepvit.model.export import ArtifactInfo, export_artifact
from deepvit.model.net import DeepViT
from deepvit.model.training.evaluation import evaluate_artifact, evaluate_checkpoint
from deepvit.model.training.synthetic import CLASSES
from deepvit.model.training.topk import TopK


def test_topk_counts() -> None:
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5, 6],  # target 0: top-1
            [0.0, 1, 2, 3, 4, 5, 6],  # target 2: in the top 5 (6, 5, 4, 3, 2), not top-1
            [0.0, 1, 2, 3, 4, 5, 6],  # target 1: outside the top 5
        ]
    )
    c = TopK()
    pred = c.add(logits, torch.tensor([0, 2, 1]))
    assert pred.tolist() == [0, 6, 6]
    assert (c.correct1, c.correct5, c.count) == (1, 2, 3)
    assert c.top1 == pytest.approx(1 / 3)
    assert c.top5 == pytest.approx(2 / 3)
    merged = TopK.from_list([a + b for a, b in zip(c.as_list(), c.as_list(), strict=True)])
    assert merged.top1 == c.top1
    assert merged.count == 6
    few = TopK()
    few.add(torch.tensor([[0.0, 1.0]]), torch.tensor([0]))  # two classes: top-5 is top-2
    assert few.top5 == 1.0
    assert few.top1 == 0.0


@pytest.fixture(scope="module")
def random_tiny(tmp_path_factory: pytest.TempPathFactory, tiny_shapes_config: Path) -> tuple[Path, Path]:
    """An untrained tiny model as a deepvit-train-style checkpoint and as its exported artifact."""
    work = tmp_path_factory.mktemp("random_tiny")
    cfg = DeepViTConfig.from_json(tiny_shapes_config)
    torch.manual_seed(3)
    model = DeepViT(cfg).eval()
    ckpt = work / "ckpt.pth.tar"
    save_checkpoint(
        ckpt,
        {"state_dict": model.state_dict(), "config": cfg.to_dict(), "arch": "custom", "class_names": list(CLASSES)},
    )
    artifact = work / "model.onnx"
    info = ArtifactInfo("tiny", "custom", cfg, list(CLASSES), "state_dict", None, "fp32")
    export_artifact(model, info, artifact, log=lambda _m: None)
    return ckpt, artifact


def test_checkpoint_and_its_artifact_answer_the_same_per_image(
    random_tiny: tuple[Path, Path], small_shapes: Path
) -> None:
    ckpt, artifact = random_tiny
    a = evaluate_checkpoint(ckpt, small_shapes / "val", workers=0)
    b = evaluate_artifact(artifact, small_shapes / "val", workers=0)
    assert a.files == b.files
    assert len(a.files) == 2 * len(CLASSES)
    assert a.predicted == b.predicted  # same pixels in, same decision out, image by image
    assert (a.counts.top1, a.counts.top5) == (b.counts.top1, b.counts.top5)
    assert a.to_dict()["images"] == b.to_dict()["images"] == len(a.files)


def test_evaluate_cli(random_tiny: tuple[Path, Path], small_shapes: Path, tmp_path: Path, run_deepvit: Any) -> None:
    ckpt, artifact = random_tiny
    preds = tmp_path / "preds.jsonl"
    val = small_shapes / "val"
    res = run_deepvit("evaluate", "--artifact", artifact, "--data", val, "--predictions", preds, "--workers", 0)
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["source"] == "artifact"
    assert report["images"] == 2 * len(CLASSES)
    assert 0.0 <= report["top1"] <= report["top5"] <= 1.0
    assert "artifact top-1" in res.stderr
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == report["images"]
    assert [r["path"] for r in rows] == sorted(str(p) for p in val.rglob("*.png"))
    for r in rows:  # the prediction objects of /classify: top 5 with softmax scores, highest first
        assert r["target"] == Path(r["path"]).parent.name == CLASSES[r["target_id"]]
        assert [p["label"] for p in r["predictions"]] == [CLASSES[p["class_id"]] for p in r["predictions"]]
        scores = [p["score"] for p in r["predictions"]]
        assert len(scores) == 5
        assert scores == sorted(scores, reverse=True)
        assert 0 < sum(scores) <= 1 + 1e-9

    res = run_deepvit("evaluate", "--checkpoint", ckpt, "--data", val, "--workers", 0)
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["top1"] == report["top1"]


def test_evaluate_cli_errors_say_what_to_fix(
    random_tiny: tuple[Path, Path], small_shapes: Path, tmp_path: Path, run_deepvit: Any
) -> None:
    ckpt, artifact = random_tiny
    val = small_shapes / "val"
    res = run_deepvit("evaluate", "--artifact", tmp_path / "missing.onnx", "--data", val)
    assert (res.code, "missing.onnx does not exist" in res.stderr) == (2, True)
    res = run_deepvit("evaluate", "--artifact", artifact, "--data", tmp_path / "nowhere")
    assert (res.code, "one sub-folder of images per class" in res.stderr) == (2, True)
    bare = tmp_path / "bare.pth"
    torch.save(torch.load(ckpt, weights_only=True)["state_dict"], bare)
    res = run_deepvit("evaluate", "--checkpoint", bare, "--data", val)
    assert (res.code, "no model config: pass --arch or --model-config" in res.stderr) == (2, True)
    res = run_deepvit("evaluate", "--checkpoint", bare, "--model-config", ckpt.parent / "nope.json", "--data", val)
    assert (res.code, "cannot read model config" in res.stderr) == (2, True)
    res = run_deepvit("evaluate", "--checkpoint", ckpt, "--ema", "--data", val)
    assert (res.code, "no EMA weights" in res.stderr) == (2, True)
