"""A closed-loop gRPC load generator: ``tritonclient.grpc.aio`` (Triton's own client) keeping a fixed number of
``ModelInfer`` calls in flight over one HTTP/2 connection, each an encoded photograph as a ``BYTES`` input
with the top 5 asked for (``class_count``), so that the server does what ``/classify`` does for ``hey``:
decode, preprocess, infer, top-k. No established gRPC load tool installs here (Triton's perf_analyzer is not
published as an installable binary), so this is the stand-in; it runs in the benchmark's own process, one
event loop, and at high concurrency its Python client costs a core that hey's Go client would not.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class Load:
    times: list[float]  # seconds per answered call
    wall_s: float  # from the start to the last answer
    errors: int


async def _drive(target: str, model: str, photo: bytes, concurrency: int, duration_s: float) -> Load:
    from tritonclient.grpc import InferInput, InferRequestedOutput
    from tritonclient.grpc import aio as triton_aio
    from tritonclient.utils import InferenceServerException

    image = InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([photo], dtype=np.object_))
    top5 = InferRequestedOutput("logits", class_count=5)
    times: list[float] = []
    last_end = 0.0
    errors = 0
    client = triton_aio.InferenceServerClient(target)
    started = time.perf_counter()
    stop = started + duration_s

    async def worker() -> None:
        nonlocal errors, last_end
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                await client.infer(model, [image], outputs=[top5], client_timeout=60)
            except InferenceServerException:
                errors += 1
                continue
            t1 = time.perf_counter()
            times.append(t1 - t0)
            last_end = t1 - started

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return Load(times, last_end, errors)


def drive(target: str, model: str, photo: bytes, concurrency: int, duration_s: float) -> Load:
    try:
        import tritonclient.grpc  # noqa: F401
    except ImportError:
        raise SystemExit("deepvit bench: the gRPC layer needs tritonclient[grpc] (the dev extra)") from None
    return asyncio.run(_drive(target, model, photo, concurrency, duration_s))
