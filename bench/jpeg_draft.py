"""``deepvit bench --jpeg-draft``: what ``DEEPVIT_JPEG_DRAFT`` saves and what it costs in fidelity.

For each photograph, as shipped and re-encoded at 12 megapixels (4032 x 3024 px or its portrait, JPEG quality
92: what a phone sends), the service's pixel path twice: the reference transform (full decode, then the
resize) and the draft (libjpeg decodes at the smallest 1/2, 1/4 or 1/8 scale that keeps the resize's size).
Per image: CPU time of each (median of ``rounds``, one thread), the speed-up, how far the draft's crop is from
the reference's (mean and largest absolute difference, 0-255), and the served model's answer on both (same
top-1, change of its probability). A model with random weights answers near ties, where a top-1 flips on
noise: judge fidelity by the pixels there, by the answers with trained weights.
"""

from __future__ import annotations

import functools
import io
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from deepvit.artifact.pixels import ImageLimits, preprocess
from deepvit.artifact.predictions import softmax
from deepvit.artifact.session import metadata_of, open_session
from deepvit.service.config import Settings


@dataclass(frozen=True)
class DraftRow:
    image: str
    size: tuple[int, int]
    reference_ms: float
    draft_ms: float
    mean_abs: float
    max_abs: int
    same_top1: bool
    top1_prob_change: float


def _twelve_megapixels(photo: bytes) -> bytes:
    img = Image.open(io.BytesIO(photo)).convert("RGB")
    size = (4032, 3024) if img.width >= img.height else (3024, 4032)
    buf = io.BytesIO()
    img.resize(size, Image.Resampling.LANCZOS).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _cpu_ms(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return 1000 * statistics.median(times)


def measure(artifact: Path, photos: list[Path], rounds: int = 7) -> list[DraftRow]:
    session = open_session(artifact, intra_op_threads=1)
    spec = metadata_of(session, str(artifact)).preprocess
    settings = Settings()  # the service's default limits
    limits = ImageLimits(settings.max_image_pixels, settings.max_aspect_ratio)
    name = session.get_inputs()[0].name
    rows = []
    for photo in photos:
        shipped = photo.read_bytes()
        for label, data in ((photo.name, shipped), (f"{photo.stem} at 12 MP", _twelve_megapixels(shipped))):
            reference = preprocess(data, spec, limits)
            drafted = preprocess(data, spec, limits, draft=True)
            diff = np.abs(reference.astype(np.int16) - drafted.astype(np.int16))
            logits = session.run(None, {name: np.stack([reference, drafted])})[0]
            p_ref, p_draft = softmax(logits[0]), softmax(logits[1])
            top = int(np.argmax(p_ref))
            rows.append(
                DraftRow(
                    label,
                    Image.open(io.BytesIO(data)).size,
                    _cpu_ms(functools.partial(preprocess, data, spec, limits), rounds),
                    _cpu_ms(functools.partial(preprocess, data, spec, limits, draft=True), rounds),
                    float(diff.mean()),
                    int(diff.max()),
                    top == int(np.argmax(p_draft)),
                    float(abs(p_ref[top] - p_draft[top])),
                )
            )
    return rows


def render(rows: list[DraftRow]) -> str:
    lines = [
        "| image | size | reference ms | draft ms | speed-up | mean abs diff | max abs diff | same top-1 "
        "| top-1 prob change |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.image} | {r.size[0]}x{r.size[1]} | {r.reference_ms:.2f} | {r.draft_ms:.2f} | "
            f"{r.reference_ms / r.draft_ms:.2f}x | {r.mean_abs:.2f} | {r.max_abs} | "
            f"{'yes' if r.same_top1 else 'no'} | {r.top1_prob_change:.2e} |"
        )
    return "\n".join(lines)
