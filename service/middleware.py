"""One pure-ASGI middleware for what every request shares: request id, draining, the body limit in size and
in time, the count of requests a drain waits for, unexpected errors, HTTP metrics and the access log line."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .bodies import Body
from .errors import PayloadTooLargeError, RequestTimeoutError, UnavailableError
from .memory import trim_after
from .refusals import error_messages, is_inference

if TYPE_CHECKING:
    from .context import AppContext

access_log = logging.getLogger("deepvit.access")
log = logging.getLogger("deepvit.app")

# Probes and scrapes keep answering while the server drains; everything else gets 503.
_ALWAYS_SERVED = frozenset({"/livez", "/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# The method label is bounded: anything else is "other" (h11 accepts any token as a method).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
# nginx's code for "the client closed the connection before the answer": not a server error.
CLIENT_CLOSED = 499


class RequestMiddleware:
    def __init__(self, app: ASGIApp, ctx: AppContext) -> None:
        self.app = app
        self.ctx = ctx

    def _route_label(self, scope: Scope) -> str:
        """The route template (bounded cardinality), also for replies sent before routing happened."""
        route: Any = scope.get("route")
        if route is None:
            router: Any = scope.get("app")
            for candidate in getattr(getattr(router, "router", None), "routes", []):
                if candidate.matches(scope)[0] == Match.FULL:
                    route = candidate
                    break
        return getattr(route, "path", None) or "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = self.ctx
        started = time.perf_counter()
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID_RE.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})
        scope["state"]["request_id"] = request_id
        scope["state"]["log"] = {}
        status = 500
        response_started = False
        close_connection = False  # set when the body was not read to its end

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                extra = [(b"x-request-id", request_id.encode())]
                if close_connection:
                    extra.append((b"connection", b"close"))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        async def reply(code: int, error: str, reason: str | None, extra: list[tuple[bytes, bytes]]) -> None:
            if reason:
                ctx.metrics.rejected.labels(reason).inc()
            for m in error_messages(code, error, extra):
                await send_wrapper(m)

        path: str = scope["path"]
        probe = path in _ALWAYS_SERVED
        upload: Body | None = None  # this request's share of the upload budget, once its body is to be read
        limit = ctx.settings.max_body_bytes
        try:
            if not probe:
                ctx.last_arrival = time.monotonic()
            if ctx.draining and not probe:
                # Connection: close, so clients drop their pooled connections to this replica.
                close_connection = True
                await reply(
                    503, "the server is shutting down; retry on another replica", "draining", [(b"retry-after", b"1")]
                )
                return
            if is_inference(scope["method"], path):
                # Overloaded: refused before routing and before a byte of the body is read (under uvicorn the
                # HTTP protocol refuses earlier still: service/refusals.py).
                try:
                    ctx.pipeline.admission.check()
                except UnavailableError as exc:
                    await reply(503, exc.message, exc.reason, [(b"retry-after", str(exc.retry_after_s).encode())])
                    return
            declared = headers.get(b"content-length")
            length = int(declared) if declared is not None and declared.isdigit() else None
            if length is not None and length > limit:
                close_connection = True  # the body stays unread
                await reply(413, f"the body is {length:,} bytes; the limit is {limit:,} bytes", "body_too_large", [])
                return
            if length or b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                # Uploads are bounded process-wide (service/bodies.py): refused here, before a byte is read.
                try:
                    upload = ctx.bodies.begin(length)
                except UnavailableError as exc:
                    # The connection stays open: uvicorn reads what comes of the body and drops it, holding
                    # none of it. Closing with the body unread makes the kernel answer the data still arriving
                    # with a reset, which can reach the client before it has read the 503.
                    await reply(503, exc.message, exc.reason, [(b"retry-after", str(exc.retry_after_s).encode())])
                    return
            received = 0
            body_done = False
            body_deadline = time.monotonic() + ctx.settings.body_timeout_s

            async def receive_capped() -> Message:
                """The body, capped in size and in time (a client trickling it in is cut off: 408 and the
                connection closed), and counted in the upload budget as it arrives."""
                nonlocal received, close_connection, body_done
                if body_done:
                    return await receive()  # after the body: a disconnect, whenever it comes
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, body_deadline - time.monotonic()))
                except TimeoutError:
                    close_connection = True
                    ctx.metrics.rejected.labels("body_timeout").inc()
                    raise RequestTimeoutError(
                        f"the body did not arrive within {ctx.settings.body_timeout_s:g}s ({received:,} bytes came)"
                    ) from None
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    body_done = not message.get("more_body", False)
                    if received > limit:
                        close_connection = True
                        ctx.metrics.rejected.labels("body_too_large").inc()
                        raise PayloadTooLargeError(f"the body is over the limit of {limit:,} bytes")
                    if upload is not None:
                        upload.received(received)  # a chunked body reserves as it arrives (or 503)
                else:
                    body_done = True
                if body_done and upload is not None:
                    upload.arrived()
                return message

            ctx.inflight += 1  # what a drain waits for (the inflight gauge counts in the pipeline, bodies in)
            try:
                await self.app(scope, receive_capped, send_wrapper)
            except ClientDisconnect:
                status = CLIENT_CLOSED  # nothing to answer: the caller is gone
            except Exception:
                log.exception("unhandled error in %s %s", scope["method"], path, extra={"request_id": request_id})
                if response_started:
                    raise
                await reply(
                    500, f"internal error (request id {request_id}); the operators have it in the logs", None, []
                )
            finally:
                ctx.inflight -= 1
        finally:
            if upload is not None:
                upload.release()
                trim_after(upload.reserved)  # a large body's chunks fragment the heap
            elapsed = time.perf_counter() - started
            route = self._route_label(scope)
            method = scope["method"] if scope["method"] in _METHODS else "other"
            ctx.metrics.http_requests.labels(route, method, str(status)).inc()
            ctx.metrics.request_duration.labels(route).observe(elapsed)
            if not probe or status >= 400:
                fields = {
                    "request_id": request_id,
                    "method": scope["method"][:16],
                    "route": route,
                    "status": status,
                    "latency_ms": round(elapsed * 1000, 2),
                    **scope["state"].get("log", {}),
                }
                # The path is client data: logged as a JSON field (escaped), never inside the message.
                access_log.info("%s %s %d", method, route, status, extra={**fields, "path": path[:512]})
