"""Refusing, for a few microseconds, the inference requests that admission would refuse anyway.

Above capacity most requests are refused (at four times the capacity, three in four), so what a refusal
costs the event loop is taken from the requests it serves. Through the ASGI application one costs routing
and the middleware (request id, metrics, the access log's JSON line) on top of HTTP parsing, and far above
capacity those refusals took the cores that would serve. Here the HTTP protocol asks
:meth:`Refusals.check` as soon as a request's head is parsed; when admission says the pipeline is over its
bound, the protocol writes the answer itself: the same JSON body and ``Retry-After`` as the middleware's
refusal, counted in the same metrics, and one log line a second at most (how many were refused) instead of
an access log line each. No task, no ASGI cycle, no routing: the parser drops what comes of the body and the
connection stays open. The middleware keeps its own check for servers run without this protocol.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING

from starlette.types import Message, Receive, Scope, Send

from .errors import UnavailableError

if TYPE_CHECKING:
    from .context import AppContext

log = logging.getLogger("deepvit.app")

INFERENCE_PATHS = frozenset({"/classify", "/explain"})
_LOG_EVERY_S = 1.0


def is_inference(method: str, path: str) -> bool:
    """A request that runs a model: ``POST /classify``, ``/explain`` and the v2 ``.../infer`` paths."""
    return method == "POST" and (path in INFERENCE_PATHS or (path.startswith("/v2/") and path.endswith("/infer")))


def route_of(path: str) -> str:
    """The route template of an inference path, as the app's metrics label it."""
    if not path.startswith("/v2/"):
        return path
    return "/v2/models/{name}/versions/{version}/infer" if "/versions/" in path else "/v2/models/{name}/infer"


def error_messages(status: int, error: str, extra_headers: list[tuple[bytes, bytes]]) -> list[Message]:
    """A JSON error answer as ASGI messages."""
    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra_headers]
    return [
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body},
    ]


class Refusal:
    """One request's refusal: written whole by the HTTP protocol (``http``), or as an ASGI callable where
    the protocol cannot (a pipelined request behind an answer still being written). ``sent`` counts it."""

    def __init__(self, status: int, error: str, headers: list[tuple[bytes, bytes]], sent: Callable[[], None]) -> None:
        self.messages = error_messages(status, error, headers)
        self._status = status
        self.sent = sent

    def http(self, keep_alive: bool) -> bytes:
        start, body = self.messages
        lines = [f"HTTP/1.1 {self._status} {HTTPStatus(self._status).phrase}".encode()]
        lines += [name + b": " + value for name, value in start["headers"]]
        if not keep_alive:
            lines.append(b"connection: close")
        content: bytes = body["body"]
        return b"\r\n".join(lines) + b"\r\n\r\n" + content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        for message in self.messages:
            await send(message)
        self.sent()


class Refusals:
    def __init__(self, ctx: AppContext, clock: Callable[[], float] = time.monotonic) -> None:
        self.ctx = ctx
        self._clock = clock
        self._unlogged = 0  # refused since the last log line
        self._logged_at = float("-inf")

    def check(self, method: str, path: str) -> Refusal | None:
        """This request's refusal when admission refuses it now, else None."""
        if not is_inference(method, path):
            return None
        try:
            self.ctx.pipeline.admission.check_arrivals()
        except UnavailableError as exc:
            route = route_of(path)
            headers = [(b"retry-after", str(exc.retry_after_s).encode())]
            return Refusal(503, exc.message, headers, functools.partial(self._count, route, exc))
        return None

    def body_in(self) -> None:
        """An inference request the protocol let through has its whole body: it counts as arrived."""
        self.ctx.pipeline.admission.arrived += 1

    def answered(self) -> None:
        self.ctx.pipeline.admission.arrived -= 1

    def _count(self, route: str, exc: UnavailableError) -> None:
        m = self.ctx.metrics
        m.rejected.labels(exc.reason).inc()
        m.http_requests.labels(route, "POST", "503").inc()
        m.request_duration.labels(route).observe(0.0)  # answered from its head, before any work
        self._unlogged += 1
        now = self._clock()
        if now - self._logged_at >= _LOG_EVERY_S:
            log.warning(
                "refused %d inference request(s) before routing: %s",
                self._unlogged,
                exc.message,
                extra={"event": "refused", "reason": exc.reason, "refused": self._unlogged},
            )
            self._unlogged = 0
            self._logged_at = now
