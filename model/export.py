"""Export a DeepViT to the one self-describing artifact the service loads (``deepvit.artifact``).

The graph takes ``uint8 [N, crop, crop, 3]`` RGB and does cast, normalisation and NHWC→NCHW itself, so a
client or the service only resizes and crops. ``metadata_props`` carry everything the service needs. With
``explain`` the graph has a second output, ``attention``: the attention rollout of :mod:`.rollout`.
The gates (parity with PyTorch; for fp16 and int8 also accuracy on natural images) run before anything is
written; the file appears by an atomic rename or not at all.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from deepvit.artifact import ATTENTION_NAME, INPUT_NAME, OUTPUT_NAME, ArtifactMetadata, AttentionSpec
from deepvit.artifact.engines import CPU_ENGINE, ENGINES, Engine

from .accuracy import (
    AccuracyReport,
    EngineGates,
    NoGateImagesError,
    check_accuracy,
    check_engines,
    folder_images,
    gate_images,
)
from .atomic import atomic_path
from .config import DeepViTConfig
from .layers import Attention
from .net import DeepViT
from .parity import PARITY_BATCH_SIZES, ParityError, ParityReport, check_parity
from .quantize import Quantization, measure_speed, quantize
from .rollout import ROLLOUT_DEFINITION, attention_rollout

Precision = Literal["fp32", "fp16", "int8"]
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

    def metadata(
        self,
        parity: ParityReport,
        accuracy: AccuracyReport | None = None,
        quantization: Quantization | None = None,
        engine_gates: dict[str, Any] | None = None,
    ) -> ArtifactMetadata:
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
            accuracy=accuracy.to_dict() if accuracy else {},
            quantization=quantization.to_dict() if quantization else {},
            engine_gates=engine_gates or {},
            versions=tool_versions(),
            exported_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            attention=AttentionSpec(self.config.img_size // self.config.patch_size, ROLLOUT_DEFINITION)
            if self.explain
            else None,
        )


def tool_versions() -> dict[str, str]:
    out = {}
    dists = (
        "deepvit-serve",
        "torch",
        "onnx",
        "onnxscript",
        "onnxruntime-gpu",
        "onnxruntime",
        "onnxruntime-ep-openvino",
    )
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def fold_reattention_norm(model: DeepViT) -> DeepViT:
    """A copy of ``model`` whose Re-attention BatchNorms are folded into the 1×1 head-mixing convolutions.

    In evaluation BatchNorm is an affine map per head, so Norm(Θᵀ·A) is one 1×1 convolution with rescaled
    weights and bias (torch's own ``fuse_conv_bn_eval``): one op fewer per Re-attention block, and nothing
    left for ONNX tooling (the quantizer, graph optimisers) to treat specially. The parity gate holds the
    folded graph to the unfolded PyTorch model."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if isinstance(module, Attention) and module.reattention and isinstance(module.var_norm, nn.BatchNorm2d):
            module.reatten_matrix = fuse_conv_bn_eval(module.reatten_matrix, module.var_norm)
            module.var_norm = nn.Identity()
    return folded


class FusableGelu(nn.Module):
    """``nn.GELU()`` (the exact, erf form) as ``x·0.5·(1 + erf(x/√2))``: the grouping that ONNX Runtime's Gelu
    fusion recognises (into one BiasGelu with the bias before it). ``nn.GELU`` exports as ``x·(0.5·(1 +
    erf(x/√2)))``, which it leaves as five element-wise passes over the MLP's widest activation: on a
    single-threaded CPU session of the 224 px small model, 5% more time per image at batch 4 and the same at
    batch 1 (where those passes stay in cache); four kernel launches fewer per block on a GPU."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def rewrite_for_inference(model: DeepViT) -> DeepViT:
    """A copy of ``model`` as the exported graph computes it: the Re-attention BatchNorms folded
    (:func:`fold_reattention_norm`) and the exact GELUs in the form that fuses (:class:`FusableGelu`). Each
    rewrite is the same function; the parity gate holds the graph to the unrewritten PyTorch model."""
    rewritten = fold_reattention_norm(model)
    for parent in list(rewritten.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.GELU) and child.approximate == "none":
                setattr(parent, name, FusableGelu())
    return rewritten


def clean_graph(proto: Any) -> Any:
    """Drop the exporter's ``value_info`` and infer it again, strictly.

    The torch exporter leaves ``value_info`` entries for initializers whose shapes disagree with them after
    its own optimisation passes; ONNX's shape inference (and with it ONNX Runtime's quantizer) then stops at
    "Inferred shape and existing shape differ". Shapes inferred from the graph itself are consistent by
    construction, and strict mode makes an inconsistency an error here rather than in someone's tooling."""
    import onnx

    del proto.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)


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
    return clean_graph(program.model_proto)


