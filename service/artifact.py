"""Read and validate a ``model.onnx`` artifact's self-description (its ``deepvit.*`` metadata_props).

The service needs no other file: labels, preprocessing and provenance all come from here. Anything
missing or inconsistent is an ``ArtifactError`` naming the field, raised before a session is served.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ArtifactError

SUPPORTED_SCHEMAS = {"1"}


@dataclass(frozen=True)
class PreprocessSpec:
    resize_shorter: int
    crop_size: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class ArtifactMetadata:
    name: str
    arch: str
    num_classes: int
    labels: tuple[str, ...]
    preprocess: PreprocessSpec
    weights: str  # state_dict | ema | random_init
    precision: str  # fp32 | fp16
    checkpoint_sha256: str
    config: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    exported_at: str = ""

    @property
    def untrained(self) -> bool:
        return self.weights == "random_init"

    def to_public_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "arch": self.arch,
            "num_classes": self.num_classes,
            "weights": self.weights,
            "untrained": self.untrained,
            "precision": self.precision,
            "checkpoint_sha256": self.checkpoint_sha256 or None,
            "preprocessing": {
                "resize_shorter": self.preprocess.resize_shorter,
                "crop_size": self.preprocess.crop_size,
                "interpolation": self.preprocess.interpolation,
                "mean": list(self.preprocess.mean),
                "std": list(self.preprocess.std),
            },
            "parity": self.parity,
            "versions": self.versions,
            "exported_at": self.exported_at,
            "config": self.config,
        }


def _json(meta: dict[str, str], key: str, source: str) -> Any:
    if key not in meta:
        raise ArtifactError(f"{source}: metadata field {key!r} is missing; re-export with deepvit export")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{source}: metadata field {key!r} is not valid JSON ({exc})") from None


def parse_metadata(meta: dict[str, str], source: str = "artifact") -> ArtifactMetadata:
    schema = meta.get("deepvit.schema")
    if schema is None:
        raise ArtifactError(
            f"{source} carries no deepvit metadata: it was not made by deepvit export, which records the "
            "labels and preprocessing the service needs"
        )
    if schema not in SUPPORTED_SCHEMAS:
        raise ArtifactError(f"{source}: metadata schema {schema!r} is not supported (this service reads 1)")
    labels = _json(meta, "deepvit.labels", source)
    pre = _json(meta, "deepvit.preprocessing", source)
    try:
        num_classes = int(meta["deepvit.num_classes"])
        spec = PreprocessSpec(
            resize_shorter=int(pre["resize_shorter"]),
            crop_size=int(pre["crop_size"]),
            interpolation=str(pre["interpolation"]),
            mean=tuple(float(v) for v in pre["mean"]),
            std=tuple(float(v) for v in pre["std"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{source}: malformed preprocessing or class count in metadata ({exc!r})") from None
    if not isinstance(labels, list) or len(labels) != num_classes:
        raise ArtifactError(
            f"{source}: {len(labels) if isinstance(labels, list) else 'no'} labels for {num_classes} classes"
        )
    if spec.interpolation not in ("bicubic", "bilinear"):
        raise ArtifactError(f"{source}: interpolation {spec.interpolation!r} is not supported")
    if not 0 < spec.crop_size <= spec.resize_shorter:
        raise ArtifactError(f"{source}: crop {spec.crop_size} must be positive and at most {spec.resize_shorter}")
    return ArtifactMetadata(
        name=meta.get("deepvit.name", ""),
        arch=meta.get("deepvit.arch", "custom"),
        num_classes=num_classes,
        labels=tuple(str(label) for label in labels),
        preprocess=spec,
        weights=meta.get("deepvit.weights", "unknown"),
        precision=meta.get("deepvit.precision", "fp32"),
        checkpoint_sha256=meta.get("deepvit.checkpoint_sha256", ""),
        config=_json(meta, "deepvit.config", source) if "deepvit.config" in meta else {},
        parity=_json(meta, "deepvit.parity", source) if "deepvit.parity" in meta else {},
        versions=_json(meta, "deepvit.versions", source) if "deepvit.versions" in meta else {},
        exported_at=meta.get("deepvit.exported_at", ""),
    )


def read_metadata(path: str | Path) -> ArtifactMetadata:
    """Read metadata through ONNX Runtime (the service's only ONNX dependency) without running the graph."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist or is not a file")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own unexported exception types
        raise ArtifactError(f"{path} is not a loadable ONNX model: {str(exc).splitlines()[0][:200]}") from None
    return parse_metadata(dict(session.get_modelmeta().custom_metadata_map), str(path))
