"""The work of one actor of Ray Data's pool: a batch of ``{path, bytes}`` rows → their output rows.

Each file goes through the contract's pixel path (:func:`deepvit.artifact.pixels.preprocess`, the service's
formats and limits), the good ones through the artifact in one ONNX Runtime call, and their logits through
the top-k that ``/classify`` answers with. A file that fails to decode gets its error in its row; nothing a
file holds can fail the batch.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from deepvit.artifact import OUTPUT_NAME, ArtifactMetadata, ImageError
from deepvit.artifact.pixels import ImageLimits, preprocess
from deepvit.artifact.predictions import Scored, top_k

from .engine import AUTO, choose
from .inputs import display_path
from .rows import ModelIdentity, table

if TYPE_CHECKING:
    import pyarrow as pa

# The service's default limits (DEEPVIT_MAX_IMAGE_PIXELS, DEEPVIT_MAX_ASPECT_RATIO), so that a file gets the
# answer an upload of it would.
SERVICE_LIMITS = ImageLimits(max_pixels=40_000_000, max_aspect_ratio=20.0)


@dataclass(frozen=True)
class ClassifierSpec:
    """What an actor is built from (pickled to every node: the artifact travels as bytes, so that workers
    need no access to where it is stored)."""

    artifact: Any  # its bytes, or a Ray ObjectRef of them
    meta: ArtifactMetadata  # as the driver read it: an actor need not parse the model once more for it
    model: ModelIdentity
    top_k: int
    threads: int
    engine: str = AUTO  # an engine's name, or chosen by measurement on the actor's host (.engine)
    batch_size: int = 8  # the rows the actor is handed at a time: its calls are of the size it measures best
    scheme: str = ""  # put back in front of paths (``s3``: ``bucket/key`` → ``s3://bucket/key``)
    limits: ImageLimits = SERVICE_LIMITS


class Classifier:
    """The callable class of ``Dataset.map_batches``: one session per actor, built once."""

    def __init__(self, spec: ClassifierSpec) -> None:
        self.spec = spec
        model = spec.artifact
        if not isinstance(model, bytes):
            import ray

            model = ray.get(model)
        self.meta = spec.meta
        self.chosen = choose(model, self.meta, spec.engine, spec.threads, spec.batch_size)
        self.session = self.chosen.session
        # Ray forwards an actor's output to the driver's terminal: one line says what computes here and why.
        print(f"deepvit predict: {self.chosen.describe()}", file=sys.stderr, flush=True)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        paths = [display_path(self.spec.scheme, str(p)) for p in batch["path"]]
        return table(paths, self.classify(batch["bytes"]), self.spec.model, self.chosen.engine.name)

    def classify(self, blobs: Iterable[Any]) -> list[list[Scored] | str]:
        """Each file's top-k, or its error message, in order."""
        outcomes: list[list[Scored] | str] = []
        crops: list[np.ndarray] = []
        for data in blobs:
            try:
                crops.append(preprocess(bytes(data), self.meta.preprocess, self.spec.limits))
                outcomes.append([])  # its place, filled below
            except ImageError as exc:
                outcomes.append(exc.message)
            except Exception as exc:  # whatever else a hostile file makes a decoder raise is the file's fault
                outcomes.append(f"the image could not be decoded ({type(exc).__name__}: {exc})")
        if crops:
            step = self.chosen.batch  # the size the actor measured fastest per image, not the rows it was handed
            logits = [
                self.session.run([OUTPUT_NAME], {self.input_name: np.stack(crops[i : i + step])})[0]
                for i in range(0, len(crops), step)
            ]
            good = iter(np.concatenate(logits))
            for i, outcome in enumerate(outcomes):
                if isinstance(outcome, list):
                    outcomes[i] = top_k(next(good), self.spec.top_k, self.meta.labels)
        return outcomes
