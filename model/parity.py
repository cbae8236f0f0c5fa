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
# The attention rollout sums to 1 over the patches (each value about 1 / patches): float32 must give the same
# map to 1e-5 of that mass; fp16 must keep its shape, 1e-3 of the mass at most anywhere.
ATTENTION_MAX_ABS_DIFF = {"fp32": 1e-5, "fp16": 1e-3}
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
    max_abs_attention_diff: float | None = None  # when the graph has the attention output

    @property
    def passed(self) -> bool:
        att = self.max_abs_attention_diff
        if att is not None and not att <= ATTENTION_MAX_ABS_DIFF[self.precision]:
            return False
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
        if self.max_abs_attention_diff is None:
            del d["max_abs_attention_diff"]
        else:
            d["gate"] += f" and max|dattention| <= {ATTENTION_MAX_ABS_DIFF[self.precision]}"
        d["passed"] = self.passed
        return d

    def summary(self) -> str:
        att = self.max_abs_attention_diff
        return (
            f"{self.precision}: max |dlogit| {self.max_abs_logit_diff:.3g}, top-1 agreement "
            f"{self.top1_agreement:.2%}{'' if att is None else f', max |dattention| {att:.3g}'} over "
            f"{self.images} images (batches {list(self.batch_sizes)}, {self.provider})"
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
    """Run both on the same fresh uint8 images; ``reference`` takes the artifact's input (NHWC uint8) and
    returns the logits, or the logits and the attention rollout when the artifact has that output too.

    For fp16 the reference is the float32 model: the figures say what the reduced precision costs.
    ``batch_sizes`` defaults to the precision's ``PARITY_BATCH_SIZES``.
    """
    batch_sizes = batch_sizes or PARITY_BATCH_SIZES[precision]
    session = open_session(onnx_model, providers)
    input_name = session.get_inputs()[0].name
    gen = torch.Generator().manual_seed(seed)
    diffs, attention_diffs, agree, total = [], [], 0, 0
    reference.eval()
    for b in batch_sizes:
        images = random_images(b, image_size, gen)
        with torch.inference_mode():
            out = reference(images)
        expected_all = [t.float().numpy() for t in (out if isinstance(out, tuple) else (out,))]
        got_all = session.run(None, {input_name: images.numpy()})
        if len(got_all) != len(expected_all):
            raise ParityError(f"the ONNX graph has {len(got_all)} outputs, PyTorch {len(expected_all)}")
        for got, expected in zip(got_all, expected_all, strict=True):
            if got.shape != expected.shape:
                raise ParityError(f"ONNX output shape {got.shape} differs from PyTorch {expected.shape}")
        got, expected = got_all[0], expected_all[0]
        diffs.append(float(np.abs(got.astype(np.float64) - expected).max()))
        if len(got_all) == 2:
            attention_diffs.append(float(np.abs(got_all[1].astype(np.float64) - expected_all[1]).max()))
        agree += int((got.argmax(1) == expected.argmax(1)).sum())
        total += b
    return ParityReport(
        precision=precision,
        batch_sizes=tuple(batch_sizes),
        images=total,
        max_abs_logit_diff=max(diffs),
        top1_agreement=agree / total,
        provider=str(session.get_providers()[0]),
        max_abs_attention_diff=max(attention_diffs) if attention_diffs else None,
    )
