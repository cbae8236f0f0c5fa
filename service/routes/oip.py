"""The Open Inference Protocol (KServe v2) REST endpoints, with its repository extension.

Inference goes through the same preprocessing, dynamic batcher and metrics as ``/classify`` (its helpers; a
request of N images is N batch items). Errors are the service's error tree, so the app's handlers answer them
as the protocol asks: ``{"error": ...}``; 400 for a shape, datatype or input-name mismatch, 404 for an unknown
model or version, 503 for one not ready (or being unloaded). How the tensors map onto the model is in
``deepvit.service.oip.tensors``.

Load and unload change what serves, and have no authentication of their own: they answer 403 unless
``DEEPVIT_REPOSITORY_CONTROL`` allows them. The index stays readable.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from ..context import AppContext, get_context
from ..errors import BadRequestError, ForbiddenError
from ..oip.codec import HEADER_LENGTH
from ..oip.schemas import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ModelReady,
    RepositoryIndexEntry,
    RepositoryIndexRequest,
    RepositoryLoadRequest,
    RepositoryModelState,
    ServerLive,
    ServerMetadata,
)
from ..oip.tensors import EXTENSIONS, Limits, decode_request, encode_answer, model_metadata
from .responses import error_responses

router = APIRouter(prefix="/v2", tags=["open inference protocol (KServe v2)"])

Ctx = Annotated[AppContext, Depends(get_context)]
Version = Annotated[int, Path(ge=1, description="model version")]
M = TypeVar("M", bound=BaseModel)

_ERRORS = error_responses(
    {
        400: "shape, datatype or input-name mismatch; malformed request",
        404: "unknown model or version",
        413: "body or pixel count over the limit",
        503: "model not ready, being unloaded, queue full or draining (see Retry-After)",
        504: "deadline passed while queued",
    }
)
_CONTROL_ERRORS = {**_ERRORS, **error_responses({403: "load and unload are off (DEEPVIT_REPOSITORY_CONTROL)"})}


def _body_as(model: type[M], body: bytes) -> M:
    """An optional JSON body (Triton's clients send an empty one) as ``model``."""
    if not body.strip():
        return model()
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise BadRequestError(f"malformed request body: {exc.errors()[0]['msg']}") from None


# -- server -----------------------------------------------------------------------------------------
@router.get("", response_model=ServerMetadata, summary="Server metadata and the protocol extensions it supports")
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name="deepvit-serve", version=str(request.app.version), extensions=EXTENSIONS)


@router.get("/health/live", response_model=ServerLive, summary="The process is up")
async def server_live() -> ServerLive:
    return ServerLive(live=True)


@router.get("/health/ready", summary="200 when every model is loaded and warmed and the server is not draining")
async def server_ready(ctx: Ctx) -> JSONResponse:
    """The protocol's ``{"ready": bool}`` (clients read that key), with /readyz's details alongside."""
    r = ctx.readiness()
    if r.ready:
        return JSONResponse({"ready": True, "status": "ready", "models": r.models})
    return JSONResponse(
        {"ready": False, "status": "not_ready", "error": r.reason, "models": r.models},
        status_code=503,
        headers={"Retry-After": "1"},
    )


# -- models -----------------------------------------------------------------------------------------
def _metadata(ctx: AppContext, name: str, version: int | None) -> ModelMetadata:
    mv = ctx.models.resolve(name, version)
    return model_metadata(mv, sorted(ctx.models.versions(name)))


@router.get("/models/{name}", response_model=ModelMetadata, responses=_ERRORS, summary="Model metadata")
async def model_meta(ctx: Ctx, name: str) -> ModelMetadata:
    return _metadata(ctx, name, None)


@router.get(
    "/models/{name}/versions/{version}", response_model=ModelMetadata, responses=_ERRORS, summary="Model metadata"
)
async def model_version_meta(ctx: Ctx, name: str, version: Version) -> ModelMetadata:
    return _metadata(ctx, name, version)


def _ready(ctx: AppContext, name: str, version: int | None) -> ModelReady:
    mv = ctx.models.resolve(name, version)  # 404 unknown, 503 loading or unloading
    return ModelReady(name=mv.name, version=str(mv.version), ready=True)


@router.get("/models/{name}/ready", response_model=ModelReady, responses=_ERRORS, summary="200 when it serves")
async def model_ready(ctx: Ctx, name: str) -> ModelReady:
    return _ready(ctx, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready",
    response_model=ModelReady,
    responses=_ERRORS,
    summary="200 when it serves",
)
async def model_version_ready(ctx: Ctx, name: str, version: Version) -> ModelReady:
    return _ready(ctx, name, version)


