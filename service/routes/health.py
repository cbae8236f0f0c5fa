"""Probes and metrics: ``/livez`` (alias ``/healthz``), ``/readyz``, ``/metrics``, ``/models``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse

from ..context import AppContext, get_context
from ..metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])


@router.get("/livez", summary="The process is up")
@router.get("/healthz", summary="The process is up (alias of /livez)")
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz", summary="200 only when every model is loaded and warmed and the server is not draining")
async def readyz(ctx: Annotated[AppContext, Depends(get_context)]) -> JSONResponse:
    r = ctx.readiness()
    if r.ready:
        return JSONResponse({"status": "ready", "models": r.models})
    return JSONResponse(
        {"status": "not_ready", "error": r.reason, "models": r.models},
        status_code=503,
        headers={"Retry-After": "1"},
    )


class PrometheusText(Response):
    media_type = CONTENT_TYPE  # what OpenAPI declares for /metrics: the text exposition format, not JSON


@router.get("/metrics", response_class=PrometheusText, summary="Prometheus text exposition")
async def metrics(ctx: Annotated[AppContext, Depends(get_context)]) -> Response:
    return PrometheusText(ctx.metrics.render())


@router.get("/models", summary="Served models and what their artifacts say about themselves")
async def models(ctx: Annotated[AppContext, Depends(get_context)]) -> dict[str, Any]:
    out = [
        {
            "name": mv.name,
            "version": mv.version,
            "state": mv.state,
            "provider": mv.runtime.provider,
            # What computes it (execution provider and precision) and why (service/engines.py).
            "engine": mv.engine.to_dict() if mv.engine is not None else None,
            "batching": {
                "max_batch_size": mv.batcher.max_batch_size,
                "chosen_by": mv.batch_size_chosen_by,
                "instances": mv.batcher.instances,
                "instances_chosen_by": mv.instances_chosen_by,
                # A lone batch at low load runs on one session over every core (service/batcher.py).
                "solo_session": mv.solo is not None,
                "solo_batches": mv.batcher.solo_batches,
                "warmup_ms_per_image": {str(n): round(1000 * t / n, 3) for n, t in sorted(mv.batch_s.items())},
            },
            "metadata": mv.runtime.meta.to_public_dict(),
        }
        for mv in ctx.models.all_versions()
    ]
    return {"default_model": ctx.models.default_model(), "models": out}
