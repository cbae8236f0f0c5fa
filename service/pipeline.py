"""The one request pipeline every protocol front end calls (``/classify``, ``/explain``, the Open Inference
Protocol's ``infer`` over REST and gRPC), in the manner of kserve's ``DataPlane``: a front end translates its
wire format into :class:`Inputs` and the pipeline's answer back into its own; everything between is here.

One request's trip:

1. ``with pipeline.begin(name, version, check) as call``: resolve the version (404 or 503 at once, no lease
   yet) and check the front end's parameters against it (a 400 even on a busy server). Nothing is reserved:
   the front end reads its body next, and an upload is not work the model does (a body that trickles in, or
   never arrives, holds no admission capacity; the bytes it holds are the upload budget's business, in the
   middleware).
2. ``await call.run(inputs)`` (or ``call.explain(inputs)``), once the body is in: the deadline starts, the
   request counts in ``deepvit_inflight_requests``, its images are admitted (:mod:`.admission`, once, with
   their count: refused at once with 503 when they could not be answered in time or the model's queue cannot
   take them), encoded images are decoded through the artifact contract's pixel path in the decode pool, and
   the batched call runs under a lease on the version (an unload waits for it). ``explain`` adds each image's
   attention map drawn over its crop.
3. Leaving the ``with`` block gives the request's images back to admission, whatever happened.

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
from .memory import trim_after
from .metrics import Metrics
from .models.manager import ModelManager, ModelVersion
from .runtime import Prediction

R = TypeVar("R")
Blob = tuple[str | None, bytes]  # (what the caller calls it: a filename, an input element; the bytes)


@dataclass(frozen=True)
class Inputs:
    """What a front end took from its wire format: encoded images, each with what the caller calls it, or
    pixels already at the artifact's input (``uint8 (crop, crop, 3)`` each, the v2 protocol's tensor)."""

    encoded: Sequence[Blob] = ()
    pixels: Sequence[np.ndarray] | None = None

    @property
    def count(self) -> int:
        return len(self.pixels) if self.pixels is not None else len(self.encoded)


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
        self.decode_memory = DecodeMemory(settings.max_decode_memory_bytes, on_release=trim_after)
        self.admission = a = Admission(settings.admission_wait_s, settings.max_pending_images)
        metrics.pending_images.set_function(lambda: a.pending)
        metrics.estimated_wait.set_function(lambda: a.estimated_wait_s(1))
        metrics.image_cost.set_function(lambda: a.per_image_s or 0.0)

    def begin(self, name: str | None, version: int | None, check: Callable[[ModelVersion], None] | None = None) -> Call:
        """Resolve the version a request names (the default model and its latest version when it names
        none) and run the front end's ``check`` of its parameters against it (a bad parameter is a 400 even on
        a busy server), before anything of its body is read; nothing is reserved yet. Use it as a context
        manager: leaving the block gives what the request held in the pipeline back."""
        mv = self.models.resolve(name, version)
        if check is not None:
            check(mv)
        return Call(self, mv, name, version)

    async def offload(self, fn: Callable[..., R], *args: Any) -> R:
        """Blocking work of a request (a front end's body translation, drawing) in the decode pool."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)


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

    async def run(self, inputs: Inputs, within_s: float | None = None) -> Answer:
        """The request's inputs in (its body is in), the answer out: admit, decode, infer. ``within_s``: the
        caller's own deadline (gRPC's), when it is sooner than the server's."""
        answer, _ = await self._run(inputs, within_s)
        return answer

    async def explain(self, inputs: Inputs) -> Explanation:
        """``run``, then each image's attention map drawn over its crop (for a version that passed
        :func:`require_attention`). The drawing runs in the decode pool once the answer is in; the request's
        deadline no longer applies, since its work is done."""
        answer, pixels = await self._run(inputs, None)
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

        overlays = await self.pipeline.offload(draw)
        return Explanation(answer, spec.grid, attention, overlays)

    async def _run(self, inputs: Inputs, within_s: float | None) -> tuple[Answer, Sequence[np.ndarray]]:
        self._start(within_s)
        self._admit(inputs.count)
        pixels = inputs.pixels if inputs.pixels is not None else await self._decode(inputs.encoded)
        return await self._infer(pixels), pixels

    def _start(self, within_s: float | None) -> None:
        """The body is in: the deadline counts from now (a slow upload is the client's link, not a queue to
        report), and the request counts in ``deepvit_inflight_requests``."""
        timeout = self.pipeline.settings.request_timeout_s
        self.deadline = time.monotonic() + (timeout if within_s is None else min(timeout, within_s))
        if not self._in_flight:
            self._in_flight = True
            self.pipeline.metrics.inflight.inc()

    def _admit(self, images: int) -> None:
        """Hold ``images`` in admission, or refuse at once, before decoding anything: when the pipeline could
        not answer them in time, or the model's queue cannot take them."""
        mv = self.model
        if mv.state == "ready" and not mv.batcher.has_capacity(images):
            raise UnavailableError(
                f"the queue of {mv.name} is full ({mv.batcher.depth} of {mv.batcher.max_queue_size} images "
                "waiting); retry shortly",
                reason="queue_full",
            )
        self.pipeline.admission.admit(images)
        self.reserved += images

    def _check_deadline(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            raise DeadlineExceededError(f"the request's deadline passed before {what}; the server is overloaded")

    async def _decode(self, blobs: Sequence[Blob]) -> list[np.ndarray]:
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
                self._check_deadline("its image was decoded")  # waited too long for a decode thread
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

    async def _infer(self, pixels: Sequence[np.ndarray]) -> Answer:
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


class _SkippedError(Exception):
    """An image not decoded because another image of its request had already failed."""
