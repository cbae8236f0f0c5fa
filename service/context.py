"""What the routes share, built once by ``create_app`` and reached through a FastAPI dependency."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from .bodies import BodyBudget
from .budget import MemoryBudget
from .config import Settings
from .metrics import Metrics
from .models.manager import ModelManager
from .models.sync import RepositorySync
from .pipeline import InferencePipeline


@dataclass(frozen=True)
class Readiness:
    """Whether the server takes traffic, and if not why: what /readyz and /v2/health/ready both answer."""

    ready: bool
    reason: str | None  # None when ready
    models: list[dict[str, Any]]  # each served version's name, version and state


@dataclass(eq=False)
class AppContext:
    settings: Settings
    metrics: Metrics
    models: ModelManager
    decode_pool: ThreadPoolExecutor
    repository: RepositorySync  # polling and explicit load/unload over ``models``
    pipeline: InferencePipeline  # the one request pipeline every front end calls
    bodies: BodyBudget  # the bytes and count of request bodies (service/bodies.py)
    budget: MemoryBudget  # what the process may hold (service/budget.py)
    draining: bool = False
    inflight: int = 0  # HTTP requests being handled (probes included)
    last_arrival: float = field(default_factory=time.monotonic)  # of a request other than a probe
    startup_error: str | None = None
    shutdown_budget_s: float = 30.0  # what the drain left of the grace period for releasing models
    # /v2 inference requests decompressed and decoded at once (in decode_pool): bounds their memory
    v2_decode_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))

    def readiness(self) -> Readiness:
        """The one decision whether the server takes traffic: ``/readyz``, ``/v2/health/ready``, gRPC's
        ``ServerReady`` and ``grpc.health.v1`` all render it. Ready when every configured model is loaded and
        warmed and the server is not draining; with repository control on, serving nothing by choice (started,
        nothing loaded and nothing loading: models come by request, Triton's explicit mode) is ready too."""
        m = self.models
        models = [{"name": mv.name, "version": mv.version, "state": mv.state} for mv in m.all_versions()]
        if self.draining:
            reason = "draining: the server is shutting down"
        elif self.startup_error:
            reason = f"start-up failed: {self.startup_error}"
        elif m.ready or (self.settings.repository_control and m.loaded and not m.names() and not m.any_loading()):
            return Readiness(True, None, models)
        else:
            loading = not m.loaded or m.any_loading()
            reason = "models are loading and warming up" if loading else "no model is loaded (all were unloaded)"
        return Readiness(False, reason, models)

    async def drain(self, grace_s: float, quiet_s: float = 1.0) -> bool:
        """Refuse new work and wait for accepted requests to be answered, then for ``quiet_s`` without new
        arrivals, so that clients still sending get a 503 rather than a refused connection while load
        balancers catch up. Bounded by ``grace_s``; True if every accepted request was answered."""
        self.draining = True
        self.metrics.draining.set(1)
        self.repository.stop()  # no more polls or loads: a build's thread would hold up the exit
        end = time.monotonic() + grace_s
        while time.monotonic() < end:
            now = time.monotonic()
            if self.inflight == 0 and now - self.last_arrival >= quiet_s:
                break
            await asyncio.sleep(0.02)
        return self.inflight == 0


async def get_context(request: Request) -> AppContext:
    """The app's context for a route. A coroutine, not a plain function: FastAPI runs a plain dependency in
    its thread pool, a thread hop per request that cost the event loop more than the route itself."""
    ctx: AppContext = request.app.state.ctx
    return ctx
