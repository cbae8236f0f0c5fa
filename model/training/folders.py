"""Image folders (``root/<class>/<image>``): discovery, the train/val split, and how folder classes map onto
a model's classes. Every file is decoded by the artifact contract's pixel path
(:func:`deepvit.artifact.pixels.load_file`), exactly as an upload of the same bytes is by the service.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from deepvit.artifact import ImageError
from deepvit.artifact.pixels import load_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class DatasetError(ValueError):
    """A data directory that cannot be used as an image-folder dataset; the message says what to fix."""


def load_rgb(path: str | Path) -> Image.Image:
    """Decode as the service does (EXIF orientation, first frame, 16-bit scaled, palette transparency)."""
    try:
        return load_file(path)
    except ImageError as exc:
        raise DatasetError(f"{path}: {exc.message}") from None


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
