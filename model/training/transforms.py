"""The pixel transforms of the training side: the official recipe's (timm) for training and for evaluating
a checkpoint, and the artifact contract's for evaluating an artifact.

- training: timm's ``create_transform`` with the DeiT/DeepViT recipe (random-resized crop, flip,
  RandAugment, random erasing), bicubic, mean = std = 0.5;
- evaluation of a checkpoint: timm's evaluation transform, i.e. the shorter side to int(size / crop_pct)
  with bicubic, centre crop, normalise (the official evaluation transform);
- evaluation of an artifact: the contract's :func:`~deepvit.artifact.pixels.transform`, then uint8 NHWC into
  the graph, which normalises itself: exactly what ``/classify`` computes. It follows torchvision's rounding
  for the resized side and the crop offset, so both evaluation paths see the same pixels (a test holds them
  to that).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from torch import Tensor

from deepvit.artifact import PreprocessSpec
from deepvit.artifact.pixels import transform

from .settings import AugmentRecipe


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


def train_transform(pre: PreprocessSpec, aug: AugmentRecipe) -> Callable[[Image.Image], Tensor]:
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


def eval_transform(pre: PreprocessSpec) -> Callable[[Image.Image], Tensor]:
    """The official evaluation transform (timm): resize shorter side to int(size / crop_pct), centre crop."""
    from timm.data import create_transform

    tf: Callable[[Image.Image], Tensor] = create_transform(
        input_size=pre.crop_size,
        is_training=False,
        crop_pct=pre.effective_crop_pct,
        interpolation=pre.interpolation,
        mean=pre.mean,
        std=pre.std,
    )
    return tf


def artifact_input(img: Image.Image, pre: PreprocessSpec) -> np.ndarray:
    """uint8 (crop, crop, 3) RGB, the artifact's per-image input: the contract's transform, as the service."""
    return np.array(transform(img, pre), dtype=np.uint8)  # a writable copy: torch warns on read-only arrays
