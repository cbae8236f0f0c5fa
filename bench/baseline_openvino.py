"""The baseline a user who knows OpenVINO would write in an afternoon: a plain FastAPI server over OpenVINO's
own runtime, ``compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})`` (OpenVINO's streams and its
default precision: bf16 on a CPU with AMX, float32 elsewhere), one inference request per thread of FastAPI's
pool and one call per request, no batching.

It decodes through the same pixel path and answers what ``/classify`` answers (the top 5), like
``bench/baseline.py``; ``deepvit bench`` drives it with ``hey`` in the same run. Run it alone with
``python -m deepvit.bench.baseline_openvino ARTIFACT --port PORT``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from fastapi import FastAPI

from deepvit.artifact.session import read_metadata

from .baseline import main, naive_app


def create_app(artifact: Path) -> FastAPI:
    import openvino as ov  # the benchmark's (dev) dependency: the service computes through ONNX Runtime

    compiled = ov.Core().compile_model(str(artifact), "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})
    local = threading.local()  # an inference request is not shared between threads

    def infer(crop: np.ndarray) -> np.ndarray:
        request = getattr(local, "request", None) or compiled.create_infer_request()
        local.request = request
        logits: np.ndarray = np.asarray(request.infer([crop[None]])[0])[0]
        return logits

    return naive_app("baseline: OpenVINO, one call per request", read_metadata(artifact), infer)


if __name__ == "__main__":
    main(create_app, port=8101)
