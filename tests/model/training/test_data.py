"""Datasets and pixel paths: the synthetic set, the training transform, and the two evaluation paths
(checkpoint: timm's official eval transform; artifact: the contract's Pillow resize and crop) agreeing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepvit.artifact import PreprocessSpec
from deepvit.model.training.folders import DatasetError, class_index_map, image_folder, load_rgb, split_dirs
from deepvit.model.training.settings import AugmentRecipe
from deepvit.model.training.synthetic import CLASSES, generate
from deepvit.model.training.transforms import artifact_input, eval_transform, train_transform


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_synthetic_set_layout_and_reproducibility(tmp_path: Path) -> None:
    train, val = generate(tmp_path / "a", train_per_class=3, val_per_class=2, seed=7)
    assert sorted(p.name for p in train.iterdir()) == list(CLASSES) == sorted(p.name for p in val.iterdir())
    assert 8 <= len(CLASSES) <= 10
    assert all(len(list((train / c).glob("*.png"))) == 3 for c in CLASSES)
    generate(tmp_path / "b", train_per_class=3, val_per_class=2, seed=7)
    generate(tmp_path / "c", train_per_class=3, val_per_class=2, seed=8)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # same seed, same pixels
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    sizes = {load_rgb(p).size for p in train.rglob("*.png")}
    assert any(w != h for w, h in sizes), "some images must be non-square so that resize-then-crop is exercised"


def _sample_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (72, 64), (64, 80), (97, 61), (35, 35), (300, 200)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.mark.parametrize("crop_pct", [0.9, 1.0, 0.875])
def test_artifact_path_sees_the_pixels_of_the_official_eval_transform(crop_pct: float) -> None:
    pre = PreprocessSpec.from_crop_pct(32, crop_pct)
    official = eval_transform(pre)
    for img in _sample_images():
        expected = official(img)  # (3, 32, 32) float, normalised
        crop = artifact_input(img, pre)  # (32, 32, 3) uint8, what the graph receives
        assert crop.dtype == np.uint8
        assert crop.shape == (32, 32, 3)
        # The graph's own normalisation, as model.export.ImageClassifier does it.
        mean = torch.tensor(pre.mean).view(3, 1, 1)
        std = torch.tensor(pre.std).view(3, 1, 1)
        got = (torch.from_numpy(crop).permute(2, 0, 1).float() / 255.0 - mean) / std
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_load_rgb_applies_exif_orientation_and_converts(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    img.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    Image.new("L", (10, 10), 128).save(tmp_path / "gray.png")
    assert load_rgb(tmp_path / "rotated.jpg").size == (20, 40)
    gray = load_rgb(tmp_path / "gray.png")
    assert gray.mode == "RGB"
    assert gray.getpixel((0, 0)) == (128, 128, 128)


def test_training_transform_is_the_official_recipe_and_survives_posterize_at_magnitude_10() -> None:
    pre = PreprocessSpec.from_crop_pct(32, 0.9)
    tf = train_transform(pre, AugmentRecipe())
    names = " ".join(type(t).__name__ for t in tf.transforms)
    for expected in ("RandomResizedCrop", "RandomHorizontalFlip", "RandAugment", "Normalize", "RandomErasing"):
        assert expected in names
    assert tf(_sample_images()[0]).shape == (3, 32, 32)
    # At magnitude 10 the recipe's increasing posterize keeps 0 bits, which recent Pillow refuses with a
    # ValueError; the loader must get the black image older Pillow returned instead of dying mid-epoch.
    from timm.data.auto_augment import AugmentOp

    img = _sample_images()[0]
    out = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(img)
    assert out.size == img.size
    assert not np.asarray(out).any()


def test_split_dirs_explains_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="train/<class>"):
        split_dirs(tmp_path)
    for split, classes in (("train", ["a", "b"]), ("val", ["a", "c"])):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"only in train: \['b'\]; only in val: \['c'\]"):
        split_dirs(tmp_path)
    with pytest.raises(DatasetError, match="one sub-folder of images per class"):
        image_folder(tmp_path / "missing", None)
    with pytest.raises(DatasetError, match="<class name>/<image file>"):
        image_folder(tmp_path / "train", None)  # class folders without images


def test_class_index_map_by_name_then_by_order() -> None:
    assert class_index_map(["b", "c"], ["a", "b", "c"], 3) == [1, 2]
    assert class_index_map(["x", "y"], ["class_0", "class_1"], 2) == [0, 1]
    assert class_index_map(["x", "y"], None, 2) == [0, 1]
    with pytest.raises(DatasetError, match="carries no class names"):  # a subset scored by order: nonsense
        class_index_map(["x", "y"], None, 1000)
    with pytest.raises(DatasetError, match="2 class folders but the model has 3"):
        class_index_map(["x", "y"], ["a", "b", "c"], 3)
