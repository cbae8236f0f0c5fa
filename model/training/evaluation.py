"""Top-1 / top-5 on an image-folder set, of a checkpoint (PyTorch) or of an exported artifact (ONNX Runtime).

A checkpoint goes through the official evaluation transform (:func:`~.transforms.eval_transform`);
an artifact through the artifact contract's pixel path, which is the service's (decode as the user sees the
picture, shorter-side resize, centre crop, uint8 NHWC into the graph), with the preprocessing its own
metadata records. On the same folder both must
report the same top-1 when the export lost nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepvit.artifact import ArtifactError, PreprocessSpec
from deepvit.artifact.predictions import Scored, top_k
from deepvit.artifact.session import metadata_of, open_session, providers_for

from ..checkpoint import WeightsKind, class_names_of, model_from_checkpoint, read_checkpoint
from ..config import DeepViTConfig
from .folders import class_index_map, image_folder, remap_targets
from .topk import TopK, evaluate_model
from .transforms import artifact_input, eval_transform


class EvaluationError(Exception):
    """An artifact or data set that cannot be evaluated; the message says why."""


@dataclass
class EvalReport:
    source: str  # "checkpoint" or "artifact"
    path: str
    weights: str
    counts: TopK
    labels: list[str] = field(default_factory=list)  # the model's class names
    files: list[str] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)  # each file's class index in the model
    # Each file's top 5 (softmax scores, as /classify answers), kept rather than its logits: 20 MB, not 200,
    # for ImageNet's validation set.
    predictions: list[list[Scored]] = field(default_factory=list)

    def add_logits(self, logits: np.ndarray) -> None:
        for row in logits:
            self.predictions.append(top_k(row, min(5, len(self.labels)), self.labels))

    @property
    def predicted(self) -> list[str]:
        """The top-1 label of each file, in file order."""
        return [p[0]["label"] for p in self.predictions]

    def prediction_rows(self) -> Iterator[dict[str, Any]]:
        """One row per file for ``--predictions``: the top-k as ``/classify`` answers them (softmax scores)."""
        for path, target, top in zip(self.files, self.targets, self.predictions, strict=True):
            yield {"path": path, "target": self.labels[target], "target_id": target, "predictions": top}

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
    obj = read_checkpoint(checkpoint)
    model = model_from_checkpoint(obj, checkpoint, cfg, arch, weights)
    cfg = model.cfg
    device = device or torch.device("cpu")
    model.to(device)
    names = class_names_of(obj, cfg.num_classes)
    ds = image_folder(data, eval_transform(cfg.preprocessing))
    index_map = class_index_map(ds.classes, names, cfg.num_classes)
    labels = names or [str(i) for i in range(cfg.num_classes)]
    files, targets = [p for p, _ in ds.samples], [index_map[t] for _, t in ds.samples]
    report = EvalReport("checkpoint", str(checkpoint), weights, TopK(), labels, files, targets)
    batches = ((x, remap_targets(y, index_map)) for x, y in _loader(ds, batch_size, workers))
    report.counts = evaluate_model(model, batches, device, on_logits=report.add_logits)
    return report


class ArtifactImages(torch.utils.data.Dataset[tuple[np.ndarray, int]]):
    def __init__(self, folder: Any, pre: PreprocessSpec) -> None:
        self.samples: list[tuple[str, int]] = folder.samples
        self.loader = folder.loader
        self.pre = pre

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, target = self.samples[i]
        return artifact_input(self.loader(path), self.pre), target


def evaluate_artifact(
    artifact: str | Path, data: str | Path, batch_size: int = 64, workers: int = 2, provider: str = "cpu"
) -> EvalReport:
    """Top-k of an exported ``model.onnx`` through ONNX Runtime, with the service's pixel path."""
    try:
        session = open_session(artifact, providers_for(provider))
        meta = metadata_of(session, str(artifact))
    except ArtifactError as exc:
        raise EvaluationError(exc.message) from None
    labels = list(meta.labels)
    folder = image_folder(data, None)
    index_map = class_index_map(folder.classes, labels, len(labels))
    files, targets = [p for p, _ in folder.samples], [index_map[t] for _, t in folder.samples]
    report = EvalReport("artifact", str(artifact), meta.weights, TopK(), labels, files, targets)
    input_name = session.get_inputs()[0].name
    for images, batch_targets in _loader(ArtifactImages(folder, meta.preprocess), batch_size, workers):
        logits = np.asarray(session.run(None, {input_name: images.numpy()})[0], dtype=np.float32)
        report.counts.add(torch.from_numpy(logits), remap_targets(batch_targets, index_map))
        report.add_logits(logits)
    return report
