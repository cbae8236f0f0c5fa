"""DEEPVIT_JPEG_DRAFT: the service decodes an uploaded JPEG at a reduced scale, and holds only that much
decoding memory; off by default."""

from __future__ import annotations

import asyncio
import io

import httpx
from inprocess import InProcessApp
from PIL import Image
from serving import DATA


def _classify_holding(tiny_app: InProcessApp, body: bytes) -> tuple[httpx.Response, list[int]]:
    held: list[int] = []
    memory = tiny_app.ctx.pipeline.decode_memory
    hold = memory.hold

    def recording_hold(pixels: int, wait_s: float):  # type: ignore[no-untyped-def]
        held.append(pixels)
        return hold(pixels, wait_s)

    memory.hold = recording_hold  # type: ignore[method-assign]

    async def run() -> httpx.Response:
        async with tiny_app.serving() as (client, _):
            return await client.post("/classify", content=body, headers={"content-type": "image/jpeg"})

    return asyncio.run(run()), held


def test_the_setting_decodes_uploads_at_a_reduced_scale(tiny_app: InProcessApp) -> None:
    photo = Image.open(DATA / "photos" / "rocket.jpg").convert("RGB").resize((1920, 1280))
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=90)
    body = buf.getvalue()

    r, held = _classify_holding(tiny_app, body)
    assert r.status_code == 200, r.text
    assert held == [1920 * 1280]  # off by default: the whole picture

    pipeline = tiny_app.ctx.pipeline
    pipeline.settings = pipeline.settings.model_copy(update={"jpeg_draft": True})
    r, held = _classify_holding(tiny_app, body)
    assert r.status_code == 200, r.text
    assert held[0] <= 1920 * 1280 // 16  # libjpeg decoded at 1/4 or 1/8 scale
    assert r.json()["predictions"]
