"""``inference.GRPCInferenceService``: the RPCs of the Open Inference Protocol and of the repository extension
that ``tritonclient.grpc`` calls, each a translation onto what the REST front end uses (the pipeline, the
readiness, the repository). The others of Triton's proto (statistics, shared memory, tracing, logging, the
model configuration, streaming) are not registered, so gRPC answers them ``UNIMPLEMENTED``.

Errors are the service's error tree, mapped once here onto the status codes the protocol's users expect
(``_CODES``); a refusal (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``) is counted by reason as over HTTP, and carries
the reason and a retry delay in its trailing metadata (``deepvit-reason``, ``retry-after``). While the server
drains, every call but the health and metadata ones is ``UNAVAILABLE``; the calls in progress count in what
the drain waits for.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from ..context import AppContext
from ..errors import (
    BadRequestError,
    ConflictError,
    DeadlineExceededError,
    ForbiddenError,
    NotFoundError,
    PayloadTooLargeError,
    RequestError,
    ServiceError,
    UnavailableError,
)
from ..oip.tensors import EXTENSIONS, model_metadata
from .codec import decode_request, encode_answer, parameters
from .health import SERVICE
from .proto import grpc_service_pb2 as pb

log = logging.getLogger("deepvit.grpc")
access_log = logging.getLogger("deepvit.access")

# What an RPC adds to its access log line (model, version, images, batch size), per call.
_log_fields: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("grpc_log_fields")
Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message]]

_CODES: dict[type[ServiceError], grpc.StatusCode] = {
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    ConflictError: grpc.StatusCode.FAILED_PRECONDITION,  # a model without the attention output
    ForbiddenError: grpc.StatusCode.PERMISSION_DENIED,
    PayloadTooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(exc: ServiceError) -> grpc.StatusCode:
    for kind, code in _CODES.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INVALID_ARGUMENT if isinstance(exc, RequestError) else grpc.StatusCode.INTERNAL


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()  # bound: the base class's method is abstract


def _version(text: str) -> int | None:
    """A message's model version: empty for the latest."""
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise BadRequestError(f"model version {text!r} is not a positive integer; leave it empty for the latest")
    return int(text)


