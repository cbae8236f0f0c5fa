"""``deepvit analyze`` end to end on a small image folder, its errors, and the side-by-side comparison."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from deepvit.model.analysis import compare
from deepvit.model.analysis.collapse import measure_collapse
from deepvit.model.analysis.images import ImageFiles, pick_evenly
from deepvit.model.checkpoint import save_checkpoint
from deepvit.model.config import DeepViTConfig
from deepvit.model.net import DeepViT
from deepvit.model.training.synthetic import CLASSES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained_style_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_shapes_config: Path) -> Path:
    """A random tiny shapes model saved as deepvit train saves one: with its config and class names."""
    cfg = DeepViTConfig.from_json(tiny_shapes_config)
    torch.manual_seed(5)
    model = DeepViT(cfg)
    path = tmp_path_factory.mktemp("analyze_ckpt") / "best.pth.tar"
    save_checkpoint(
        path,
        {
            "state_dict": model.state_dict(),
            "state_dict_ema": DeepViT(cfg).state_dict(),
            "config": cfg.to_dict(),
            "arch": "custom",
            "class_names": list(CLASSES),
            "epoch": 7,
        },
    )
    return path


def analyze(run_deepvit: Any, *args: object) -> Any:
    return run_deepvit("analyze", *args, "--workers", 0, "--no-progress")


def test_analyze_a_checkpoint_on_a_folder(
    run_deepvit: Any, trained_style_checkpoint: Path, small_shapes: Path, tmp_path: Path, tiny_shapes_config: Path
) -> None:
    out = tmp_path / "analysis"
    val = small_shapes / "val"
    res = analyze(run_deepvit, "--checkpoint", trained_style_checkpoint, "--data", val, "--output", out)
    assert res.code == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    cfg = DeepViTConfig.from_json(tiny_shapes_config)  # the checkpoint's own config was used
    L = cfg.depth
    assert report["blocks"] == L
    assert report["images"] == 2 * len(CLASSES)  # every image of the folder, class sub-folders included
    assert report["threshold"] == 0.9
    assert report["reattention_blocks"] == [2, 3]
    m = np.array(report["matrix"])
    assert m.shape == (L, L)
    np.testing.assert_allclose(m, m.T, atol=1e-9)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-5)
    assert report["similarity_next"] == pytest.approx([m[p, p + 1] for p in range(L - 1)])
    assert report["similar_blocks"] == sum(s > 0.9 for s in report["similarity_next"])
    assert set(report["premixing"]) == {"similarity_next", "matrix", "similar_blocks", "applied_vs_premixing"}
    assert report["model"]["weights"] == "state_dict"
    assert report["name"] == "best.pth.tar"  # no --name, no arch, no config file: the checkpoint's file name
    assert report["model"]["epoch"] == 7
    assert report["model"]["config"] == cfg.to_dict()
    assert (out / "attention_similarity.png").read_bytes()[:8] == PNG_MAGIC

    # The same figures as measuring the model directly on the same images through the evaluation transform.
    model = DeepViT(cfg).eval()
    model.load_state_dict(torch.load(trained_style_checkpoint, weights_only=True)["state_dict"])
    files = ImageFiles(ImageFiles.under(small_shapes / "val"), cfg.preprocessing)
    direct = measure_collapse(model, files.loader(5, 0))
    np.testing.assert_allclose(m, direct.applied.matrix, atol=1e-6)

    # The terminal table: one line per block, and the count of similar blocks.
    lines = res.stdout.splitlines()
    assert lines[0].split()[:3] == ["block", "attention", "M(p,p+1)"]
    assert [line.split()[1] for line in lines[2 : 2 + L]] == ["MHSA", "MHSA", "Re-attention", "Re-attention"]
    assert f"{report['similar_blocks']} of {L - 1}" in lines[-1]


def test_ema_weights_images_and_threshold(
    run_deepvit: Any, trained_style_checkpoint: Path, small_shapes: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ema"
    res = analyze(
        run_deepvit, "--checkpoint", trained_style_checkpoint, "--ema", "--data", small_shapes / "val",
        "--images", 4, "--threshold", 0.5, "--name", "averaged", "--output", out,
    )  # fmt: skip
    assert res.code == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 4
    assert report["threshold"] == 0.5
    assert report["model"]["weights"] == "ema"
    assert report["name"] == "averaged"
    assert report["similar_blocks"] == sum(s > 0.5 for s in report["similarity_next"])


def test_an_official_checkpoint_with_its_config(run_deepvit: Any, data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sorted((data_dir / "photos").iterdir())[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    res = analyze(
        run_deepvit, "--checkpoint", data_dir / "conformance" / "official_tiny_patch.pth.tar",
        "--model-config", data_dir / "tiny_patch.json", "--data", folder, "--output", out,
    )  # fmt: skip
    assert res.code == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["reattention_blocks"] == [0, 1, 2, 3]
    assert report["premixing"]["similar_blocks"] >= 0


def test_random_init_needs_a_config_and_says_it_is_untrained(
    run_deepvit: Any, small_shapes: Path, tmp_path: Path, tiny_shapes_config: Path
) -> None:
    res = analyze(run_deepvit, "--random-init", "--data", small_shapes / "val", "--output", tmp_path / "a")
    assert res.code == 2
    assert "--random-init needs --arch or --model-config" in res.stderr
    res = analyze(
        run_deepvit, "--random-init", "--model-config", tiny_shapes_config, "--data", small_shapes / "val",
        "--images", 2, "--output", tmp_path / "b",
    )  # fmt: skip
    assert res.code == 0, res.stderr
    assert "untrained" in res.stderr
    assert json.loads((tmp_path / "b" / "report.json").read_text())["model"]["weights"] == "random_init"


def test_bad_input_is_one_clear_error(
    run_deepvit: Any, trained_style_checkpoint: Path, small_shapes: Path, tmp_path: Path, data_dir: Path
) -> None:
    out = tmp_path / "o"

    def error(*args: object, checkpoint: Path = trained_style_checkpoint, data: Path = small_shapes / "val") -> str:
        res = analyze(run_deepvit, "--checkpoint", checkpoint, "--data", data, *args, "--output", out)
        assert res.code == 2, res.stderr
        assert not (out / "report.json").exists()  # nothing written
        return str(res.stderr)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images under" in error(data=empty)
    assert "is not a directory" in error(data=tmp_path / "nope")
    assert "--images must be at least 1" in error("--images", 0)
    assert "--threshold must be in (0, 1]" in error("--threshold", 2)
    # An official checkpoint carries no config of this project's: the user is told what to pass.
    official = data_dir / "conformance" / "official_tiny_patch.pth.tar"
    assert "carries no model config: pass --arch or --model-config" in error(checkpoint=official)
    # A file that is not an image, named as one, is named in the error.
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.new("RGB", (40, 40)).save(broken / "a.png")
    (broken / "b.png").write_text("not a picture")
    assert "b.png" in error(data=broken)


def test_images_are_picked_evenly_over_the_sorted_files() -> None:
    files = [Path(f"{c}/{i}.png") for c in "abcd" for i in range(5)]  # 4 classes of 5
    picked = pick_evenly(files, 4)
    assert [p.parent.name for p in picked] == ["a", "b", "c", "d"]
    assert pick_evenly(files, 100) == files
    assert len(set(pick_evenly(files, 19))) == 19


def test_compare_writes_a_table_and_a_plot(
    run_deepvit: Any, trained_style_checkpoint: Path, small_shapes: Path, tmp_path: Path, data_dir: Path
) -> None:
    plain, reatt = tmp_path / "plain", tmp_path / "reatt"
    val = small_shapes / "val"
    common = ("--data", val, "--images", 4)
    assert analyze(run_deepvit, "--random-init", "--model-config", data_dir / "tiny_shapes_plain.json",
                   *common, "--output", plain).code == 0  # fmt: skip
    assert analyze(run_deepvit, "--checkpoint", trained_style_checkpoint, *common, "--output", reatt).code == 0
    results = tmp_path / "results"
    code = compare.main(
        ["--output", str(results), "--name", "pair", f"plain={plain / 'report.json'}", f"re={reatt / 'report.json'}"]
    )
    assert code == 0
    text = (results / "pair.md").read_text()
    head = text.splitlines()[0]
    assert "plain (softmax = applied)" in head
    assert "re (applied)" in head
    assert "re (softmax, before mixing)" in head
    assert "| 1 → 2 (M/M → M/R) |" in text
    assert "similar blocks (M > 0.9)" in text
    assert "Weights after training epoch" not in text  # the random-init model has no epoch
    assert (results / "pair.png").read_bytes()[:8] == PNG_MAGIC
    (tmp_path / "bad.json").write_text("{}")
    assert compare.main(["--output", str(results), f"x={tmp_path / 'bad.json'}"]) == 2
