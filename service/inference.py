"""The one inference pipeline every protocol front end calls (``/classify``, the Open Inference Protocol's
``infer``), in the manner of kserve's ``DataPlane``: front ends only translate their wire format.

One request's trip, as a :class:`Call`:

1. ``with begin(name, version) as call``: resolve the version (404 or 503 at once, no lease yet) and admit one
   image to the pipeline (:mod:`.admission`: refused at once, before the body is read, when it could not be
   answered in time) and to the model's queue;
2. the front end reads its body (a slow upload holds no lease and does not count against the deadline);
3. ``received(images)``: the deadline starts, the request counts as in flight, and it is admitted again with
   its image count;
4. ``decode(blobs)``: the artifact contract's pixel path, in the decode pool, skipping what is left once one
   image failed;
5. ``infer(pixels)``: under a lease on the version (an unload waits for it), the batched call, a check that
   the logits are finite, and the answer; ``explain`` adds each image's attention map drawn over its crop
   (in the decode pool), for artifacts with the attention output (:func:`require_attention`, a 409 before
   the body is read, for the others);
6. leaving the ``with`` block gives the request's images back to admission, whatever happened.

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
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

from deepvit.artifact import ImageError, ImageTooLargeError
from deepvit.artifact.errors import ArtifactError, DecodeBusyError
from deepvit.artifact.heatmap import overlay_png
from deepvit.artifact.pixels import DecodeMemory, ImageLimits, PixelBudget, preprocess

from .admission import Admission
from .batcher import BatcherClosedError, BatchFailedError, ExpiredError, QueueFullError
from .config import Settings
from .errors import (
    BadRequestError,
    ConflictError,
    DeadlineExceededError,
    InferenceError,
    PayloadTooLargeError,
    RequestError,
    ServiceError,
    UnavailableError,
)
from .memory import release_after_decode
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

    @property
    def attention(self) -> np.ndarray | None:
        """(N, grid²) when the artifact has the attention output."""
        maps = [p.attention for p in self.predictions]
        if any(m is None for m in maps):
            return None
        return np.stack([m for m in maps if m is not None])

    def log_fields(self) -> dict[str, Any]:
        """What the access log records of the answer."""
        return {
            "model": self.model.name,
            "version": self.model.version,
            "images": len(self.predictions),
            "batch_size": max(p.batch_size for p in self.predictions),
        }


@dataclass(frozen=True)
class Explanation:
    """An answer with, per image, its attention over the patch grid and the heat map over its crop (PNG)."""

    answer: Answer
    grid: int
    attention: list[np.ndarray]  # (grid * grid,) float32 each, summing to 1
    overlays: list[bytes]


def require_attention(mv: ModelVersion) -> None:
    """A 409 for a version whose artifact has no attention output, naming the command that gives it one."""
    if mv.runtime.meta.attention is None:
        raise ConflictError(
            f"model {mv.name} version {mv.version} was exported without the attention output, so it cannot "
            "explain its answers; re-export it with: deepvit export --explain ... (the same arguments as before "
            "plus --explain)"
        )


class InferencePipeline:
    def __init__(self, settings: Settings, models: ModelManager, metrics: Metrics, decode_pool: Executor) -> None:
        self.settings = settings
        self.models = models
        self.metrics = metrics
        self.decode_pool = decode_pool
        self.limits = ImageLimits(settings.max_image_pixels, settings.max_aspect_ratio)
        self.decode_memory = DecodeMemory(settings.max_decode_memory_bytes, on_release=release_after_decode)
        self.admission = a = Admission(settings.admission_wait_s, settings.max_pending_images)
        metrics.pending_images.set_function(lambda: a.pending)
        metrics.estimated_wait.set_function(lambda: a.estimated_wait_s(1))
        metrics.image_cost.set_function(lambda: a.per_image_s or 0.0)

    def begin(self, name: str | None, version: int | None, check: Callable[[ModelVersion], None] | None = None) -> Call:
        """Resolve the version a request names (the default model and its latest version when it names
        none), run the front end's ``check`` of its parameters against it (a bad parameter is a 400 even on a
        busy server), and admit it, before anything of its body is read. Use it as a context manager: leaving
        the block gives the request's share of the pipeline back."""
        mv = self.models.resolve(name, version)
        if check is not None:
            check(mv)
        call = Call(self, mv, name, version)
        call.admit(1)
        return call


