"""``POST /explain``: what ``/classify`` answers, plus where the model looked — the attention rollout over the
patch grid that the artifact computes in its graph, and that map drawn over the centre crop the model saw.

It takes what ``/classify`` takes and goes through the same pipeline and batcher; the answer has
``/classify``'s layout with, beside each image's predictions, ``attention`` (``{"grid": G, "values": [G*G
floats, row-major, summing to 1]}``) and ``overlay_png`` (base64). With ``Accept: image/png`` and one image the
answer is the PNG itself. A version exported without the attention output is a 409 naming the re-export.
"""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field

from deepvit.artifact.predictions import top_k as top_k_of

from ..context import AppContext, get_context
from ..errors import NotAcceptableError
from ..models.manager import ModelVersion
from ..pipeline import Explanation, Inputs, require_attention
from .classify import ModelRef, ScoredClass, top_k_check
from .responses import error_responses
from .uploads import IMAGE_REQUEST_BODY, ModelName, ModelVersionNumber, TopK, is_multipart, read_images

router = APIRouter(tags=["classification"])

_ERRORS = error_responses(
    {
        400: "undecodable image or bad parameter",
        404: "unknown model or version",
        406: "Accept: image/png with more than one image",
        409: "the model's artifact has no attention output (re-export with deepvit export --explain)",
        413: "body or pixel count over the limit",
        415: "unsupported media type",
        503: "not ready, queue full or draining (see Retry-After)",
        504: "deadline passed while queued",
    }
)


class AttentionMap(BaseModel):
    grid: int = Field(description="the patch grid is grid x grid")
    values: list[float] = Field(description="grid * grid values, row-major over the patches, summing to 1")


class ExplainResponse(BaseModel):
    model: ModelRef
    predictions: list[ScoredClass] = Field(description="top-k classes, highest score first")
    attention: AttentionMap = Field(description="attention rollout of the cls token over the patches")
    overlay_png: str = Field(description="the attention drawn over the centre crop the model saw, base64 PNG")


class ExplainedFile(BaseModel):
    filename: str | None
    predictions: list[ScoredClass]
    attention: AttentionMap
    overlay_png: str


class MultiExplainResponse(BaseModel):
    model: ModelRef
    results: list[ExplainedFile] = Field(description="one per 'file' part, in the order of the parts")


def _wants_png(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    return "image/png" in accept and "json" not in accept


@router.post(
    "/explain",
    response_model=ExplainResponse | MultiExplainResponse,
    responses={
        **_ERRORS,
        200: {"content": {"image/png": {}}, "description": "the answer (PNG with Accept: image/png)"},
    },
    summary="Classify and show where the model looked: attention rollout and its heat map over the crop",
    openapi_extra={"requestBody": IMAGE_REQUEST_BODY},
)
async def explain(
    request: Request,
    ctx: Annotated[AppContext, Depends(get_context)],
    top_k: TopK = 5,
    model: ModelName = None,
    version: ModelVersionNumber = None,
) -> ExplainResponse | MultiExplainResponse | Response:
    multipart = is_multipart(request)
    png = _wants_png(request)
    top_k_ok = top_k_check(top_k)

    def check(mv: ModelVersion) -> None:
        top_k_ok(mv)
        require_attention(mv)

    with ctx.pipeline.begin(model, version, check) as call:
        blobs = await read_images(request, ctx, multipart)
        if png and len(blobs) > 1:
            raise NotAcceptableError(
                f"Accept: image/png answers one image, and the request has {len(blobs)}; "
                "ask for application/json to have every image's overlay (base64) in one answer"
            )
        found = await call.explain(Inputs(blobs))
    request.state.log.update(found.answer.log_fields())
    mv = found.answer.model
    if png:
        return Response(
            found.overlays[0],
            media_type="image/png",
            headers={"X-Model-Name": mv.name, "X-Model-Version": str(mv.version)},
        )
    ref = ModelRef(name=mv.name, version=mv.version)
    items = _explained(found, top_k)
    if not multipart:
        return ExplainResponse(model=ref, **items[0])
    return MultiExplainResponse(
        model=ref, results=[ExplainedFile(filename=f, **i) for (f, _), i in zip(blobs, items, strict=True)]
    )


def _explained(found: Explanation, top_k: int) -> list[dict[str, object]]:
    labels = found.answer.model.labels
    return [
        {
            "predictions": [ScoredClass(**s) for s in top_k_of(p.logits, top_k, labels)],
            "attention": AttentionMap(grid=found.grid, values=[float(v) for v in att]),
            "overlay_png": base64.b64encode(png).decode("ascii"),
        }
        for p, att, png in zip(found.answer.predictions, found.attention, found.overlays, strict=True)
    ]