# -- inference --------------------------------------------------------------------------------------
# The request body is read raw (JSON, or JSON then binary tensors) rather than through a FastAPI body model, so
# its schema is declared here and its models added to the document's components by create_app.
_, _request_defs = models_json_schema([(InferenceRequest, "validation")], ref_template="#/components/schemas/{model}")
OPENAPI_SCHEMAS: dict[str, Any] = _request_defs["$defs"]
_BINARY = {
    "schema": {"type": "string", "format": "binary"},
    "description": f"the JSON message ({HEADER_LENGTH} bytes, as that header says), then the binary tensors in "
    "the order of the tensors that give a binary_data_size",
}
_INFER_DOC: dict[str, Any] = {
    "responses": {
        200: {
            "model": InferenceResponse,
            "description": "JSON, or (binary outputs asked for) JSON then binary tensors",
            "content": {"application/octet-stream": _BINARY},
        },
        **_ERRORS,
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
                "application/octet-stream": _BINARY,
            },
        }
    },
}


async def _infer(request: Request, ctx: AppContext, name: str, version: int | None) -> Response:
    with ctx.pipeline.begin(name, version) as call:  # 404 and 503 at once, before the body is read
        io = call.model.io
        body = await request.body()
        limits = Limits(
            ctx.settings.max_body_bytes, ctx.settings.max_json_body_bytes, ctx.settings.max_images_per_request
        )
        encoding, header_length = request.headers.get("content-encoding"), request.headers.get(HEADER_LENGTH)
        async with ctx.v2_decode_slots:  # a few at a time: decoding costs memory in proportion to the body
            decoded = await ctx.pipeline.offload(decode_request, body, encoding, header_length, io, limits)
        del body
        answer = await call.run(decoded.inputs)
    request.state.log.update(answer.log_fields())
    content, headers = encode_answer(
        decoded.request, answer.model, io, answer.logits, decoded.outputs, attention=answer.attention
    )
    media_type = headers.pop("content-type")
    return Response(content, headers=headers, media_type=media_type)


@router.post("/models/{name}/infer", summary="Inference on the latest served version", **_INFER_DOC)
async def infer(request: Request, ctx: Ctx, name: str) -> Response:
    return await _infer(request, ctx, name, None)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference on one version", **_INFER_DOC)
async def infer_version(request: Request, ctx: Ctx, name: str, version: Version) -> Response:
    return await _infer(request, ctx, name, version)


# -- the repository extension -----------------------------------------------------------------------
@router.post(
    "/repository/index",
    response_model=list[RepositoryIndexEntry],
    summary="Every version on disk or in memory, with its state and why it does not serve",
)
async def repository_index(request: Request, ctx: Ctx) -> list[RepositoryIndexEntry]:
    opts = _body_as(RepositoryIndexRequest, await request.body())
    return [
        RepositoryIndexEntry(name=e.name, version=str(e.version), state=e.state, reason=e.reason)
        for e in await ctx.repository.index()
        if not opts.ready or e.state == "READY"
    ]


def _require_control(ctx: AppContext) -> None:
    if not ctx.settings.repository_control:
        raise ForbiddenError(
            "loading and unloading models by request is off on this server; "
            "set DEEPVIT_REPOSITORY_CONTROL=true to allow it (and keep /v2/repository/ behind your network policy)"
        )


def _state(ctx: AppContext, name: str) -> RepositoryModelState:
    return RepositoryModelState(name=name, versions=[str(v) for v in sorted(ctx.models.versions(name))])


@router.post(
    "/repository/models/{name}/load",
    response_model=RepositoryModelState,
    responses=_CONTROL_ERRORS,
    summary="Load the model's versions the version policy selects (new or changed files, failed ones again)",
)
async def repository_load(request: Request, ctx: Ctx, name: str) -> RepositoryModelState:
    _require_control(ctx)
    opts = _body_as(RepositoryLoadRequest, await request.body())
    if "config" in opts.parameters or any(k.startswith("file:") for k in opts.parameters):
        raise BadRequestError("this server loads models from its repository only: config and files are not taken")
    await ctx.repository.load(name)
    return _state(ctx, name)


@router.post(
    "/repository/models/{name}/unload",
    response_model=RepositoryModelState,
    responses=_CONTROL_ERRORS,
    summary="Unload every version of the model (queued requests finish first); polling leaves it unloaded",
)
async def repository_unload(request: Request, ctx: Ctx, name: str) -> RepositoryModelState:
    _require_control(ctx)
    _body_as(RepositoryLoadRequest, await request.body())
    await ctx.repository.unload(name)
    return _state(ctx, name)
