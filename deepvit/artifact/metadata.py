"""The artifact's self-description: one typed object, written into ``metadata_props`` by export and parsed
from there by everyone else.

Schema 2 keys (all strings; JSON where the value is structured):

    deepvit.schema            "2" (schema 1 is schema 2 without ``deepvit.outputs``: logits only)
    deepvit.name, .arch       the model's name and architecture ("custom" for a config file)
    deepvit.config            the network's configuration (JSON, the official constructor's terms)
    deepvit.num_classes       the width of the logits
    deepvit.labels            one name per class (JSON list)
    deepvit.preprocessing     the pixel path's parameters (JSON, :class:`PreprocessSpec`)
    deepvit.weights           state_dict | ema | random_init
    deepvit.checkpoint_sha256 the source checkpoint's digest ("" for random weights)
    deepvit.precision         fp32 | fp16 | int8
    deepvit.parity            the export's parity figures (JSON; for int8, of the float32 graph it quantized)
    deepvit.accuracy          a reduced precision's gate on natural images (JSON; absent for fp32 and in
                              artifacts exported before the gate, which still load)
    deepvit.engine_gates      the gate of each reduced-precision engine that computes this graph (JSON, by engine
                              name, e.g. ``openvino-bf16``; the same figures as ``deepvit.accuracy``; absent
                              where none ran: such an engine is not used for the artifact)
    deepvit.quantization      how an int8 graph was quantized and calibrated, and its measured speed beside
                              float32 (JSON; absent unless int8)
    deepvit.versions          the tools that made it (JSON)
    deepvit.exported_at       ISO 8601, UTC
    deepvit.outputs           the graph's outputs (JSON): ``logits`` always; ``attention`` when exported with
                              ``--explain``, with its patch grid and its definition in words
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import ArtifactError

SCHEMA_VERSION = "2"
SUPPORTED_SCHEMAS = frozenset({"1", SCHEMA_VERSION})
INPUT_NAME = "image"  # uint8 [N, crop, crop, 3] RGB; the graph casts, normalises and transposes
OUTPUT_NAME = "logits"  # float32 [N, classes]
ATTENTION_NAME = "attention"  # float32 [N, grid * grid], optional (schema 2): rows sum to 1
INTERPOLATIONS = ("bicubic", "bilinear")


@dataclass(frozen=True)
class PreprocessSpec:
    """The evaluation transform (DeiT style, as the official code evaluates): the shorter side to
    ``resize_shorter``, a centre crop of ``crop_size``, then ``(x / 255 - mean) / std`` inside the graph."""

    crop_size: int
    resize_shorter: int
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    # How resize_shorter was derived, when it was: for the record, not part of what the pixels depend on.
    crop_pct: float | None = field(default=None, compare=False)

    @classmethod
    def from_crop_pct(
        cls,
        crop_size: int,
        crop_pct: float,
        interpolation: str = "bicubic",
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.5, 0.5, 0.5),
    ) -> PreprocessSpec:
        # timm's transforms_factory: scale_size = floor(img_size / crop_pct); 224 / 0.9 -> 248.
        return cls(crop_size, int(crop_size / crop_pct), interpolation, tuple(mean), tuple(std), crop_pct)

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ArtifactError(f"interpolation {self.interpolation!r} is not supported ({', '.join(INTERPOLATIONS)})")
        if not 0 < self.crop_size <= self.resize_shorter:
            raise ArtifactError(f"crop {self.crop_size} must be positive and at most {self.resize_shorter}")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise ArtifactError(f"mean {self.mean} and std {self.std} must be three values each, std positive")

    @property
    def effective_crop_pct(self) -> float:
        return self.crop_pct if self.crop_pct is not None else self.crop_size / self.resize_shorter

    def to_dict(self) -> dict[str, Any]:
        """The public form (``GET /models``, ``deepvit inspect``)."""
        return {
            "resize_shorter": self.resize_shorter,
            "crop_size": self.crop_size,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        crop_pct = d.get("crop_pct")
        return cls(
            crop_size=int(d["crop_size"]),
            resize_shorter=int(d["resize_shorter"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            crop_pct=None if crop_pct is None else float(crop_pct),
        )


@dataclass(frozen=True)
class AttentionSpec:
    """The optional ``attention`` output: one map per image over the ``grid`` x ``grid`` patches (row-major,
    summing to 1), computed in the graph as ``definition`` says."""

    grid: int
    definition: str

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise ArtifactError(f"attention grid {self.grid} must be positive")

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": "float32",
            "shape": ["N", self.grid * self.grid],
            "grid": self.grid,
            "definition": self.definition,
        }


@dataclass(frozen=True)
class ArtifactMetadata:
    name: str
    arch: str
    num_classes: int
    labels: tuple[str, ...]
    preprocess: PreprocessSpec
    weights: str  # state_dict | ema | random_init
    precision: str  # fp32 | fp16 | int8
    checkpoint_sha256: str
    config: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    engine_gates: dict[str, Any] = field(default_factory=dict)  # engine name -> its gate's figures
    versions: dict[str, str] = field(default_factory=dict)
    exported_at: str = ""
    attention: AttentionSpec | None = None  # the graph has the attention output
    schema: str = SCHEMA_VERSION

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
            "preprocessing": self.preprocess.to_dict(),
            "parity": self.parity,
            "accuracy": self.accuracy or None,
            "quantization": self.quantization or None,
            "engine_gates": self.engine_gates or None,
            "versions": self.versions,
            "exported_at": self.exported_at,
            "config": self.config,
            "outputs": self.outputs(),
        }

    def outputs(self) -> dict[str, Any]:
        """The graph's outputs by name, as ``deepvit.outputs`` records them."""
        out: dict[str, Any] = {OUTPUT_NAME: {"dtype": "float32", "shape": ["N", self.num_classes]}}
        if self.attention is not None:
            out[ATTENTION_NAME] = self.attention.to_dict()
        return out

    def to_props(self) -> dict[str, str]:
        """The ``metadata_props`` that export writes."""
        pre = self.preprocess.to_dict()
        pre["crop_pct"] = self.preprocess.effective_crop_pct
        pre.update({"input_layout": "NHWC", "input_dtype": "uint8", "color": "RGB"})
        props = {
            "deepvit.schema": self.schema,
            "deepvit.name": self.name,
            "deepvit.arch": self.arch,
            "deepvit.config": json.dumps(self.config),
            "deepvit.num_classes": str(self.num_classes),
            "deepvit.labels": json.dumps(list(self.labels)),
            "deepvit.preprocessing": json.dumps(pre),
            "deepvit.weights": self.weights,
            "deepvit.checkpoint_sha256": self.checkpoint_sha256,
            "deepvit.precision": self.precision,
            "deepvit.parity": json.dumps(self.parity),
            "deepvit.versions": json.dumps(self.versions),
            "deepvit.exported_at": self.exported_at,
            "deepvit.outputs": json.dumps(self.outputs()),
        }
        if self.accuracy:
            props["deepvit.accuracy"] = json.dumps(self.accuracy)
        if self.quantization:
            props["deepvit.quantization"] = json.dumps(self.quantization)
        if self.engine_gates:
            props["deepvit.engine_gates"] = json.dumps(self.engine_gates)
        return props

    @classmethod
    def from_props(cls, meta: dict[str, str], source: str = "artifact") -> ArtifactMetadata:
        """Parse and validate; anything missing or inconsistent is an ArtifactError naming the field."""
        schema = meta.get("deepvit.schema")
        if schema is None:
            raise ArtifactError(
                f"{source} carries no deepvit metadata: it was not made by deepvit export, which records the "
                "labels and preprocessing the service needs"
            )
        if schema not in SUPPORTED_SCHEMAS:
            raise ArtifactError(
                f"{source}: metadata schema {schema!r} is not supported (this version reads "
                f"{', '.join(sorted(SUPPORTED_SCHEMAS))})"
            )
        labels = _json(meta, "deepvit.labels", source)
        try:
            num_classes = int(meta["deepvit.num_classes"])
            spec = PreprocessSpec.from_dict(_json(meta, "deepvit.preprocessing", source))
        except ArtifactError as exc:
            raise ArtifactError(f"{source}: {exc.message}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{source}: malformed preprocessing or class count in metadata ({exc!r})") from None
        if not isinstance(labels, list) or len(labels) != num_classes:
            raise ArtifactError(
                f"{source}: {len(labels) if isinstance(labels, list) else 'no'} labels for {num_classes} classes"
            )
        return cls(
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
            accuracy=_json(meta, "deepvit.accuracy", source) if "deepvit.accuracy" in meta else {},
            quantization=_json(meta, "deepvit.quantization", source) if "deepvit.quantization" in meta else {},
            engine_gates=_json(meta, "deepvit.engine_gates", source) if "deepvit.engine_gates" in meta else {},
            versions=_json(meta, "deepvit.versions", source) if "deepvit.versions" in meta else {},
            exported_at=meta.get("deepvit.exported_at", ""),
            attention=_attention(meta, source) if schema != "1" else None,
            schema=schema,
        )


def _attention(meta: dict[str, str], source: str) -> AttentionSpec | None:
    outputs = _json(meta, "deepvit.outputs", source)
    spec = outputs.get(ATTENTION_NAME) if isinstance(outputs, dict) else None
    if spec is None:
        return None
    try:
        return AttentionSpec(grid=int(spec["grid"]), definition=str(spec.get("definition", "")))
    except ArtifactError as exc:
        raise ArtifactError(f"{source}: {exc.message}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{source}: malformed attention output in metadata ({exc!r})") from None


def _json(meta: dict[str, str], key: str, source: str) -> Any:
    if key not in meta:
        raise ArtifactError(f"{source}: metadata field {key!r} is missing; re-export with deepvit export")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{source}: metadata field {key!r} is not valid JSON ({exc})") from None
