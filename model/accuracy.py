"""The accuracy gate of every reduced precision (fp16, int8): its decisions on natural images.

Noise images, which the parity check uses, have small top-1 margins and say little about what a trained
model loses, so a reduced precision is held to the float32 PyTorch model on photographs: the real ones the
project ships (several views of each: the service's crop, smaller regions and their mirror images, all
through the contract's pixel path) and the calibration folder when one is given. The gate is top-1
agreement of at least 99% (recorded, but not enforced, for random initial weights, whose near-uniform
probabilities make decisions that mean nothing); beside it, the mean and the largest change |Δp| of the
probability of the reference's top-1 class (how much the reduced precision moves the score a caller sees
first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from deepvit.artifact import ArtifactError, PreprocessSpec
from deepvit.artifact.engines import REDUCED, Engine, host_engines
from deepvit.artifact.pixels import load_file, transform
from deepvit.artifact.session import CPU, Provider, open_session

from .parity import ParityError

MIN_TOP1_AGREEMENT = 0.99
# The photographs the project ships, in a checkout; an installed package has none and is given a folder.
PROJECT_PHOTOS = Path(__file__).resolve().parents[1] / "tests" / "data" / "photos"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".ppm")
# Regions of each shipped photo: the whole picture, then a 3x3 grid of regions at two smaller scales; each
# region also mirrored. 38 views per photo, 190 for the five shipped ones: over 100, so that one flipped
# decision is under 1% and the gate means something.
VIEW_SCALES = (0.75, 0.5)
VIEW_POSITIONS = (0.0, 0.5, 1.0)
MAX_FOLDER_IMAGES = 1000
BATCH = 32


class NoGateImagesError(ParityError):
    """A reduced precision was asked for without natural images to gate it on."""


@dataclass(frozen=True)
class GateImages:
    """uint8 (N, crop, crop, 3) inputs of the artifact, and where they came from (for the record)."""

    images: np.ndarray
    sources: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)


def image_files(folder: Path, limit: int = MAX_FOLDER_IMAGES) -> list[Path]:
    """Image files under ``folder`` (recursively, an image folder's class subfolders included), sorted."""
    if not folder.is_dir():
        raise NoGateImagesError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise NoGateImagesError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files[:limit]


def views(img: Image.Image, spec: PreprocessSpec) -> Iterator[np.ndarray]:
    """The photo's views, each through the contract's resize and centre crop (as ``/classify`` would see
    an upload of that region)."""
    w, h = img.size
    regions = [(0, 0, w, h)]
    for scale in VIEW_SCALES:
        rw, rh = round(w * scale), round(h * scale)
        for fy in VIEW_POSITIONS:
            for fx in VIEW_POSITIONS:
                left, top = round((w - rw) * fx), round((h - rh) * fy)
                regions.append((left, top, left + rw, top + rh))
    for box in regions:
        region = img.crop(box)
        yield transform(region, spec)
        yield transform(region.transpose(Image.Transpose.FLIP_LEFT_RIGHT), spec)


def _load(path: Path) -> Image.Image:
    try:
        return load_file(path)
    except ArtifactError as exc:
        raise NoGateImagesError(f"{path}: {exc.message}") from None
    except Exception as exc:  # an undecodable file (ImageError) is the folder's fault: say which one
        raise NoGateImagesError(f"{path} is not a readable image: {exc}") from None


def photo_views(folder: Path, spec: PreprocessSpec) -> GateImages:
    """Every view of every photograph in ``folder``."""
    files = image_files(folder)
    arrays = [view for path in files for view in views(_load(path), spec)]
    return GateImages(
        np.stack(arrays), (f"{len(files)} photographs of {folder.name}/, {len(arrays) // len(files)} views each",)
    )


def folder_images(folder: Path, spec: PreprocessSpec) -> GateImages:
    """The centre crop of every image under ``folder`` (at most MAX_FOLDER_IMAGES), as ``/classify`` sees it."""
    files = image_files(folder)
    return GateImages(np.stack([transform(_load(p), spec) for p in files]), (f"{len(files)} images of {folder.name}/",))


def gate_images(spec: PreprocessSpec, photos: Path | None, calibration: GateImages | None) -> GateImages:
    """The gate's images: views of the photographs in ``photos`` (the project's when None and present),
    and the calibration images when there are any."""
    parts = []
    photos = photos if photos is not None else (PROJECT_PHOTOS if PROJECT_PHOTOS.is_dir() else None)
    if photos is not None:
        parts.append(photo_views(photos, spec))
    if calibration is not None:
        parts.append(calibration)
    if not parts:
        raise NoGateImagesError(
            "a reduced precision is gated on natural images and none were found: give --gate-images DIR "
            "(photographs) or --calibration DIR"
        )
    return GateImages(np.concatenate([p.images for p in parts]), tuple(s for p in parts for s in p.sources))


@dataclass(frozen=True)
class AccuracyReport:
    precision: str
    images: int
    sources: tuple[str, ...]
    top1_agreement: float
    mean_abs_prob_diff: float
    max_abs_prob_diff: float
    provider: str
    engine: str = ""  # the engine that computed it, where not the provider's own (e.g. openvino-bf16)
    emulated: bool = False  # the engine's precision emulated on a CPU without it (the gate of a small model)

    @property
    def passed(self) -> bool:
        return self.top1_agreement >= MIN_TOP1_AGREEMENT

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "reference": "float32 PyTorch",
            "images": self.images,
            "sources": list(self.sources),
            "top1_agreement": self.top1_agreement,
            "mean_abs_prob_diff": self.mean_abs_prob_diff,
            "max_abs_prob_diff": self.max_abs_prob_diff,
            "provider": self.provider,
            **({"engine": self.engine, "emulated": self.emulated} if self.engine else {}),
            "gate": f"top-1 agreement >= {MIN_TOP1_AGREEMENT} on natural images",
            "passed": self.passed,
        }

    def summary(self) -> str:
        return (
            f"{self.precision} on natural images: top-1 agreement {self.top1_agreement:.2%}, mean |dp| "
            f"{self.mean_abs_prob_diff:.2g} (max {self.max_abs_prob_diff:.2g}) over {self.images} images "
            f"({self.engine or self.provider}{', emulated' if self.emulated else ''})"
        )


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def check_accuracy(
    reference: nn.Module,
    onnx_model: bytes | str,
    precision: str,
    images: GateImages,
    providers: Sequence[Provider] = CPU,
    engine: Engine | None = None,
    emulated: bool = False,
) -> AccuracyReport:
    """``reference`` (float32 PyTorch, taking the artifact's uint8 NHWC input) against the artifact, run by
    ONNX Runtime on ``providers`` (or on ``engine``, :mod:`deepvit.artifact.engines`): the provider or engine
    that will serve is the one whose figures count."""
    session = open_session(onnx_model, providers, engine=engine)
    name = session.get_inputs()[0].name
    reference.eval()
    agree, diffs = 0, []
    for start in range(0, len(images), BATCH):
        batch = images.images[start : start + BATCH]
        with torch.inference_mode():
            out = reference(torch.from_numpy(batch))
        want = (out[0] if isinstance(out, tuple) else out).float().numpy()  # the logits (an --explain reference
        # also returns the attention, which the parity gate holds to PyTorch)
        got = np.asarray(session.run(None, {name: batch})[0], dtype=np.float32)
        top = want.argmax(1)
        agree += int((got.argmax(1) == top).sum())
        rows = np.arange(len(top))
        diffs.append(np.abs(_softmax(got)[rows, top] - _softmax(want)[rows, top]))
    d = np.concatenate(diffs)
    return AccuracyReport(
        precision=precision,
        images=len(images),
        sources=images.sources,
        top1_agreement=agree / len(images),
        mean_abs_prob_diff=float(d.mean()),
        max_abs_prob_diff=float(d.max()),
        provider=str(session.get_providers()[0]),
        engine=engine.name if engine is not None else "",
        emulated=emulated,
    )


