"""The images ``deepvit analyze`` runs on: every image file under a folder (sorted, searched recursively),
an even spread of them, decoded as the service decodes an upload and put through the official evaluation
transform."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deepvit.artifact import PreprocessSpec

from ..training.folders import IMAGE_EXTENSIONS, DatasetError, is_image_file, load_rgb
from ..training.transforms import eval_transform


def pick_evenly(files: list[Path], n: int) -> list[Path]:
    """``n`` of the sorted ``files`` spread evenly over them (all when there are fewer): a folder per class,
    in sorted order, then contributes in proportion to its size rather than the first class filling ``n``."""
    if n >= len(files):
        return list(files)
    return [files[i * len(files) // n] for i in range(n)]


class ImageFiles(torch.utils.data.Dataset[Tensor]):
    def __init__(self, files: list[Path], pre: PreprocessSpec) -> None:
        self.files = files
        self.transform = eval_transform(pre)

    @staticmethod
    def under(root: str | Path) -> list[Path]:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root} is not a directory of images")
        files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p.name))
        if not files:
            raise DatasetError(f"no images under {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        return files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        image: Tensor = self.transform(load_rgb(self.files[i]))
        return image

    def loader(self, batch_size: int, workers: int) -> Any:
        return torch.utils.data.DataLoader(self, batch_size=batch_size, shuffle=False, num_workers=workers)