def export_artifact(
    model: DeepViT,
    info: ArtifactInfo,
    output: str | Path,
    *,
    parity_batch_sizes: tuple[int, ...] | None = None,
    gate_photos: Path | None = None,
    calibration: Path | None = None,
    engine_gates: EngineGates = "auto",
    int8_recipe: Literal["ort", "nncf"] = "ort",
    log: Callable[[str], None] = print,
) -> ParityReport:
    """Export, gate, then write ``output`` atomically. Raises ParityError and writes nothing.

    Every artifact is gated on parity with PyTorch on noise images (float32 to numerical identity); a
    reduced precision also on natural images (:mod:`.accuracy`): ``gate_photos`` (the project's photographs
    by default) and the ``calibration`` folder, which for int8 also calibrates static quantization. A float32
    graph is also gated on the same images for each reduced-precision engine (``engine_gates``, bf16 on the
    CPU's matrix engine): recorded, never blocking the float32 artifact; the service uses only what passed."""
    import onnx

    output = Path(output)
    size = info.config.img_size
    model = model.eval()
    if info.explain and info.precision == "int8":
        raise ParityError(
            "--explain with --precision int8 is not offered: the quantized graph's attention output would not be "
            "gated; export the attention output in fp32 or fp16"
        )
    if int8_recipe == "nncf" and (info.precision != "int8" or calibration is None):
        raise ParityError(
            "--int8-recipe nncf quantizes to int8 calibrated on images: give --precision int8 and --calibration DIR"
        )
    reference = ImageClassifier(model, torch.float32, info.explain).eval()
    folded = rewrite_for_inference(model)
    graph_precision = "fp16" if info.precision == "fp16" else "fp32"  # int8 quantizes the float32 graph
    if graph_precision == "fp16":
        wrapper = ImageClassifier(folded.half(), torch.float16, info.explain).eval()
    else:
        wrapper = ImageClassifier(folded, torch.float32, info.explain).eval()
    # Gathered before the slow steps, so that a bad folder is reported at once.
    calibration_images = folder_images(calibration, info.config.preprocessing) if calibration else None
    gate = None
    if info.precision != "fp32":
        gate = gate_images(info.config.preprocessing, gate_photos, calibration_images)
    with_attention = " with the attention output" if info.explain else ""
    log(f"exporting {info.name} ({graph_precision}){with_attention} to ONNX opset {OPSET}…")
    proto = to_onnx(wrapper, size)
    parity_batch_sizes = parity_batch_sizes or PARITY_BATCH_SIZES[graph_precision]
    log(f"checking parity with PyTorch at batch sizes {list(parity_batch_sizes)}…")
    report = check_parity(reference, proto.SerializeToString(), graph_precision, size, parity_batch_sizes)
    log(f"parity {report.summary()}")
    if not report.passed:
        raise ParityError(f"parity gate failed, nothing written: {report.summary()}; gate {report.to_dict()['gate']}")
    accuracy: AccuracyReport | None = None
    recipe: Quantization | None = None
    if gate is not None:
        graph = proto.SerializeToString()
        engine: Engine | None = None  # the CPU provider
        if info.precision == "int8":
            source = calibration.name if calibration else ""
            int8, recipe = quantize(
                graph,
                None if calibration_images is None else calibration_images.images,
                source,
                log,
                method="nncf" if int8_recipe == "nncf" else None,
            )
            engine = ENGINES[recipe.engine] if recipe.engine != CPU_ENGINE.name else None  # gated and timed there
            recipe = dataclasses.replace(recipe, speed=measure_speed(graph, int8, size, engine=engine))
            log(speed_verdict(recipe))
            proto, graph = onnx.load_from_string(int8), int8
        log(f"checking accuracy against float32 PyTorch on {len(gate)} natural images…")
        accuracy = check_accuracy(reference, graph, info.precision, gate, engine=engine)
        log(f"accuracy {accuracy.summary()}")
        if not accuracy.passed and info.weights == "random_init":
            # Untrained weights have near-uniform probabilities and no decisions worth keeping: the figures
            # are recorded (passed: false) and said, so that such an artifact can still be timed.
            log(f"WARNING: the accuracy gate fails ({accuracy.summary()}) but is not enforced: random weights")
        elif not accuracy.passed:
            raise ParityError(
                f"accuracy gate failed, nothing written: {accuracy.summary()}; gate {accuracy.to_dict()['gate']}"
            )
    engines: dict[str, Any] = {}
    if info.precision == "fp32" and engine_gates != "none":
        try:
            images = gate_images(info.config.preprocessing, gate_photos, calibration_images)
        except NoGateImagesError:
            images = None
        graph = proto.SerializeToString()
        engines = check_engines(reference, graph, images, engine_gates, log, enforced=info.weights != "random_init")
    proto.producer_name = "deepvit-serve"
    proto.doc_string = f"DeepViT {info.arch} ImageNet-style classifier exported by deepvit-serve"
    del proto.metadata_props[:]
    for key, value in info.metadata(report, accuracy, recipe, engines).to_props().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_path(output) as tmp:
        onnx.save_model(proto, str(tmp))
    log(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB)")
    return report


def speed_verdict(recipe: Quantization) -> str:
    """One line on whether int8 pays on this machine: where it does not, say so plainly."""
    figures = ", ".join(
        f"batch {s.batch_size}: {s.fp32_ms:.2f} -> {s.int8_ms:.2f} ms per image ({s.speedup:.2f}x)"
        for s in recipe.speed
    )
    if recipe.pays:
        return f"int8 speed on this CPU, against float32: {figures}"
    return (
        f"WARNING: int8 does not pay on this CPU ({figures}): the model is too small for integer MatMuls to "
        "outweigh quantizing activations; serve the float32 artifact here"
    )