class Call:
    """One request's trip through the pipeline; see the module's docstring for the order of its steps."""

    def __init__(self, pipeline: InferencePipeline, mv: ModelVersion, name: str | None, version: int | None) -> None:
        self.pipeline = pipeline
        self.model = mv  # resolved without a lease: what the body is read and decoded for
        self._name, self._version = name, version
        self.deadline = float("inf")
        self.reserved = 0  # images this request holds in admission
        self.completed = False  # its images were computed (they measure the pipeline's throughput)
        self._in_flight = False

    def __enter__(self) -> Call:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        p = self.pipeline
        if self._in_flight:
            self._in_flight = False
            p.metrics.inflight.dec()
        if self.reserved:
            p.admission.release(self.reserved, self.completed)
            self.reserved = 0

    def admit(self, images: int) -> None:
        """Hold ``images`` in all (a request's count, once known), or refuse at once, before reading or
        decoding anything more: when the pipeline could not answer them in time, or the model's queue cannot
        take them (a version replaced meanwhile: its successor's batcher says so at submission)."""
        more = images - self.reserved
        if more <= 0:
            return
        mv = self.model
        if mv.state == "ready" and not mv.batcher.has_capacity(images):
            raise UnavailableError(
                f"the queue of {mv.name} is full ({mv.batcher.depth} of {mv.batcher.max_queue_size} images "
                "waiting); retry shortly",
                reason="queue_full",
            )
        self.pipeline.admission.admit(more)
        self.reserved += more

    def received(self, images: int | None = None, within_s: float | None = None) -> None:
        """The body is in: the deadline counts from now (a slow upload is the client's link, not a queue to
        report), the request counts in ``deepvit_inflight_requests``, and a request of several images is
        admitted again with its count. ``within_s``: the caller's own deadline (gRPC's), when it is sooner."""
        timeout = self.pipeline.settings.request_timeout_s
        self.deadline = time.monotonic() + (timeout if within_s is None else min(timeout, within_s))
        if not self._in_flight:
            self._in_flight = True
            self.pipeline.metrics.inflight.inc()
        if images is not None:
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
                    wait_s = self.deadline - time.monotonic()
                    out = preprocess(data, spec, p.limits, budget, p.decode_memory, wait_s, p.settings.jpeg_draft)
                except DecodeBusyError as exc:
                    raise DeadlineExceededError(f"{exc.message}; the server is overloaded") from None
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
                # Alone: no other request admitted (decoding or queued), the low load a solo session is for.
                alone = p.admission.pending <= self.reserved
                preds = await mv.batcher.submit_many(list(pixels), self.deadline, alone)
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
            except ServiceError:
                raise  # the runtime's InferenceError, already in words a caller can act on
            except Exception as exc:  # anything else predict raised: the model's fault, said once
                raise InferenceError(f"inference failed: {type(exc).__name__}: {exc}") from exc
        for i, pred in enumerate(preds):
            if not np.isfinite(pred.logits).all():  # no answer to give (and JSON has no NaN): the model's fault
                raise InferenceError(
                    f"model {mv.name} version {mv.version} produced non-finite logits for image {i} "
                    f"(precision {mv.runtime.meta.precision}); the artifact is faulty for this input"
                )
        p.metrics.images.labels(mv.name).inc(len(preds))  # classified: the request has its answers
        self.completed = True
        return Answer(mv, preds)

    async def classify(self, blobs: Sequence[Blob]) -> Answer:
        """Encoded images in, an answer out: decode, then infer."""
        return await self.infer(await self.decode(blobs))

    async def explain(self, blobs: Sequence[Blob]) -> Explanation:
        """Encoded images in, the answer with each image's attention map and heat map out (for a version
        that passed :func:`require_attention`). The drawing runs in the decode pool once the answer is in;
        the request's deadline no longer applies, since its work is done."""
        pixels = await self.decode(blobs)
        answer = await self.infer(pixels)
        spec, maps = answer.model.runtime.meta.attention, answer.attention
        if spec is None or maps is None:  # replaced meanwhile by a version without it
            require_attention(answer.model)
        assert spec is not None
        assert maps is not None
        attention = list(maps)

        def draw() -> list[bytes]:
            try:
                return [overlay_png(crop, att, spec.grid) for crop, att in zip(pixels, attention, strict=True)]
            except ArtifactError as exc:  # the graph gave a map that is not one: the model's fault
                raise InferenceError(
                    f"model {answer.model.name} version {answer.model.version}: {exc.message}"
                ) from None

        loop = asyncio.get_running_loop()
        overlays = await loop.run_in_executor(self.pipeline.decode_pool, draw)
        return Explanation(answer, spec.grid, attention, overlays)


class _SkippedError(Exception):
    """An image not decoded because another image of its request had already failed."""
