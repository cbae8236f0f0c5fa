"""uvicorn's HTTP protocol with a deadline on each request's head (request line and headers), and the
refusal of inference requests that admission would refuse, before the app (:mod:`.refusals`).

uvicorn times out an idle kept-alive connection, but not a request whose head trickles in, nor a connection
that never sends a byte: a client sending one byte a second ("slowloris") holds a connection, a file
descriptor and a parser for as long as it likes, and a few thousand of them exhaust the server. Here the head
of every request must be complete within ``DEEPVIT_HEADER_TIMEOUT_S`` of the connection's opening (for its
first request) or of its first byte (for the next ones on a kept-alive connection); otherwise the server
answers 408 with ``Connection: close`` and closes, as nginx does past ``client_header_timeout``. The body has
its own deadline (``DEEPVIT_BODY_TIMEOUT_S``, in the middleware); a request counts in
``deepvit_inflight_requests`` only once its body is in, so neither kind of slow client is counted there.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Protocol

import httptools
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .refusals import is_inference


class Answer(Protocol):
    """What answers a request from its head instead of the app: its whole HTTP/1.1 response, or an ASGI
    callable; ``sent`` once it is written."""

    def http(self, keep_alive: bool) -> bytes: ...
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None: ...
    def sent(self) -> None: ...


class Refuse(Protocol):
    """Asked once a request's head is parsed: what answers it instead of the app, or None. The requests it
    lets through have their arrival (their body wholly in) and their answer reported."""

    def check(self, method: str, path: str) -> Answer | None: ...
    def body_in(self) -> None: ...
    def answered(self) -> None: ...


class _Answered:
    """The cycle of a request answered from its head: complete, so the parser's callbacks drop its body."""

    response_complete = True
    more_body = False
    keep_alive = True


def http_protocol(
    timeout_s: float,
    on_timeout: Callable[[], None],
    refuse: Refuse | None = None,
    body_timeout_s: float = 30.0,
) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, with the head deadline (``on_timeout`` called for each cut-off),
    ``refuse`` asked, once a head is parsed, whether something else answers the request than the app, and
    ``body_timeout_s`` for what is left of a body after its request was answered (a refused upload: its
    client may go on sending, and uvicorn reads and drops it; a client trickling it is closed at the deadline,
    as the middleware closes one whose body is being read)."""

    class HeadTimeoutProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _drop_timer: asyncio.TimerHandle | None = None
        _body_pending = False  # the current request's head is in and its body is not
        _let_through = False  # the current request is one ``refuse`` let through, its body not yet in
        _arrived = 0  # requests of this connection reported to ``refuse`` as arrived and not yet answered

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def on_message_complete(self) -> None:
            self._body_pending = False
            if self._drop_timer is not None:
                self._drop_timer.cancel()
                self._drop_timer = None
            if self._let_through and refuse is not None:
                self._let_through = False
                self._arrived += 1
                refuse.body_in()
            super().on_message_complete()

        def on_response_complete(self) -> None:
            if self._let_through:  # answered before its body was in: it never arrives
                self._let_through = False
            elif self._arrived and refuse is not None:
                self._arrived -= 1
                refuse.answered()
            super().on_response_complete()
            if self._body_pending and self._drop_timer is None and not self.transport.is_closing():
                self._drop_timer = self.loop.call_later(body_timeout_s, self.transport.close)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_head_timer()  # the next request of a kept-alive connection: from its first byte

        def on_headers_complete(self) -> None:
            self._cancel_head_timer()
            self._body_pending = True
            answer = None
            if refuse is not None and not self.parser.should_upgrade():
                path = httptools.parse_url(self.url).path.decode("ascii", "replace")
                method = self.parser.get_method().decode("ascii", "replace")
                answer = refuse.check(method, path)
                self._let_through = answer is None and is_inference(method, path)
            if answer is None:
                super().on_headers_complete()
                return
            if self.cycle is not None and not self.cycle.response_complete:
                # Pipelined behind an answer still being written: queued as uvicorn queues the app's cycles,
                # and run as an ASGI callable in place of the app (as uvicorn answers past its concurrency
                # limit).
                app, self.app = self.app, answer
                try:
                    super().on_headers_complete()
                finally:
                    self.app = app
                return
            # Answered here and now; the parser's callbacks drop the body of a cycle already complete.
            keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
            self.cycle = _Answered()  # type: ignore[assignment]
            self.transport.write(answer.http(keep_alive))
            answer.sent()
            if not keep_alive:
                self.transport.close()
            self.on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            if self._drop_timer is not None:
                self._drop_timer.cancel()
            while self._arrived and refuse is not None:  # answers that will never be written
                self._arrived -= 1
                refuse.answered()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(timeout_s, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if (self.cycle is not None and not self.cycle.response_complete) or self.pipeline:
                # An earlier request of this connection is still being answered (a pipelining client; uvicorn
                # stops reading meanwhile): a 408 now would be taken for its answer. Its head gets a new
                # deadline once the answers before it are out.
                self._arm_head_timer()
                return
            on_timeout()
            body = json.dumps({"error": f"the request's head did not arrive within {timeout_s:g}s"}).encode()
            head = (
                "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            self.transport.write(head.encode() + body)
            self.transport.close()

    return HeadTimeoutProtocol
