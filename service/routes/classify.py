"""``POST /classify``: one image as the raw body, or several as multipart ``file`` parts."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from ..batcher import BatcherClosedError, BatchFailedError, DeadlineExceededError, QueueFullError
from ..context import AppContext, get_context
from ..errors import (
    BadRequestError,
    InferenceError,
    PayloadTooLargeError,
    RequestError,
    UnavailableError,
    UnsupportedMediaTypeError,
)
from ..errors import DeadlineExceededError as DeadlineError
from ..postprocess import top_k as top_k_of
from ..preprocess import ImageLimits, preprocess
from ..repository import ModelVersion
from ..runtime import Prediction

router = APIRouter(tags=["classification"])


class ModelRef(BaseModel):
    name: str
    version: int


class ScoredClass(BaseModel):
    label: str
    class_id: int
    score: float = Field(description="softmax probability")


class ClassifyResponse(BaseModel):
    model: ModelRef
    predictions: list[ScoredClass] = Field(description="top-k classes, highest score first")


class FileResult(BaseModel):
    filename: str | None
    predictions: list[ScoredClass]


class MultiClassifyResponse(BaseModel):
    model: ModelRef
    results: list[FileResult] = Field(description="one per 'file' part, in the order of the parts")


class ErrorResponse(BaseModel):
    error: str


_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse, "description": what}
    for code, what in {
        400: "undecodable image or bad parameter",
        404: "unknown model or version",
        413: "body or pixel count over the limit",
        415: "unsupported media type",
        503: "not ready, queue full or draining (see Retry-After)",
        504: "deadline passed while queued",
    }.items()
}


async def infer_images(ctx: AppContext, mv: ModelVersion, images: list[np.ndarray], started: float) -> list[Prediction]:
    """Queue preprocessed images on the model's batcher; batcher errors become service errors."""
    deadline = started + ctx.settings.request_timeout_s
    try:
        return await mv.batcher.submit_many(images, deadline)
    except QueueFullError as exc:
        raise UnavailableError(f"{exc}; retry shortly", reason="queue_full", retry_after_s=1) from None
    except DeadlineExceededError as exc:
        ctx.metrics.rejected.labels("deadline").inc()
        raise DeadlineError(f"{exc} (deadline {ctx.settings.request_timeout_s:g}s); the server is overloaded") from None
    except BatcherClosedError as exc:
        raise UnavailableError(str(exc), reason="unloading") from None
    except BatchFailedError as exc:
        raise InferenceError(str(exc)) from exc


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
    loop = asyncio.get_running_loop()
    spec = mv.runtime.meta.preprocess
    limits = ImageLimits(ctx.settings.max_image_pixels, ctx.settings.max_aspect_ratio)

    def one(data: bytes) -> np.ndarray:
        if deadline is not None and time.monotonic() > deadline:  # waited too long for a decode thread
            ctx.metrics.rejected.labels("deadline").inc()
            raise DeadlineError("the request's deadline passed before its image was decoded; the server is overloaded")
        t0 = time.perf_counter()
        out = preprocess(data, spec, limits)
        ctx.metrics.preprocess.observe(time.perf_counter() - t0)
        return out

    results = await asyncio.gather(
        *(loop.run_in_executor(ctx.decode_pool, one, data) for _, data in blobs), return_exceptions=True
    )
    arrays: list[np.ndarray] = []
    for (filename, _), res in zip(blobs, results, strict=True):
        if isinstance(res, RequestError):
            if len(blobs) > 1:  # say which part, so the caller can fix that one
                raise type(res)(f"part {filename!r}: {res.message}")
            raise res
        if isinstance(res, BaseException):
            raise res
        arrays.append(res)
    return arrays


async def read_parts(request: Request, ctx: AppContext) -> list[tuple[str | None, bytes]]:
    limit = ctx.settings.max_images_per_request
    try:
        form = await request.form(max_files=limit, max_fields=limit)
    except MultiPartException as exc:
        raise BadRequestError(f"malformed multipart body: {exc.message}") from None
    except StarletteHTTPException as exc:  # Starlette's own limits on parts
        if "Too many files" in str(exc.detail):
            raise PayloadTooLargeError(f"more than {limit} images in one request; send at most {limit}") from None
        raise BadRequestError(f"malformed multipart body: {exc.detail}") from None
    blobs: list[tuple[str | None, bytes]] = []
    try:
        for key, value in form.multi_items():
            if key != "file" or not isinstance(value, UploadFile):
                raise BadRequestError(f"unexpected multipart part {key!r}; send each image as a file part named 'file'")
            blobs.append((value.filename, await value.read()))
    finally:
        await form.close()
    if not blobs:
        raise BadRequestError("the multipart body has no 'file' parts; send each image as a part named 'file'")
    return blobs


@router.post(
    "/classify",
    response_model=ClassifyResponse | MultiClassifyResponse,
    responses=_ERRORS,
    summary="Classify one image (raw body) or several (multipart 'file' parts)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "image/*": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                        "required": ["file"],
                    }
                },
            },
        }
    },
)
async def classify(
    request: Request,
    ctx: Annotated[AppContext, Depends(get_context)],
    top_k: Annotated[int, Query(ge=1, description="how many classes to return")] = 5,
    model: Annotated[str | None, Query(description="model name (default: the default model)")] = None,
    version: Annotated[int | None, Query(ge=1, description="model version (default: the latest)")] = None,
) -> ClassifyResponse | MultiClassifyResponse:
    started = time.monotonic()
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = media == "multipart/form-data"
    if not (multipart or media.startswith("image/") or media == "application/octet-stream"):
        raise UnsupportedMediaTypeError(
            f"content type {media or '(none)'!r} is not supported; send the image bytes with Content-Type "
            "image/jpeg (or image/png, application/octet-stream), or multipart/form-data with 'file' parts"
        )
    # Resolved without a lease while the body uploads and decodes (a slow upload holds up no swap); the lease
    # keeps the version serving from submission until the answer is in, even if a newer one replaces it.
    mv = ctx.models.resolve(model, version)
    n_classes = mv.runtime.meta.num_classes
    if top_k > n_classes:
        raise BadRequestError(f"top_k={top_k} is more than the model's {n_classes} classes")
    admit(ctx, mv)
    if multipart:
        blobs = await read_parts(request, ctx)
        if mv.state == "ready":  # else replaced meanwhile: the successor's batcher answers at submission
            admit(ctx, mv, len(blobs))
    else:
        blobs = [(None, await request.body())]
    images = await preprocess_all(ctx, mv, blobs, started + ctx.settings.request_timeout_s)
    with ctx.models.lease_for(mv, model, version) as mv:
        preds = await infer_images(ctx, mv, images, started)
    request.state.log.update(
        model=mv.name, version=mv.version, images=len(preds), batch_size=max(p.batch_size for p in preds)
    )
    ref = ModelRef(name=mv.name, version=mv.version)
    scored = [[ScoredClass(**s) for s in top_k_of(p.logits, top_k, mv.labels)] for p in preds]
    if not multipart:
        return ClassifyResponse(model=ref, predictions=scored[0])
    return MultiClassifyResponse(
        model=ref,
        results=[FileResult(filename=f, predictions=s) for (f, _), s in zip(blobs, scored, strict=True)],
    )
