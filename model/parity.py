"""Parity between the PyTorch model and its ONNX export on noise images, run by ONNX Runtime (on the CPU
unless told otherwise). A reduced precision is also gated on natural images: see :mod:`.accuracy`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from deepvit.artifact.session import CPU, Provider, open_session

# Gates of the export (float32 must be numerically the same model; fp16 must keep its decisions).
FP32_MAX_ABS_DIFF = 1e-4
FP16_MIN_TOP1_AGREEMENT = 0.99
# Batch sizes of the check. float32 is held to numerical identity, which a few images show; fp16 to keeping
# 99% of the top-1 decisions, which needs over 100 images before a single flip is under 1% (137 here).
PARITY_BATCH_SIZES = {"fp32": (1, 8), "fp16": (1, 8, 32, 32, 32, 32)}


class ParityError(Exception):
    pass


@dataclass(frozen=True)
class ParityReport:
    precision: str
    batch_sizes: tuple[int, ...]
    images: int
    max_abs_logit_diff: float
    top1_agreement: float
    provider: str

    @property
    def passed(self) -> bool:
        if self.precision == "fp32":
            return self.max_abs_logit_diff <= FP32_MAX_ABS_DIFF and self.top1_agreement == 1.0
        return self.top1_agreement >= FP16_MIN_TOP1_AGREEMENT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batch_sizes"] = list(self.batch_sizes)
        d["gate"] = (
            f"max|dlogit| <= {FP32_MAX_ABS_DIFF} and identical top-1"
            if self.precision == "fp32"
            else f"top-1 agreement >= {FP16_MIN_TOP1_AGREEMENT}"
        )
        d["passed"] = self.passed
        return d

    def summary(self) -> str:
        return (
            f"{self.precision}: max |dlogit| {self.max_abs_logit_diff:.3g}, top-1 agreement "
            f"{self.top1_agreement:.2%} over {self.images} images (batches {list(self.batch_sizes)}, "
            f"{self.provider})"
        )


def random_images(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=generator)


def check_parity(
    reference: nn.Module,
    onnx_model: bytes | str,
    precision: str,
    image_size: int,
    batch_sizes: tuple[int, ...] | None = None,
    seed: int = 0,
    providers: Sequence[Provider] = CPU,
) -> ParityReport:
    """Run both on the same fresh uint8 images; ``reference`` takes the artifact's input (NHWC uint8).

    For fp16 the reference is the float32 model: the figures say what the reduced precision costs.
    ``batch_sizes`` defaults to the precision's ``PARITY_BATCH_SIZES``.
    """
    batch_sizes = batch_sizes or PARITY_BATCH_SIZES[precision]
    session = open_session(onnx_model, providers)
    input_name = session.get_inputs()[0].name
    gen = torch.Generator().manual_seed(seed)
    diffs, agree, total = [], 0, 0
    reference.eval()
    for b in batch_sizes:
        images = random_images(b, image_size, gen)
        with torch.inference_mode():
            expected = reference(images).float().numpy()
        got = session.run(None, {input_name: images.numpy()})[0]
        if got.shape != expected.shape:
            raise ParityError(f"ONNX output shape {got.shape} differs from PyTorch {expected.shape}")
        diffs.append(float(np.abs(got.astype(np.float64) - expected).max()))
        agree += int((got.argmax(1) == expected.argmax(1)).sum())
        total += b
    return ParityReport(
        precision=precision,
        batch_sizes=tuple(batch_sizes),
        images=total,
        max_abs_logit_diff=max(diffs),
        top1_agreement=agree / total,
        provider=str(session.get_providers()[0]),
    )
