"""The machine's limit for a model: cores / (decode CPU per image + single-threaded inference CPU per image
at its most efficient batch size), on the fastest engine the host offers and the artifact's gate allows
(:mod:`deepvit.artifact.engines`). No server can serve more on this machine with this pixel path and these
engines; ``deepvit bench`` quotes the service as a share of it, and prints every engine's figures by batch
size (raw engines × precisions × batch sizes)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepvit.artifact.engines import CPU_ENGINE, Engine, gate_verdict, host_engines
from deepvit.artifact.pixels import ImageLimits, preprocess
from deepvit.artifact.session import metadata_of, open_session, read_metadata
from deepvit.service.config import Settings


@dataclass(frozen=True)
class MachineLimit:
    cores: int
    decode_ms: float  # CPU per image: decode, resize, crop
    infer_ms: float  # single-threaded ONNX Runtime, per image, at ``best_batch``
    best_batch: int
    infer_ms_by_batch: dict[int, float]
    engine: str = "cpu"
    precision: str = "fp32"
    allowed: bool = True  # the artifact's gate allows the engine (a reduced precision's may not)

    @property
    def images_per_s(self) -> float:
        return self.cores * 1000.0 / (self.decode_ms + self.infer_ms)

    def describe(self) -> str:
        return (
            f"machine limit {self.images_per_s:.1f} img/s = {self.cores} cores / ({self.decode_ms:.2f} ms decode "
            f"+ {self.infer_ms:.2f} ms single-threaded inference at batch {self.best_batch}, per image, on "
            f"{self.engine} ({self.precision}))"
        )


def measure_limits(
    artifact: Path, photo: bytes | Sequence[bytes], batch_sizes: Sequence[int], min_time_s: float
) -> list[MachineLimit]:
    """The limit on every engine this host offers natively, the fastest allowed by the artifact's gate first."""
    meta = read_metadata(artifact)
    limits = [
        measure_limit(artifact, photo, batch_sizes, min_time_s, engine, gate_verdict(meta, engine)[0])
        for engine in host_engines().offered
    ]
    return sorted(limits, key=lambda m: (not m.allowed, -m.images_per_s))


def measure_limit(
    artifact: Path,
    photo: bytes | Sequence[bytes],
    batch_sizes: Sequence[int],
    min_time_s: float,
    engine: Engine = CPU_ENGINE,
    allowed: bool = True,
) -> MachineLimit:
    """``photo``: one photograph, or several whose mean decoding cost counts (each decoded at least once)."""
    photos = [photo] if isinstance(photo, bytes) else list(photo)
    session = open_session(artifact, intra_op_threads=1, inter_op_threads=1, engine=engine)
    meta = metadata_of(session, str(artifact))
    spec = meta.preprocess
    settings = Settings()  # the service's default limits: the same pixel path as a default server
    limits = ImageLimits(settings.max_image_pixels, settings.max_aspect_ratio)
    preprocess(photos[0], spec, limits)  # not timed: first-call effects
    n, t0 = 0, time.thread_time()
    started = time.perf_counter()
    while n < max(5, len(photos)) or time.perf_counter() - started < min_time_s:
        preprocess(photos[n % len(photos)], spec, limits)
        n += 1
    decode_ms = 1000.0 * (time.thread_time() - t0) / n
    name = session.get_inputs()[0].name
    crop = spec.crop_size
    by_batch: dict[int, float] = {}
    for b in batch_sizes:
        x = np.random.default_rng(b).integers(0, 256, (b, crop, crop, 3), dtype=np.uint8)
        session.run(None, {name: x})
        runs, t0 = 0, time.process_time()
        started = time.perf_counter()
        while runs < 3 or time.perf_counter() - started < min_time_s:
            session.run(None, {name: x})
            runs += 1
        # One inference thread (ONNX Runtime's is the calling thread, OpenVINO's may be one of its own) and
        # nothing else running in this process: the process's CPU time is the inference's.
        by_batch[b] = 1000.0 * (time.process_time() - t0) / (runs * b)
    best = min(by_batch, key=lambda b: by_batch[b])
    cores = os.cpu_count() or 1
    return MachineLimit(cores, decode_ms, by_batch[best], best, by_batch, engine.name, engine.computes(meta), allowed)
