"""The baseline a user who knows OpenVINO would write in an afternoon: a plain FastAPI server over OpenVINO's
own runtime, ``compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})`` (OpenVINO's streams and its
default precision: bf16 on a CPU with AMX, float32 elsewhere), one inference request per thread of FastAPI's
pool and one call per request, no batching.

It decodes through the same pixel path and answers what ``/classify`` answers (the top 5), like
``bench/baseline.py``; ``deepvit bench`` drives it with ``hey`` in the same run. Run it alone with
``python -m deepvit.bench.baseline_openvino ARTIFACT --port PORT``.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool

from deepvit.artifact.pixels import ImageLimits, preprocess
from deepvit.artifact.predictions import top_k
from deepvit.artifact.session import read_metadata
from deepvit.service.config import Settings


def create_app(artifact: Path) -> FastAPI:
    import openvino as ov  # the benchmark's (dev) dependency: the service computes through ONNX Runtime

    meta = read_metadata(artifact)
    compiled = ov.Core().compile_model(str(artifact), "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})
    settings = Settings()  # the service's default limits: the same pixel path as a default server
    limits = ImageLimits(settings.max_image_pixels, settings.max_aspect_ratio)
    local = threading.local()  # an inference request is not shared between threads
    app = FastAPI(title="baseline: OpenVINO, one call per request")

    def classify_one(body: bytes) -> dict[str, Any]:
        crop = preprocess(body, meta.preprocess, limits)
        request = getattr(local, "request", None) or compiled.create_infer_request()
        local.request = request
        logits = np.asarray(request.infer([crop[None]])[0])[0]
        return {"predictions": top_k(logits, 5, meta.labels)}

    @app.post("/classify")
    async def classify(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(classify_one, await request.body())

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("artifact", type=Path)
    p.add_argument("--port", type=int, default=8101)
    args = p.parse_args()
    uvicorn.run(create_app(args.artifact), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
