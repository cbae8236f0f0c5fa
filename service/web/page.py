"""``GET /`` and its two assets, from the package's ``static/`` folder, read once.

The page calls the API as any client does (``GET /models``, ``POST /explain`` or, for a model without the
attention output, ``POST /classify``), so what it shows is what the API answers. Its Content-Security-Policy
allows nothing but this server: scripts and styles from here, images from here and from the page's own data
and blob URLs (the uploaded image, the returned PNG), requests to here only.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, Response

router = APIRouter(tags=["demo page"], include_in_schema=False)

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_ASSETS = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript", "app.css": "text/css"}


@cache
def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def _serve(name: str) -> Response:
    headers = {
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }
    return Response(_asset(name), media_type=_ASSETS[name], headers=headers)


@router.get("/")
async def index() -> Response:
    return _serve("index.html")


@router.get("/web/app.js")
async def script() -> Response:
    return _serve("app.js")


@router.get("/web/app.css")
async def style() -> Response:
    return _serve("app.css")
