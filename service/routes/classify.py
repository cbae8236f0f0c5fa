"""``POST /classify``: one image as the raw body, or several as multipart ``file`` parts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from deepvit.artifact.predictions import top_k as top_k_of

from ..context import AppContext, get_context
from ..errors import BadRequestError
from ..models.manager import ModelVersion
from ..pipeline import Inputs
from .responses import error_responses
from .uploads import IMAGE_REQUEST_BODY, ModelName, ModelVersionNumber, TopK, is_multipart, read_images

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


def top_k_check(top_k: int) -> Callable[[ModelVersion], None]:
    """The check of ``top_k`` against the version a request resolves to (before its body is read)."""

    def check(mv: ModelVersion) -> None:
        n_classes = mv.runtime.meta.num_classes
        if top_k > n_classes:
            raise BadRequestError(f"top_k={top_k} is more than the model's {n_classes} classes")

    return check


@router.post(
    "/classify",
    response_model=ClassifyResponse | MultiClassifyResponse,
    responses=_ERRORS,
    summary="Classify one image (raw body) or several (multipart 'file' parts)",
    openapi_extra={"requestBody": IMAGE_REQUEST_BODY},
)
async def classify(
    request: Request,
    ctx: Annotated[AppContext, Depends(get_context)],
    top_k: TopK = 5,
    model: ModelName = None,
    version: ModelVersionNumber = None,
) -> JSONResponse:
    multipart = is_multipart(request)
    with ctx.pipeline.begin(model, version, top_k_check(top_k)) as call:
        blobs = await read_images(request, ctx, multipart)
        answer = await call.run(Inputs(blobs))
    request.state.log.update(answer.log_fields())
    mv = answer.model
    ref = {"name": mv.name, "version": mv.version}
    scored = [top_k_of(p.logits, top_k, mv.labels) for p in answer.predictions]
    # The answer as the response models above declare it (tests/service check it against them), built as
    # plain data: FastAPI's validation of a returned model is the event loop's largest cost per request.
    if not multipart:
        return JSONResponse({"model": ref, "predictions": scored[0]})
    return JSONResponse(
        {"model": ref, "results": [{"filename": f, "predictions": s} for (f, _), s in zip(blobs, scored, strict=True)]}
    )
