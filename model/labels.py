"""Class names: the ImageNet-1k names ship with the project; other class counts come from a file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

IMAGENET_CLASSES = 1000


class LabelsError(ValueError):
    pass


def imagenet_labels() -> list[str]:
    # The 1000 ImageNet-1k class names in class-index order (as torchvision's weight metadata lists them).
    text = resources.files("deepvit.model").joinpath("data/imagenet1k_labels.txt").read_text(encoding="utf-8")
    return text.splitlines()


def read_labels(path: str | Path) -> list[str]:
    """One class name per line, in class-index order; blank lines at the end are ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelsError(f"cannot read labels file {path}: {exc}") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if not names:
        raise LabelsError(f"labels file {path} is empty; it needs one class name per line")
    if any(not n for n in names):
        raise LabelsError(f"labels file {path} has an empty line inside; every class needs a name")
    return names


def default_labels(num_classes: int) -> list[str]:
    if num_classes == IMAGENET_CLASSES:
        return imagenet_labels()
    return [f"class_{i}" for i in range(num_classes)]
