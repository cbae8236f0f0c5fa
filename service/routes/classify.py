"""``POST /classify``: one image as the raw body, or several as multipart ``file`` parts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from deepvit.artifact.predictions import top_k as top_k_of

from ..context import AppContext, get_context
from ..errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from ..models.manager import ModelVersion
from .responses import error_responses

router = APIRouter(tags=["classification"])

_ERRORS = error_responses(
    {
        400: "undecodable image or bad parameter",
        404: "unknown model or version",
        413: "body or pixel count over the limit",
        415: "unsupported media type",
        503: "not ready, queue full or draining (see Retry-After)",
        504: "deadline passed while queued",
    }
)


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
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = media == "multipart/form-data"
    if not (multipart or media.startswith("image/") or media == "application/octet-stream"):
        raise UnsupportedMediaTypeError(
            f"content type {media or '(none)'!r} is not supported; send the image bytes with Content-Type "
            "image/jpeg (or image/png, application/octet-stream), or multipart/form-data with 'file' parts"
        )

    def check(mv: ModelVersion) -> None:
        n_classes = mv.runtime.meta.num_classes
        if top_k > n_classes:
            raise BadRequestError(f"top_k={top_k} is more than the model's {n_classes} classes")

    with ctx.pipeline.begin(model, version, check) as call:
        blobs = await read_parts(request, ctx) if multipart else [(None, await request.body())]
        call.received(len(blobs))
        answer = await call.classify(blobs)
    request.state.log.update(answer.log_fields())
    mv = answer.model
    ref = ModelRef(name=mv.name, version=mv.version)
    scored = [[ScoredClass(**s) for s in top_k_of(p.logits, top_k, mv.labels)] for p in answer.predictions]
    if not multipart:
        return ClassifyResponse(model=ref, predictions=scored[0])
    return MultiClassifyResponse(
        model=ref,
        results=[FileResult(filename=f, predictions=s) for (f, _), s in zip(blobs, scored, strict=True)],
    )
