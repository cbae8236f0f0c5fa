"""The image input that ``/classify`` and ``/explain`` take: one image as the raw body (``image/*`` or
``application/octet-stream``), or several as ``multipart/form-data`` parts named ``file``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from ..context import AppContext
from ..errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError

# The query parameters both routes take.
TopK = Annotated[int, Query(ge=1, description="how many classes to return")]
ModelName = Annotated[str | None, Query(description="model name (default: the default model)")]
ModelVersionNumber = Annotated[int | None, Query(ge=1, description="model version (default: the latest)")]

# The OpenAPI request body of both routes (FastAPI cannot infer it: the handlers read the body themselves).
IMAGE_REQUEST_BODY: dict[str, Any] = {
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


def is_multipart(request: Request) -> bool:
    """Whether the body is multipart; a 415 for a content type that holds no image."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = media == "multipart/form-data"
    if not (multipart or media.startswith("image/") or media == "application/octet-stream"):
        raise UnsupportedMediaTypeError(
            f"content type {media or '(none)'!r} is not supported; send the image bytes with Content-Type "
            "image/jpeg (or image/png, application/octet-stream), or multipart/form-data with 'file' parts"
        )
    return multipart


async def read_images(request: Request, ctx: AppContext, multipart: bool) -> list[tuple[str | None, bytes]]:
    """The request's images as (filename, bytes): the raw body, or every multipart ``file`` part in order."""
    if not multipart:
        return [(None, await request.body())]
    return await read_parts(request, ctx)


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