EngineGates = Literal["auto", "all", "none"]


def check_engines(
    reference: nn.Module,
    onnx_model: bytes | str,
    images: GateImages | None,
    which: EngineGates = "auto",
    log: Callable[[str], None] = print,
    enforced: bool = True,
) -> dict[str, Any]:
    """The gate of every reduced-precision engine (:mod:`deepvit.artifact.engines`) that could compute this
    float32 graph, run on that engine: what ``deepvit.engine_gates`` records, by engine name. ``auto``: the
    engines this host computes natively; ``all``: emulated ones too (bf16 on a CPU without it: some 20 times
    slower than float32, for a small model); ``none``: no engine gate (such an engine is then not used).
    ``enforced=False`` (random weights): a failure is recorded and said, and the service still uses it."""
    if which == "none":
        return {}
    native = host_engines()
    host = host_engines(emulated=which == "all")
    out: dict[str, Any] = {}
    for engine in REDUCED:
        if engine not in host.offered:
            log(f"{engine.name} not gated here: {host.absent.get(engine.name, 'not offered')}")
            continue
        if images is None:
            log(f"{engine.name} not gated: no natural images (give --gate-images DIR); it will not be used")
            continue
        emulated = engine not in native.offered
        report = check_accuracy(reference, onnx_model, engine.precision, images, engine=engine, emulated=emulated)
        verdict = "passed" if report.passed else "FAILED (the engine will not compute this artifact)"
        if not report.passed and not enforced:
            verdict = "fails, not enforced: random weights (recorded)"
        log(f"{engine.name} gate {verdict}: {report.summary()}")
        out[engine.name] = report.to_dict()
    return out
