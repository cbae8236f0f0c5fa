"""The one inference pipeline every protocol front end calls (``/classify``, the Open Inference Protocol's
``infer``), in the manner of kserve's ``DataPlane``: front ends only translate their wire format.

One request's trip, as a :class:`Call`:

1. ``begin(name, version)``: resolve the version (404 or 503 at once, no lease yet) and admit one image: a full
   queue is refused before the body is read;
2. the front end reads its body (a slow upload holds no lease and does not count against the deadline);
3. ``received(images)``: the deadline starts, and the request is admitted again with its image count;
4. ``decode(blobs)``: the artifact contract's pixel path, in the decode pool, skipping what is left once one
   image failed;
5. ``infer(pixels)``: under a lease on the version (an unload waits for it), the batched call, a check that
   the logits are finite, and the answer.

Errors are translated here, once: the contract's image errors into 400/413, the batcher's queue, expiry and
closing into 503/504; the runtime raises the service's own ``InferenceError``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from deepvit.artifact import ImageError, ImageTooLargeError
from deepvit.artifact.pixels import ImageLimits, PixelBudget, preprocess

from .batcher import BatcherClosedError, BatchFailedError, ExpiredError, QueueFullError
from .config import Settings
from .errors import (
    BadRequestError,
    DeadlineExceededError,
    InferenceError,
    PayloadTooLargeError,
    RequestError,
    UnavailableError,
)
from .metrics import Metrics
from .models.manager import ModelManager, ModelVersion
from .runtime import Prediction

R = TypeVar("R")
Blob = tuple[str | None, bytes]  # (what the caller calls it: a filename, an input element; the bytes)


@dataclass(frozen=True)
class Answer:
    """The version that answered and one prediction per image, in request order."""

    model: ModelVersion
    predictions: list[Prediction]

    @property
    def logits(self) -> np.ndarray:
        return np.stack([p.logits for p in self.predictions])  # (N, classes)

    def log_fields(self) -> dict[str, Any]:
        """What the access log records of the answer."""
        return {
            "model": self.model.name,
            "version": self.model.version,
            "images": len(self.predictions),
            "batch_size": max(p.batch_size for p in self.predictions),
        }


class InferencePipeline:
    def __init__(self, settings: Settings, models: ModelManager, metrics: Metrics, decode_pool: Executor) -> None:
        self.settings = settings
        self.models = models
        self.metrics = metrics
        self.decode_pool = decode_pool
        self.limits = ImageLimits(settings.max_image_pixels, settings.max_aspect_ratio)

    def begin(self, name: str | None, version: int | None) -> Call:
        """Resolve the version a request names (the default model and its latest version when it names
        none) and admit it, before anything of its body is read."""
        call = Call(self, self.models.resolve(name, version), name, version)
        call.admit(1)
        return call


class Call:
    """One request's trip through the pipeline; see the module's docstring for the order of its steps."""

    def __init__(self, pipeline: InferencePipeline, mv: ModelVersion, name: str | None, version: int | None) -> None:
        self.pipeline = pipeline
        self.model = mv  # resolved without a lease: what the body is read and decoded for
        self._name, self._version = name, version
        self.deadline = float("inf")

    def admit(self, images: int) -> None:
        """Refuse at once, before reading or decoding anything more, when the model's queue cannot take
        ``images`` more (a version replaced meanwhile: its successor's batcher says so at submission)."""
        mv = self.model
        if mv.state == "ready" and not mv.batcher.has_capacity(images):
            raise UnavailableError(
                f"the queue of {mv.name} is full ({mv.batcher.depth} of {mv.batcher.max_queue_size} images "
                "waiting); retry shortly",
                reason="queue_full",
            )

    def received(self, images: int | None = None) -> None:
        """The body is in: the deadline counts from now (a slow upload is the client's link, not a queue to
        report), and a request of several images is admitted again with its count."""
        self.deadline = time.monotonic() + self.pipeline.settings.request_timeout_s
        if images is not None and images > 1:
            self.admit(images)

    def check_deadline(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            raise DeadlineExceededError(f"the request's deadline passed before {what}; the server is overloaded")

    async def offload(self, fn: Callable[..., R], *args: Any) -> R:
        """Run blocking work of the request (a front end's body decoding) in the decode pool."""
        self.check_deadline("it was decoded")
        return await asyncio.get_running_loop().run_in_executor(self.pipeline.decode_pool, fn, *args)

    async def decode(self, blobs: Sequence[Blob]) -> list[np.ndarray]:
        """Encoded images → the artifact's input, in the decode pool. The first failure settles the request:
        images not yet started are skipped rather than decoded for an answer that is already an error."""
        p = self.pipeline
        spec = self.model.runtime.meta.preprocess
        budget = PixelBudget(p.settings.max_request_pixels)
        failed = threading.Event()

        def one(data: bytes) -> np.ndarray:
            if failed.is_set():
                raise _SkippedError
            try:
                self.check_deadline("its image was decoded")  # waited too long for a decode thread
                t0 = time.perf_counter()
                try:
                    out = preprocess(data, spec, p.limits, budget)
                except ImageTooLargeError as exc:
                    raise PayloadTooLargeError(exc.message) from None
                except ImageError as exc:
                    raise BadRequestError(exc.message) from None
                p.metrics.preprocess.observe(time.perf_counter() - t0)
                return out
            except BaseException:
                failed.set()
                raise

        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(p.decode_pool, one, data) for _, data in blobs), return_exceptions=True
        )
        for (label, _), res in zip(blobs, results, strict=True):
            if isinstance(res, _SkippedError) or not isinstance(res, BaseException):
                continue
            if isinstance(res, RequestError) and len(blobs) > 1:  # say which part, so the caller can fix that one
                raise type(res)(f"part {label!r}: {res.message}")
            raise res
        return [res for res in results if isinstance(res, np.ndarray)]

    async def infer(self, pixels: Sequence[np.ndarray] | np.ndarray) -> Answer:
        """The batched call under a lease, from submission until the answer is in: if the version was replaced
        while the body came in, what the request names now answers, provided it takes the same input."""
        p = self.pipeline
        with p.models.lease_for(self.model, self._name, self._version) as mv:
            try:
                preds = await mv.batcher.submit_many(list(pixels), self.deadline)
            except QueueFullError as exc:
                raise UnavailableError(f"{exc}; retry shortly", reason="queue_full", retry_after_s=1) from None
            except ExpiredError as exc:
                raise DeadlineExceededError(
                    f"{exc} (deadline {p.settings.request_timeout_s:g}s); the server is overloaded"
                ) from None
            except BatcherClosedError as exc:
                raise UnavailableError(str(exc), reason="unloading") from None
            except BatchFailedError as exc:
                raise InferenceError(str(exc)) from None
        for i, pred in enumerate(preds):
            if not np.isfinite(pred.logits).all():  # no answer to give (and JSON has no NaN): the model's fault
                raise InferenceError(
                    f"model {mv.name} version {mv.version} produced non-finite logits for image {i} "
                    f"(precision {mv.runtime.meta.precision}); the artifact is faulty for this input"
                )
        p.metrics.images.labels(mv.name).inc(len(preds))  # classified: the request has its answers
        return Answer(mv, preds)

    async def classify(self, blobs: Sequence[Blob]) -> Answer:
        """Encoded images in, an answer out: decode, then infer."""
        return await self.infer(await self.decode(blobs))


class _SkippedError(Exception):
    """An image not decoded because another image of its request had already failed."""
