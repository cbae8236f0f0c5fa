"""Top-1 / top-5 on an image-folder set, of a checkpoint (PyTorch) or of an exported artifact (ONNX Runtime).

A checkpoint goes through the official evaluation transform (:func:`model.datasets.eval_transform`); an
artifact through the service's path (Pillow decode with EXIF orientation, shorter-side resize, centre crop,
uint8 NHWC into the graph) with the preprocessing its own metadata records. On the same folder both must
report the same top-1 when the export lost nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import (
    WeightsKind,
    class_names_of,
    head_classes,
    load_weights,
    read_checkpoint,
    weights_of,
)
from .config import ConfigError, DeepViTConfig, Preprocessing
from .datasets import PIL_FILTERS, artifact_input, class_index_map, eval_transform, image_folder, remap_targets


class EvaluationError(Exception):
    """An artifact or data set that cannot be evaluated; the message says why."""


@dataclass
class TopK:
    """Running counts; sums over shards and ranks add up exactly."""

    correct1: float = 0.0
    correct5: float = 0.0
    count: float = 0.0
    loss_sum: float = 0.0

    def add(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Count one batch; returns the top-1 predictions."""
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # (B, k)
        hits = top.eq(targets[:, None])
        self.correct1 += float(hits[:, 0].sum())
        self.correct5 += float(hits.any(dim=1).sum())
        self.count += float(targets.numel())
        self.loss_sum += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        return top[:, 0]

    def as_list(self) -> list[float]:
        return [self.correct1, self.correct5, self.count, self.loss_sum]

    @classmethod
    def from_list(cls, v: list[float]) -> TopK:
        return cls(*v)

    @property
    def top1(self) -> float:
        return self.correct1 / self.count if self.count else 0.0

    @property
    def top5(self) -> float:
        return self.correct5 / self.count if self.count else 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else 0.0


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    amp: bool = False,
    predictions: list[int] | None = None,
) -> TopK:
    """Counts of ``model`` (eval mode) over ``batches``; appends top-1 predictions when a list is given."""
    was_training = model.training
    model.eval()
    counts = TopK()
    try:
        for images, targets in batches:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
                logits = model(images)
            pred = counts.add(logits.float(), targets)
            if predictions is not None:
                predictions.extend(int(p) for p in pred.cpu())
    finally:
        model.train(was_training)
    return counts


@dataclass
class EvalReport:
    source: str  # "checkpoint" or "artifact"
    path: str
    weights: str
    counts: TopK
    files: list[str] = field(default_factory=list)
    predicted: list[str] = field(default_factory=list)  # top-1 label per file, in file order

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "path": self.path,
            "weights": self.weights,
            "images": int(self.counts.count),
            "top1": self.counts.top1,
            "top5": self.counts.top5,
        }


def _loader(dataset: Any, batch_size: int, workers: int) -> Any:
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    cfg: DeepViTConfig | None = None,
    arch: str = "custom",
    weights: WeightsKind = "state_dict",
    batch_size: int = 64,
    workers: int = 2,
    device: torch.device | None = None,
) -> EvalReport:
    """Top-k of a checkpoint's weights; ``cfg`` defaults to the config this project's checkpoints carry."""
    from .net import DeepViT

    obj = read_checkpoint(checkpoint)
    sd = weights_of(obj, weights)
    if cfg is None:
        saved = obj.get("config") if isinstance(obj, dict) else None
        if not isinstance(saved, dict):
            raise ConfigError(f"{checkpoint} carries no model config: pass --arch or --model-config")
        cfg = DeepViTConfig.from_dict(saved)
        arch = str(obj.get("arch", arch))
    classes = head_classes(sd)
    if classes is not None:
        cfg = cfg.replace(num_classes=classes)
    model = DeepViT(cfg).eval()
    load_weights(model, sd, arch)
    device = device or torch.device("cpu")
    model.to(device)
    names = class_names_of(obj, cfg.num_classes)
    ds = image_folder(data, eval_transform(cfg.preprocessing))
    index_map = class_index_map(ds.classes, names, cfg.num_classes)
    labels = names or [str(i) for i in range(cfg.num_classes)]
    preds: list[int] = []
    batches = ((x, remap_targets(y, index_map)) for x, y in _loader(ds, batch_size, workers))
    counts = evaluate_model(model, batches, device, predictions=preds)
    files = [p for p, _ in ds.samples]
    return EvalReport("checkpoint", str(checkpoint), weights, counts, files, [labels[i] for i in preds])


class _ArtifactImages(torch.utils.data.Dataset[tuple[np.ndarray, int]]):
    def __init__(self, folder: Any, pre: Preprocessing) -> None:
        self.samples: list[tuple[str, int]] = folder.samples
        self.loader = folder.loader
        self.pre = pre

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, target = self.samples[i]
        return artifact_input(self.loader(path), self.pre), target


def artifact_preprocessing(meta: dict[str, str]) -> Preprocessing:
    """The preprocessing an artifact records about itself (what the service applies)."""
    try:
        pre = json.loads(meta["deepvit.preprocessing"])
        p = Preprocessing(
            crop_size=int(pre["crop_size"]),
            crop_pct=float(pre["crop_pct"]),
            interpolation=pre["interpolation"],
            mean=tuple(pre["mean"]),
            std=tuple(pre["std"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise EvaluationError(f"the artifact's preprocessing metadata is malformed ({exc!r})") from None
    if p.interpolation not in PIL_FILTERS:
        raise EvaluationError(
            f"the artifact's preprocessing names interpolation {p.interpolation!r}; known: {', '.join(PIL_FILTERS)}"
        )
    if p.resize_shorter != int(pre["resize_shorter"]):
        # The metadata's explicit size is what the service uses; keep the two from silently disagreeing.
        raise EvaluationError(f"the artifact's preprocessing is inconsistent: {pre}")
    return p


def evaluate_artifact(
    artifact: str | Path, data: str | Path, batch_size: int = 64, workers: int = 2, provider: str = "cpu"
) -> EvalReport:
    """Top-k of an exported ``model.onnx`` through ONNX Runtime, with the service's preprocessing."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    if not Path(artifact).is_file():
        raise EvaluationError(f"{artifact} does not exist or is not a file")
    try:
        session = ort.InferenceSession(str(artifact), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own unexported exception types
        raise EvaluationError(f"{artifact} is not a loadable ONNX model: {str(exc).splitlines()[0][:200]}") from None
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if "deepvit.preprocessing" not in meta or "deepvit.labels" not in meta:
        raise EvaluationError(f"{artifact} has no deepvit metadata; was it made by deepvit export?")
    labels = [str(x) for x in json.loads(meta["deepvit.labels"])]
    folder = image_folder(data, None)
    index_map = class_index_map(folder.classes, labels, len(labels))
    counts = TopK()
    preds: list[str] = []
    input_name = session.get_inputs()[0].name
    for images, targets in _loader(_ArtifactImages(folder, artifact_preprocessing(meta)), batch_size, workers):
        logits = torch.from_numpy(session.run(None, {input_name: images.numpy()})[0])
        top = counts.add(logits, remap_targets(targets, index_map))
        preds.extend(labels[int(i)] for i in top)
    files = [p for p, _ in folder.samples]
    return EvalReport("artifact", str(artifact), meta.get("deepvit.weights", "unknown"), counts, files, preds)