class InferenceServicer:
    def __init__(self, ctx: AppContext, server_version: str) -> None:
        self.ctx = ctx
        self.server_version = server_version

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        rpcs: dict[str, tuple[Handler, type[Message], bool]] = {
            # name: (implementation, request message, answered while draining)
            "ServerLive": (self.server_live, pb.ServerLiveRequest, True),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest, True),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest, True),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest, True),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest, True),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest, False),
            "RepositoryIndex": (self.repository_index, pb.RepositoryIndexRequest, False),
            "RepositoryModelLoad": (self.repository_load, pb.RepositoryModelLoadRequest, False),
            "RepositoryModelUnload": (self.repository_unload, pb.RepositoryModelUnloadRequest, False),
        }
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                name: grpc.unary_unary_rpc_method_handler(
                    self._guarded(name, fn, probe),
                    request_deserializer=kind.FromString,
                    response_serializer=_serialize,
                )
                for name, (fn, kind, probe) in rpcs.items()
            },
        )

    def _guarded(self, name: str, fn: Handler, probe: bool) -> Any:
        """The RPC with what every call shares: draining, the count a drain waits for, errors as status
        codes, metrics and the access log line."""
        ctx = self.ctx
        metrics = ctx.metrics

        async def call(request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            fields: dict[str, Any] = {}
            _log_fields.set(fields)
            if not probe:
                ctx.last_arrival = time.monotonic()
            ctx.inflight += 1
            try:
                if ctx.draining and not probe:
                    raise UnavailableError("the server is shutting down; retry on another replica", "draining")
                return await fn(request, context)
            except ServiceError as exc:
                code = status_code(exc)
                trailers: tuple[tuple[str, str], ...] = ()
                if isinstance(exc, UnavailableError | DeadlineExceededError):
                    metrics.rejected.labels(exc.reason).inc()
                    retry = exc.retry_after_s if isinstance(exc, UnavailableError) else 1
                    trailers = (("deepvit-reason", exc.reason), ("retry-after", str(retry)))
                if isinstance(exc, DeadlineExceededError):
                    log.warning("%s", exc.message)
                elif code == grpc.StatusCode.INTERNAL:
                    log.error("%s: %s", type(exc).__name__, exc.message)
                await context.abort(code, exc.message, trailers)
                raise  # abort raised already; this line keeps the type checker informed
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED  # the caller went away or its deadline passed
                raise
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                code = grpc.StatusCode.INTERNAL
                log.exception("unhandled error in %s", name)
                await context.abort(code, f"internal error in {name}; the operators have it in the logs")
                raise
            finally:
                ctx.inflight -= 1
                elapsed = time.perf_counter() - started
                metrics.grpc_requests.labels(name, code.name).inc()
                metrics.grpc_duration.labels(name).observe(elapsed)
                if not probe or code != grpc.StatusCode.OK:
                    access_log.info(
                        "gRPC %s %s",
                        name,
                        code.name,
                        extra={
                            "protocol": "grpc",
                            "route": f"/{SERVICE}/{name}",
                            "status": code.name,
                            "latency_ms": round(elapsed * 1000, 2),
                            "peer": context.peer(),
                            **fields,
                        },
                    )

        return call

    # -- server and models ---------------------------------------------------------------------------
    async def server_live(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ctx.readiness().ready)

    async def model_ready(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        version = _version(request.version)
        try:
            self.ctx.models.resolve(request.name, version)
        except (NotFoundError, UnavailableError):  # as Triton: not ready, rather than an error
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def server_metadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="deepvit-serve", version=self.server_version, extensions=EXTENSIONS)

    async def model_metadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        models = self.ctx.models
        mv = models.resolve(request.name, _version(request.version))
        meta = model_metadata(mv, sorted(models.versions(request.name)))
        tensors = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=meta.versions,
            platform=meta.platform,
            inputs=[tensors(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
            outputs=[tensors(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
        )

    # -- inference -----------------------------------------------------------------------------------
    async def model_infer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        """The REST ``infer``'s steps, the request's deadline bounded by the caller's gRPC deadline. gRPC's core
        receives a message whole before this runs (each within DEEPVIT_MAX_BODY_BYTES): it counts in the
        upload budget from here to its answer, and one that would take it over the bound is refused at once,
        which frees it."""
        ctx = self.ctx
        upload = ctx.bodies.begin(request.ByteSize())
        upload.arrived()
        try:
            with ctx.pipeline.begin(request.model_name or None, _version(request.model_version)) as call:
                io = call.model.io
                decoded = await ctx.pipeline.offload(decode_request, request, io, ctx.settings.max_images_per_request)
                answer = await call.run(decoded.inputs, context.time_remaining())
        finally:
            upload.release()
        _log_fields.get().update(answer.log_fields())
        return encode_answer(decoded, answer.model, io, answer.logits, answer.attention)

    # -- the repository extension --------------------------------------------------------------------
    async def repository_index(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        entries = await self.ctx.repository.index()
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                index(name=e.name, version=str(e.version), state=e.state, reason=e.reason)
                for e in entries
                if not request.ready or e.state == "READY"
            ]
        )

    def _require_control(self) -> None:
        if not self.ctx.settings.repository_control:
            raise ForbiddenError(
                "loading and unloading models by request is off on this server; set DEEPVIT_REPOSITORY_CONTROL=true "
                "to allow it (and keep the gRPC port behind your network policy)"
            )

    async def repository_load(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        self._require_control()
        params = parameters(request.parameters)
        if "config" in params or any(k.startswith("file:") for k in params):
            raise BadRequestError("this server loads models from its repository only: config and files are not taken")
        await self.ctx.repository.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def repository_unload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        self._require_control()
        await self.ctx.repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()
