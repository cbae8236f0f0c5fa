"""Image-folder datasets and the transforms of the official recipe (timm), plus the service's preprocessing.

Three pixel paths, kept in one place so that they cannot drift apart:
- training: timm's ``create_transform`` with the DeiT/DeepViT recipe (random-resized crop, flip,
  RandAugment, random erasing), bicubic, mean = std = 0.5;
- evaluation of a checkpoint: timm's evaluation transform, i.e. the shorter side to int(size / crop_pct)
  with bicubic, centre crop, normalise (the official evaluation transform);
- evaluation of an artifact: :func:`resize_and_crop` with Pillow, then uint8 NHWC into the graph, which
  normalises itself. It uses torchvision's rounding for the resized side and the crop offset, so both
  evaluation paths see the same pixels (a test holds them to that).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from .config import Preprocessing
from .settings import AugmentRecipe

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class DatasetError(ValueError):
    """A data directory that cannot be used as an image-folder dataset; the message says what to fix."""


def load_rgb(path: str | Path) -> Image.Image:
    """Decode as the service does: honour the EXIF orientation, then RGB."""
    with Image.open(path) as f:
        return ImageOps.exif_transpose(f).convert("RGB")


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # no bit kept: black, as Pillow itself used to return
    return ImageOps.posterize(img, bits_to_keep)


def _fix_timm_posterize() -> None:
    """timm's RandAugment ``inc1`` posterize keeps 4 - int(4 * m / 10) bits, i.e. 0 bits whenever the
    sampled magnitude reaches 10 (m9 with mstd0.5 does, a few % of the time). Recent Pillow refuses 0 bits
    with a ValueError that kills the data loader mid-epoch; older Pillow returned a black image. Swap in
    that behaviour for the posterize ops (the op objects bind the function when built, so this must run
    before create_transform; it is idempotent)."""
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if auto_augment.NAME_TO_OP.get(name) is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize


def train_transform(pre: Preprocessing, aug: AugmentRecipe) -> Callable[[Image.Image], Tensor]:
    from timm.data import create_transform

    if aug.auto_augment:
        _fix_timm_posterize()

    tf: Callable[[Image.Image], Tensor] = create_transform(
        input_size=pre.crop_size,
        is_training=True,
        scale=aug.scale,
        ratio=aug.ratio,
        hflip=aug.hflip,
        color_jitter=aug.color_jitter,
        auto_augment=aug.auto_augment,
        interpolation=aug.interpolation,
        re_prob=aug.reprob,
        re_mode=aug.remode,
        re_count=aug.recount,
        mean=pre.mean,
        std=pre.std,
    )
    return tf


def eval_transform(pre: Preprocessing) -> Callable[[Image.Image], Tensor]:
    """The official evaluation transform (timm): resize shorter side to int(size / crop_pct), centre crop."""
    from timm.data import create_transform

    tf: Callable[[Image.Image], Tensor] = create_transform(
        input_size=pre.crop_size,
        is_training=False,
        crop_pct=pre.crop_pct,
        interpolation=pre.interpolation,
        mean=pre.mean,
        std=pre.std,
    )
    return tf


def resize_and_crop(img: Image.Image, resize_shorter: int, crop_size: int, interpolation: str) -> Image.Image:
    """The service's preprocessing up to the graph input: shorter side to ``resize_shorter``, centre crop.

    Sizes and offsets follow torchvision's ``Resize(int)`` and ``CenterCrop`` exactly (long side
    int(shorter * long / short); offset int(round((side - crop) / 2))), so an artifact evaluated this way
    sees the pixels the checkpoint saw through :func:`eval_transform`.
    """
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(resize_shorter * long / short)
    size = (resize_shorter, new_long) if w <= h else (new_long, resize_shorter)
    if size != (w, h):
        img = img.resize(size, PIL_FILTERS[interpolation])
    w, h = img.size
    top = round((h - crop_size) / 2.0)  # Python's round, as torchvision (halves to even)
    left = round((w - crop_size) / 2.0)
    return img.crop((left, top, left + crop_size, top + crop_size))


def artifact_input(img: Image.Image, pre: Preprocessing) -> np.ndarray:
    """uint8 (crop, crop, 3) RGB, the artifact's per-image input."""
    crop = resize_and_crop(img, pre.resize_shorter, pre.crop_size, pre.interpolation)
    return np.array(crop, dtype=np.uint8)  # a writable copy: torch warns on read-only arrays


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def image_folder(root: str | Path, transform: Callable[[Image.Image], Any] | None) -> Any:
    """``root/<class>/<image>``: torchvision's ImageFolder, decoding with :func:`load_rgb`."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory; expected one sub-folder of images per class")
    try:
        return ImageFolder(str(root), transform=transform, loader=load_rgb, is_valid_file=is_image_file)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DatasetError(f"{root}: {exc}; expected {root}/<class name>/<image file>") from None


def split_dirs(data: str | Path) -> tuple[Path, Path]:
    """``DATA/train`` and ``DATA/val``, which must hold the same class folders."""
    data = Path(data)
    train, val = data / "train", data / "val"
    missing = [str(p) for p in (train, val) if not p.is_dir()]
    if missing:
        raise DatasetError(
            f"missing {', '.join(missing)}: --data must hold train/<class>/* and val/<class>/* (image folders)"
        )
    train_classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    val_classes = sorted(p.name for p in val.iterdir() if p.is_dir())
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DatasetError(f"train and val class folders differ (only in train: {only_train}; only in val: {only_val})")
    return train, val


def class_index_map(folder_classes: list[str], model_classes: list[str] | None, num_classes: int) -> list[int]:
    """Model class index for each folder class: by name when the model knows the names, else by order, which
    needs one folder per class (sorted folder names in class-index order, as ImageNet's synsets are)."""
    if model_classes is not None and set(folder_classes) <= set(model_classes):
        return [model_classes.index(name) for name in folder_classes]
    if num_classes != len(folder_classes):
        why = (
            "and the folder names are not among the model's labels"
            if model_classes is not None
            else "and the checkpoint carries no class names to match the folders by"
        )
        raise DatasetError(
            f"the data has {len(folder_classes)} class folders but the model has {num_classes} classes, {why}; "
            "give one folder per class, their sorted names in class-index order"
        )
    return list(range(len(folder_classes)))


def remap_targets(targets: Tensor, index_map: list[int]) -> Tensor:
    return torch.as_tensor(index_map, dtype=torch.long)[targets]
