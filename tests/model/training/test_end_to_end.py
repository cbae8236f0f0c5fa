"""The proof that training works on this machine's CPU, end to end, as `make demo` runs it:
synthetic shapes -> deepvit train -> deepvit export (parity gate) -> deepvit evaluate (checkpoint, artifact)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest

from deepvit.model.training.synthetic import CLASSES

# Validation top-1 the trained tiny model must reach. Chance is 1/8 = 12.5%.
MIN_VAL_TOP1 = 0.90


@pytest.mark.slow
def test_train_export_evaluate_end_to_end(
    trained_shapes_artifact: Any, run_deepvit: Callable[..., Any], tmp_path: Path
) -> None:
    t = trained_shapes_artifact  # conftest.TrainedShapes
    print(f"trained to val top-1 {t.best_val_top1:.1%} in {t.train_seconds:.0f}s (threshold {MIN_VAL_TOP1:.0%})")
    assert t.best_val_top1 >= MIN_VAL_TOP1, f"best validation top-1 {t.best_val_top1:.1%} after {t.train_seconds:.0f}s"

    meta = {p.key: p.value for p in onnx.load(str(t.artifact), load_external_data=False).metadata_props}
    assert json.loads(meta["deepvit.parity"])["passed"] is True
    assert json.loads(meta["deepvit.labels"]) == list(CLASSES) == t.labels
    assert meta["deepvit.weights"] == "state_dict"

    reports = {}
    for source, path in (("checkpoint", t.checkpoint), ("artifact", t.artifact)):
        preds = tmp_path / f"{source}.jsonl"
        res = run_deepvit("evaluate", f"--{source}", path, "--data", t.val_dir, "--predictions", preds, "--workers", 0)
        assert res.code == 0, res.stderr
        reports[source] = json.loads(res.stdout) | {"rows": preds.read_text().splitlines()}
    # The checkpoint holds the weights training evaluated (after the BatchNorm recalibration): same top-1.
    assert reports["checkpoint"]["top1"] == pytest.approx(t.best_val_top1, abs=1e-9)
    # The export lost nothing: the artifact, through the service's preprocessing, answers the same.
    assert reports["artifact"]["top1"] == reports["checkpoint"]["top1"]
    rows = {source: [json.loads(line) for line in r["rows"]] for source, r in reports.items()}
    for a, c in zip(rows["artifact"], rows["checkpoint"], strict=True):  # image by image
        assert (a["path"], a["target"]) == (c["path"], c["target"])
        assert a["predictions"][0]["label"] == c["predictions"][0]["label"]
        assert a["predictions"][0]["score"] == pytest.approx(c["predictions"][0]["score"], abs=1e-4)
    assert (t.run_dir / "curves.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.integration
def test_the_served_model_answers_as_the_artifact_on_every_validation_image(
    trained_shapes_artifact: Any, run_deepvit: Callable[..., Any], tmp_path: Path
) -> None:
    """The last leg: the trained, exported model served by a real `deepvit serve` over HTTP gives, image by
    image, the top-1 that `deepvit evaluate` computes on the artifact."""
    from serving import running_server

    t = trained_shapes_artifact
    preds = tmp_path / "artifact.jsonl"
    res = run_deepvit("evaluate", "--artifact", t.artifact, "--data", t.val_dir, "--predictions", preds, "--workers", 0)
    assert res.code == 0, res.stderr
    expected = {}
    for line in preds.read_text().splitlines():
        row = json.loads(line)
        expected[Path(row["path"]).resolve()] = row["predictions"][0]["label"]
    images = sorted(p.resolve() for p in Path(t.val_dir).rglob("*") if p.is_file())
    assert len(images) == len(expected)
    agree = 0
    with running_server(t.repository, tmp_path / "server.log") as server, server.client() as c:
        for image in images:
            r = c.post("/classify", content=image.read_bytes(), headers={"content-type": "application/octet-stream"})
            assert r.status_code == 200, r.text
            top = r.json()["predictions"][0]
            assert top["label"] == expected[image], image.name
            agree += top["label"] == image.parent.name
    assert agree / len(images) >= MIN_VAL_TOP1  # and the served answers are right, as training measured
