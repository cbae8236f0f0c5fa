"""The gRPC server beside uvicorn: grpcio's asyncio server on the same event loop, the same ``AppContext``
(pipeline, admission, readiness, metrics), its own port.

It serves the inference service, ``grpc.health.v1`` and server reflection (so that ``grpcurl list`` finds
the service without the proto). Messages are held to ``DEEPVIT_MAX_BODY_BYTES``, the HTTP body limit: gRPC
refuses a larger one with ``RESOURCE_EXHAUSTED`` before it is parsed. The drain (``service/server.py``) tells
it first, so health turns ``NOT_SERVING`` as ``/readyz`` turns 503, and stops it once the calls it accepted
are answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..context import AppContext
from .health import SERVICE, Health
from .servicer import InferenceServicer

log = logging.getLogger("deepvit.grpc")


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcServer:
    def __init__(self, ctx: AppContext, server_version: str) -> None:
        self.ctx = ctx
        self.health = Health(ctx)
        self.servicer = InferenceServicer(ctx, server_version)
        self._server: grpc.aio.Server | None = None
        self._follow: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> int:
        """Bind and serve; the port it listens on. A port that cannot be bound raises ``RuntimeError``."""
        limit = self.ctx.settings.max_body_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", -1),
                # Off, so that a second server on a taken port fails to start instead of sharing it.
                ("grpc.so_reuseport", 0),
            ]
        )
        server.add_generic_rpc_handlers((self.servicer.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        bound = server.add_insecure_port(address(host, port))
        if bound == 0:  # older grpcio answers 0 rather than raising
            raise RuntimeError(f"could not bind {address(host, port)}")
        await server.start()
        self._server = server
        self._follow = asyncio.create_task(self.health.follow(), name="grpc-health")
        return bound

    async def drain(self) -> None:
        """The drain began: health says NOT_SERVING for good (the servicer already refuses new calls)."""
        await self.health.drain()

    async def stop(self, grace_s: float) -> None:
        """Stop listening; calls still running (health Watch streams: the drain waited for the rest) get
        ``grace_s``, then are cancelled."""
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow
            self._follow = None
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
            log.info("gRPC server stopped", extra={"event": "grpc_stopped"})
