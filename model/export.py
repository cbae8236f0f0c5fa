"""Export a DeepViT to the one self-describing artifact the service loads (``deepvit.artifact``).

The graph takes ``uint8 [N, crop, crop, 3]`` RGB and does cast, normalisation and NHWC→NCHW itself, so a
client or the service only resizes and crops. ``metadata_props`` carry everything the service needs. With
``explain`` the graph has a second output, ``attention``: the attention rollout of :mod:`.rollout`.
The parity gate runs before anything is written; the file appears by an atomic rename or not at all.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from deepvit.artifact import ATTENTION_NAME, INPUT_NAME, OUTPUT_NAME, ArtifactMetadata, AttentionSpec

from .atomic import atomic_path
from .config import DeepViTConfig
from .net import DeepViT
from .parity import PARITY_BATCH_SIZES, ParityError, ParityReport, check_parity
from .rollout import ROLLOUT_DEFINITION, attention_rollout

Precision = Literal["fp32", "fp16"]
WeightsSource = Literal["state_dict", "ema", "random_init"]
OPSET = 18


class ImageClassifier(nn.Module):
    """uint8 NHWC RGB in, float32 logits out (and with ``explain`` the float32 attention rollout over the
    patch grid): preprocessing after the crop lives inside the graph."""

    mean: Tensor
    std: Tensor

    def __init__(self, model: DeepViT, dtype: torch.dtype = torch.float32, explain: bool = False) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.explain = explain
        pre = model.cfg.preprocessing
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=dtype).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre.std, dtype=dtype).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        x = image.permute(0, 3, 1, 2).to(self.dtype)  # (N, 3, H, W)
        x = (x / 255.0 - self.mean) / self.std  # as the reference ToTensor + Normalize
        if not self.explain:
            logits: Tensor = self.model(x)
            return logits.float()  # (N, classes)
        logits, maps = self.model.forward_with_attention(x)
        return logits.float(), attention_rollout(maps)  # (N, classes), (N, G²)


@dataclass(frozen=True)
class ArtifactInfo:
    """What the artifact says about itself, beyond the graph."""

    name: str
    arch: str
    config: DeepViTConfig
    labels: list[str]
    weights: WeightsSource
    checkpoint_sha256: str | None
    precision: Precision
    explain: bool = False  # the graph also outputs the attention rollout

    def metadata(self, parity: ParityReport) -> ArtifactMetadata:
        return ArtifactMetadata(
            name=self.name,
            arch=self.arch,
            num_classes=self.config.num_classes,
            labels=tuple(self.labels),
            preprocess=self.config.preprocessing,
            weights=self.weights,
            precision=self.precision,
            checkpoint_sha256=self.checkpoint_sha256 or "",
            config=self.config.to_dict(),
            parity=parity.to_dict(),
            versions=tool_versions(),
            exported_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            attention=AttentionSpec(self.config.img_size // self.config.patch_size, ROLLOUT_DEFINITION)
            if self.explain
            else None,
        )


def tool_versions() -> dict[str, str]:
    out = {}
    for dist in ("deepvit-serve", "torch", "onnx", "onnxscript", "onnxruntime-gpu", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def to_onnx(wrapper: ImageClassifier, image_size: int) -> Any:
    """The torch.export-based exporter; returns an ``onnx.ModelProto`` with a dynamic batch axis."""
    example = torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8)
    program = torch.onnx.export(
        wrapper.eval(),
        (example,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME, ATTENTION_NAME] if wrapper.explain else [OUTPUT_NAME],
        dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=4096)}},
        opset_version=OPSET,
        dynamo=True,
        verbose=False,
        optimize=True,
    )
    if program is None:  # pragma: no cover - only when f= is given
        raise RuntimeError("the ONNX exporter returned no program")
    return program.model_proto


def export_artifact(
    model: DeepViT,
    info: ArtifactInfo,
    output: str | Path,
    *,
    parity_batch_sizes: tuple[int, ...] | None = None,
    log: Callable[[str], None] = print,
) -> ParityReport:
    """Export, gate on parity, then write ``output`` atomically. Raises ParityError and writes nothing."""
    import onnx

    output = Path(output)
    size = info.config.img_size
    model = model.eval()
    reference = ImageClassifier(model, torch.float32, info.explain).eval()
    if info.precision == "fp16":
        half = DeepViT(info.config).eval()
        half.load_state_dict(model.state_dict())
        wrapper = ImageClassifier(half.half(), torch.float16, info.explain).eval()
    else:
        wrapper = reference
    with_attention = " with the attention output" if info.explain else ""
    log(f"exporting {info.name} ({info.precision}){with_attention} to ONNX opset {OPSET}…")
    proto = to_onnx(wrapper, size)
    parity_batch_sizes = parity_batch_sizes or PARITY_BATCH_SIZES[info.precision]
    log(f"checking parity with PyTorch at batch sizes {list(parity_batch_sizes)}…")
    report = check_parity(reference, proto.SerializeToString(), info.precision, size, parity_batch_sizes)
    log(f"parity {report.summary()}")
    if not report.passed:
        raise ParityError(f"parity gate failed, nothing written: {report.summary()}; gate {report.to_dict()['gate']}")
    proto.producer_name = "deepvit-serve"
    proto.doc_string = f"DeepViT {info.arch} ImageNet-style classifier exported by deepvit-serve"
    del proto.metadata_props[:]
    for key, value in info.metadata(report).to_props().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_path(output) as tmp:
        onnx.save_model(proto, str(tmp))
    log(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB)")
    return report
