"""A fault in the model fails the requests it touched with a JSON 500 that says so, and the server goes on
serving. In process, with a real artifact whose session is made to fail (a fake ``run`` on the runtime)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from inprocess import InProcessApp, grey_png, v2_bytes_request
from serving import metric_samples

from deepvit.service.errors import InferenceError


def _broken_session(batch: np.ndarray) -> np.ndarray:
    raise InferenceError(f"inference failed in ONNX Runtime on a batch of {len(batch)}: CUDA error: out of memory")


def _nan_logits(batch: np.ndarray) -> np.ndarray:
    return np.full((len(batch), 10), np.nan, dtype=np.float32)


@pytest.mark.parametrize(
    ("fault", "words"),
    [(_broken_session, "inference failed"), (_nan_logits, "non-finite logits")],
    ids=["session error", "nan logits"],
)
def test_a_model_fault_is_a_json_500_and_the_server_keeps_serving(
    tiny_app: InProcessApp, fault: Callable[[np.ndarray], np.ndarray], words: str
) -> None:
    png = grey_png()

    def classified() -> float:
        return metric_samples(tiny_app.ctx.metrics.render().decode(), "deepvit_images_total").get('{model="tiny"}', 0)

    async def run() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with tiny_app.serving() as (client, mv):

            async def both() -> list[httpx.Response]:
                return [
                    await client.post("/classify", content=png, headers={"content-type": "image/png"}),
                    await client.post("/v2/models/tiny/infer", json=v2_bytes_request(png)),
                ]

            mv.runtime.run = fault  # type: ignore[method-assign]  # the fault lasts for these requests only
            failed = await both()
            assert classified() == 0  # deepvit_images_total: no answer, no classified image
            del mv.runtime.run
            after = await both()
            assert classified() == 2
            return failed, after

    failed, after = asyncio.run(run())
    for r in failed:
        assert r.status_code == 500
        assert r.headers["content-type"] == "application/json"
        assert words in r.json()["error"]  # valid JSON, no NaN in it
    for r in after:
        assert r.status_code == 200, r.text
