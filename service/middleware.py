"""One pure-ASGI middleware for what every request shares: request id, draining, the body limit,
in-flight accounting, HTTP metrics and the access log line."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import PayloadTooLargeError

if TYPE_CHECKING:
    from .context import AppContext

access_log = logging.getLogger("deepvit.access")

# Probes and scrapes keep answering while the server drains; everything else gets 503.
_ALWAYS_SERVED = frozenset({"/livez", "/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _json_response(status: int, error: str, request_id: str, extra_headers: list[tuple[bytes, bytes]]) -> list[Message]:
    body = json.dumps({"error": error}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        *extra_headers,
    ]
    return [
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body},
    ]


class RequestMiddleware:
    def __init__(self, app: ASGIApp, ctx: AppContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = self.ctx
        started = time.perf_counter()
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID_RE.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})
        scope["state"]["request_id"] = request_id
        scope["state"]["log"] = {}
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        async def reply(code: int, error: str, reason: str, extra: list[tuple[bytes, bytes]]) -> None:
            ctx.metrics.rejected.labels(reason).inc()
            for m in _json_response(code, error, request_id, extra):
                await send_wrapper(m)

        path: str = scope["path"]
        limit = ctx.settings.max_body_bytes
        try:
            if ctx.draining and path not in _ALWAYS_SERVED:
                await reply(
                    503,
                    "the server is shutting down; retry on another replica",
                    "draining",
                    [(b"retry-after", b"1")],
                )
                return
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                await reply(
                    413,
                    f"the body is {int(declared):,} bytes; the limit is {limit:,} bytes",
                    "body_too_large",
                    [(b"connection", b"close")],
                )
                return
            received = 0

            async def receive_capped() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise PayloadTooLargeError(f"the body is over the limit of {limit:,} bytes")
                return message

            ctx.inflight += 1
            ctx.metrics.inflight.inc()
            try:
                await self.app(scope, receive_capped, send_wrapper)
            finally:
                ctx.inflight -= 1
                ctx.metrics.inflight.dec()
        finally:
            elapsed = time.perf_counter() - started
            route_obj: Any = scope.get("route")
            route = getattr(route_obj, "path", None) or "unmatched"
            ctx.metrics.http_requests.labels(route, scope["method"], str(status)).inc()
            ctx.metrics.request_duration.labels(route).observe(elapsed)
            if path not in _ALWAYS_SERVED or status >= 400:
                fields = {
                    "request_id": request_id,
                    "method": scope["method"],
                    "route": route,
                    "path": path,
                    "status": status,
                    "latency_ms": round(elapsed * 1000, 2),
                    **scope["state"].get("log", {}),
                }
                access_log.info("%s %s %d", scope["method"], path, status, extra=fields)
