"""``grpc.health.v1`` following readiness, so that Kubernetes' native gRPC probes (and ``grpc_health_probe``)
ask what ``/readyz`` answers: ``SERVING`` when the server takes traffic, ``NOT_SERVING`` while models load,
after a failed start, with nothing loaded, and from the start of a drain on, for good.

The server as a whole (service ``""``) and the inference service by name report the same status. A ``Check``
reads readiness at that moment; ``Watch`` streams are told of changes by ``follow``, which looks every
``interval_s``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # not in grpc-stubs

from ..context import AppContext

SERVICE = "inference.GRPCInferenceService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health(health_aio.HealthServicer):  # type: ignore[misc]  # untyped: see the import
    def __init__(self, ctx: AppContext) -> None:
        super().__init__()
        self.ctx = ctx
        self._server_status[SERVICE] = NOT_SERVING

    async def update(self) -> None:
        status = SERVING if self.ctx.readiness().ready else NOT_SERVING
        for service in ("", SERVICE):
            await self.set(service, status)

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:  # noqa: N802
        # (the protocol's method name) Readiness as of now, not as of the last look.
        await self.update()
        return await super().Check(request, context)

    async def follow(self, interval_s: float = 0.5) -> None:
        while True:
            await self.update()
            await asyncio.sleep(interval_s)

    async def drain(self) -> None:
        await self.enter_graceful_shutdown()  # NOT_SERVING from now on, whatever update finds
