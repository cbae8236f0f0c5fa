"""Run the app under uvicorn with a graceful drain on SIGTERM.

uvicorn's own shutdown closes the listening socket at once, so a request arriving during shutdown meets a
refused connection. Here the first SIGTERM (or Ctrl-C) only starts draining: /readyz turns 503 so load
balancers stop sending, new requests get 503 with Retry-After, accepted requests and queued batches
finish, and only then (or when the grace period is over) does uvicorn stop. A second signal stops at once.

The gRPC server (``DEEPVIT_GRPC_PORT``, service/grpc/) runs on the same event loop and drains with HTTP: its
health turns NOT_SERVING with /readyz, new calls get UNAVAILABLE, the calls it accepted count in what the
drain waits for, and it stops before uvicorn does.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType

import uvicorn

from .app import create_app
from .config import Settings
from .context import AppContext
from .grpc.server import GrpcServer, address
from .memory import configure_allocator, freeze_startup_objects
from .protocol import http_protocol
from .refusals import Refusals

log = logging.getLogger("deepvit.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx: AppContext, grace_s: float, grpc: GrpcServer | None) -> None:
        super().__init__(config)
        self.ctx = ctx
        self.grace_s = grace_s
        self.grpc = grpc
        self.exit_code = 0
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        if self.grpc is not None and not await self._start_grpc():
            return
        try:
            await super().serve(sockets)  # type: ignore[arg-type]
        finally:
            if self.grpc is not None:
                await self.grpc.stop(1.0)

    async def _start_grpc(self) -> bool:
        assert self.grpc is not None
        s = self.ctx.settings
        where = address(s.host, s.grpc_port)
        try:
            port = await self.grpc.start(s.host, s.grpc_port)
        except RuntimeError as exc:
            log.critical(
                "gRPC could not listen on %s (%s): free the port, or choose another with DEEPVIT_GRPC_PORT "
                "(deepvit serve --grpc-port), or 0 to turn gRPC off",
                where,
                exc,
                extra={"event": "startup_failed"},
            )
            self.exit_code = 1
            return False
        log.info("gRPC on %s", address(s.host, port), extra={"event": "grpc_started", "grpc_port": port})
        return True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is not None or self._loop is None:
            log.warning("second signal %s: stopping without waiting", signal.Signals(sig).name)
            self.exit_code = 1
            self.force_exit = True
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain, sig)

    def _start_drain(self, sig: int) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain(sig))

    async def _drain(self, sig: int) -> None:
        log.info(
            "%s: draining (grace period %.0fs, %d requests in flight)",
            signal.Signals(sig).name,
            self.grace_s,
            self.ctx.inflight,
            extra={"event": "drain_started"},
        )
        started = time.monotonic()
        if self.grpc is not None:
            await self.grpc.drain()
        clean = await self.ctx.drain(self.grace_s)
        if self.grpc is not None:
            # Its accepted calls are answered (the drain counted them); what is left are health Watch streams,
            # which never end by themselves: a second, not the rest of the grace period.
            await self.grpc.stop(min(1.0, max(0.0, self.grace_s - (time.monotonic() - started))))
        # uvicorn's own graceful shutdown (closing connections, the lifespan's model release) gets what is
        # left of the grace period, not a second one.
        remaining = self.grace_s - (time.monotonic() - started)
        self.config.timeout_graceful_shutdown = max(1, int(remaining))
        self.ctx.shutdown_budget_s = max(1.0, remaining)
        if clean:
            log.info("drained: every accepted request was answered", extra={"event": "drain_done"})
        else:
            log.warning(
                "grace period over with %d requests in flight; stopping",
                self.ctx.inflight,
                extra={"event": "drain_timeout"},
            )
        self.should_exit = True

    def fatal(self, message: str) -> None:
        """A start-up failure: exit non-zero (called on the event loop)."""
        self.exit_code = 1
        self.should_exit = True


def run(settings: Settings) -> int:
    configure_allocator()  # decode buffers go back to the system when freed (service/memory.py)
    holder: list[DrainingServer] = []
    app = create_app(settings, on_fatal=lambda msg: holder[0].fatal(msg))
    rejected = app.state.ctx.metrics.rejected
    config = uvicorn.Config(
        app,
        http=http_protocol(
            settings.header_timeout_s,
            lambda: rejected.labels("header_timeout").inc(),
            Refusals(app.state.ctx),  # service/refusals.py: overload answered before the app
            settings.body_timeout_s,
        ),
        host=settings.host,
        port=settings.port,
        backlog=settings.listen_backlog,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, int(settings.grace_period_s)),
        server_header=False,
    )
    grpc = GrpcServer(app.state.ctx, app.version) if settings.grpc_port else None
    server = DrainingServer(config, app.state.ctx, settings.grace_period_s, grpc)
    holder.append(server)
    freeze_startup_objects()  # the app and its libraries, out of the collector's full passes (service/memory.py)
    server.run()
    if server.exit_code == 0 and not server.started:
        return 1  # e.g. the port was taken; uvicorn logged why
    return server.exit_code
