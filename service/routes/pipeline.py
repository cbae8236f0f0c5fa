"""The request pipeline every inference route shares: early admission, decoding and preprocessing off the
event loop, and the batched inference, with batcher errors translated into service errors once."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from ..batcher import BatcherClosedError, BatchFailedError, DeadlineExceededError, QueueFullError
from ..context import AppContext
from ..errors import DeadlineExceededError as DeadlineError
from ..errors import InferenceError, RequestError, UnavailableError
from ..preprocess import ImageLimits, PixelBudget, preprocess
from ..repository import ModelVersion
from ..runtime import Prediction


async def infer_images(ctx: AppContext, mv: ModelVersion, images: list[np.ndarray], started: float) -> list[Prediction]:
    """Queue preprocessed images on the model's batcher; batcher errors become service errors."""
    deadline = started + ctx.settings.request_timeout_s
    try:
        preds = await mv.batcher.submit_many(images, deadline)
    except QueueFullError as exc:
        raise UnavailableError(f"{exc}; retry shortly", reason="queue_full", retry_after_s=1) from None
    except DeadlineExceededError as exc:
        raise DeadlineError(f"{exc} (deadline {ctx.settings.request_timeout_s:g}s); the server is overloaded") from None
    except BatcherClosedError as exc:
        raise UnavailableError(str(exc), reason="unloading") from None
    except BatchFailedError as exc:
        raise InferenceError(str(exc)) from exc
    for i, p in enumerate(preds):
        if not np.isfinite(p.logits).all():  # no answer to give (and JSON has no NaN): the model's fault
            raise InferenceError(
                f"model {mv.name} version {mv.version} produced non-finite logits for image {i} "
                f"(precision {mv.runtime.meta.precision}); the artifact is faulty for this input"
            )
    ctx.metrics.images.labels(mv.name).inc(len(preds))  # classified: the request has its answers
    return preds


def admit(ctx: AppContext, mv: ModelVersion, images: int = 1) -> None:
    """Refuse at once, before reading and decoding anything, when the model's queue is already full."""
    if not mv.batcher.has_capacity(images):
        raise UnavailableError(
            f"the queue of {mv.name} is full ({mv.batcher.depth} of {mv.batcher.max_queue_size} images waiting); "
            "retry shortly",
            reason="queue_full",
        )


async def preprocess_all(
    ctx: AppContext, mv: ModelVersion, blobs: list[tuple[str | None, bytes]], deadline: float | None = None
) -> list[np.ndarray]:
    """Decode and preprocess a request's images in the decode pool. The first failure settles the request:
    images not yet started are skipped rather than decoded for an answer that is already an error."""
    loop = asyncio.get_running_loop()
    spec = mv.runtime.meta.preprocess
    limits = ImageLimits(ctx.settings.max_image_pixels, ctx.settings.max_aspect_ratio)
    budget = PixelBudget(ctx.settings.max_request_pixels)
    failed = threading.Event()

    def one(data: bytes) -> np.ndarray:
        if failed.is_set():
            raise _SkippedError
        try:
            if deadline is not None and time.monotonic() > deadline:  # waited too long for a decode thread
                raise DeadlineError(
                    "the request's deadline passed before its image was decoded; the server is overloaded"
                )
            t0 = time.perf_counter()
            out = preprocess(data, spec, limits, budget)
            ctx.metrics.preprocess.observe(time.perf_counter() - t0)
            return out
        except BaseException:
            failed.set()
            raise

    results = await asyncio.gather(
        *(loop.run_in_executor(ctx.decode_pool, one, data) for _, data in blobs), return_exceptions=True
    )
    for (filename, _), res in zip(blobs, results, strict=True):
        if isinstance(res, _SkippedError) or not isinstance(res, BaseException):
            continue
        if isinstance(res, RequestError) and len(blobs) > 1:  # say which part, so the caller can fix that one
            raise type(res)(f"part {filename!r}: {res.message}")
        raise res
    return [res for res in results if isinstance(res, np.ndarray)]


class _SkippedError(Exception):
    """An image not decoded because another image of its request had already failed."""
