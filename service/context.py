"""What the routes share, built once by ``create_app`` and reached through a FastAPI dependency."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Request

from .config import Settings
from .live_repository import LiveRepository
from .metrics import Metrics
from .repository import ModelManager


@dataclass(eq=False)
class AppContext:
    settings: Settings
    metrics: Metrics
    models: ModelManager
    decode_pool: ThreadPoolExecutor
    repository: LiveRepository  # polling and explicit load/unload over ``models``
    draining: bool = False
    inflight: int = 0  # HTTP requests being handled (probes included)
    startup_error: str | None = None
    _drained: asyncio.Event = field(default_factory=asyncio.Event)

    async def drain(self, grace_s: float) -> bool:
        """Refuse new work, wait for accepted requests to be answered; True if all were within grace_s."""
        self.draining = True
        self.metrics.draining.set(1)
        loop = asyncio.get_running_loop()
        end = loop.time() + grace_s
        while self.inflight > 0 and loop.time() < end:
            await asyncio.sleep(0.02)
        return self.inflight == 0


def get_context(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx
