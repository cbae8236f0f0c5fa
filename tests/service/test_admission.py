"""A full queue is refused before the body is decoded, on /classify and on the v2 infer endpoint alike:
under overload a request costs a header check, not a decode. In process, with a real artifact."""

from __future__ import annotations

import asyncio

import httpx
from inprocess import InProcessApp, grey_png, v2_bytes_request


def test_a_full_queue_answers_503_before_decoding(tiny_app: InProcessApp) -> None:
    ctx = tiny_app.ctx
    png = grey_png()

    def decoded() -> float:
        return sum(s.value for s in ctx.metrics.preprocess.collect()[0].samples if s.name.endswith("_count"))

    async def run() -> list[httpx.Response]:
        async with tiny_app.serving() as (client, mv):
            ok = await client.post("/classify", content=png, headers={"content-type": "image/png"})
            assert ok.status_code == 200, ok.text
            before = decoded()
            mv.batcher._waiting = mv.batcher.max_queue_size  # as if the queue were full
            answers = [
                await client.post("/classify", content=png, headers={"content-type": "image/png"}),
                await client.post("/v2/models/tiny/infer", json=v2_bytes_request(png)),
            ]
            mv.batcher._waiting = 0
            assert decoded() == before, "a refused request was decoded"
            return answers

    for r in asyncio.run(run()):
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"]
        assert "queue" in r.json()["error"]
