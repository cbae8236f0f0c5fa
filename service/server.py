"""Run the app under uvicorn with a graceful drain on SIGTERM.

uvicorn's own shutdown closes the listening socket at once, so a request arriving during shutdown meets a
refused connection. Here the first SIGTERM (or Ctrl-C) only starts draining: /readyz turns 503 so load
balancers stop sending, new requests get 503 with Retry-After, accepted requests and queued batches
finish, and only then (or when the grace period is over) does uvicorn stop. A second signal stops at once.
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
from .memory import configure_allocator

log = logging.getLogger("deepvit.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx: AppContext, grace_s: float) -> None:
        super().__init__(config)
        self.ctx = ctx
        self.grace_s = grace_s
        self.exit_code = 0
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

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
        clean = await self.ctx.drain(self.grace_s)
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
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, int(settings.grace_period_s)),
        server_header=False,
    )
    server = DrainingServer(config, app.state.ctx, settings.grace_period_s)
    holder.append(server)
    server.run()
    if server.exit_code == 0 and not server.started:
        return 1  # e.g. the port was taken; uvicorn logged why
    return server.exit_code
