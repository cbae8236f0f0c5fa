"""The baseline a user would otherwise pick: a plain FastAPI server that makes one ONNX Runtime call per
request (no batching, ONNX Runtime's default threads), decoding and inference in FastAPI's thread pool.

It decodes through the same pixel path and answers what ``/classify`` answers (the top 5), so the two servers
do the same work per image; ``deepvit bench`` drives both with ``hey`` in the same run. Run it alone with
``python -m deepvit.bench.baseline ARTIFACT --port PORT``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool

from deepvit.artifact.metadata import ArtifactMetadata
from deepvit.artifact.pixels import ImageLimits, preprocess
from deepvit.artifact.predictions import top_k
from deepvit.artifact.session import metadata_of, open_session
from deepvit.service.config import Settings


def create_app(artifact: Path) -> FastAPI:
    session = open_session(artifact)  # ONNX Runtime's default: one intra-op thread per core
    input_name = session.get_inputs()[0].name

    def infer(crop: np.ndarray) -> np.ndarray:
        logits: np.ndarray = session.run(None, {input_name: crop[None]})[0][0]
        return logits

    return naive_app("baseline: one ONNX Runtime call per request", metadata_of(session, str(artifact)), infer)


def naive_app(title: str, meta: ArtifactMetadata, infer: Callable[[np.ndarray], np.ndarray]) -> FastAPI:
    """``POST /classify`` (a raw image body, decoded through the pixel path and answered as ``/classify``
    answers, top 5) and ``GET /readyz``; ``infer`` takes one crop to its logits, in FastAPI's thread pool."""
    settings = Settings()  # the service's default limits: the same pixel path as a default server
    limits = ImageLimits(settings.max_image_pixels, settings.max_aspect_ratio)
    app = FastAPI(title=title)

    def classify_one(body: bytes) -> dict[str, Any]:
        crop = preprocess(body, meta.preprocess, limits)
        return {"predictions": top_k(infer(crop), 5, meta.labels)}

    @app.post("/classify")
    async def classify(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(classify_one, await request.body())

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return app


def main(create: Callable[[Path], FastAPI] = create_app, port: int = 8100) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("artifact", type=Path)
    p.add_argument("--port", type=int, default=port)
    args = p.parse_args()
    uvicorn.run(create(args.artifact), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
