"""A full queue is refused before the body is decoded, on /classify and on the v2 infer endpoint alike:
under overload a request costs a header check, not a decode. In process, with a real artifact."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from service.app import create_app
from service.config import Settings


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 127, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_full_queue_answers_503_before_decoding(exported_tiny_patch: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "tiny" / "1").mkdir(parents=True)
    shutil.copy(exported_tiny_patch, repo / "tiny" / "1" / "model.onnx")
    app = create_app(Settings(model_repository=repo, providers=["cpu"], warmup=False))
    ctx = app.state.ctx
    png = _png()
    v2_body = {
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(png).decode()]}]
    }

    def decoded() -> float:
        return sum(s.value for s in ctx.metrics.preprocess.collect()[0].samples if s.name.endswith("_count"))

    async def run() -> list[httpx.Response]:
        mv = await ctx.models.load_version("tiny", 1, repo / "tiny" / "1" / "model.onnx")
        ctx.models.loaded = True
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                ok = await client.post("/classify", content=png, headers={"content-type": "image/png"})
                assert ok.status_code == 200, ok.text
                before = decoded()
                mv.batcher._waiting = mv.batcher.max_queue_size  # as if the queue were full
                answers = [
                    await client.post("/classify", content=png, headers={"content-type": "image/png"}),
                    await client.post("/v2/models/tiny/infer", json=v2_body),
                ]
                mv.batcher._waiting = 0
                assert decoded() == before, "a refused request was decoded"
                return answers
        finally:
            await ctx.models.close()

    try:
        answers = asyncio.run(run())
    finally:
        ctx.decode_pool.shutdown()
    for r in answers:
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"]
        assert "queue" in r.json()["error"]
