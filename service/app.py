"""``create_app``: the one place where settings, metrics, models, routes and error handling are wired."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .bodies import BodyBudget
from .budget import MemoryBudget, MemoryBudgetError
from .config import Settings
from .context import AppContext
from .errors import ArtifactError, DeadlineExceededError, ServiceError, UnavailableError
from .memory import lower_thread_priority
from .metrics import Metrics
from .middleware import RequestMiddleware
from .models.manager import ModelManager
from .models.sync import RepositorySync
from .pipeline import InferencePipeline
from .routes import classify, explain, health, oip
from .runtime import GpuRequiredError, LoadCancelledError
from .web import page

log = logging.getLogger("deepvit.app")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI, ctx: AppContext) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = None
        if isinstance(exc, UnavailableError | DeadlineExceededError):  # refused, not failed: counted by reason
            ctx.metrics.rejected.labels(exc.reason).inc()
        if isinstance(exc, UnavailableError):
            headers = {"Retry-After": str(exc.retry_after_s)}
        if isinstance(exc, DeadlineExceededError):
            log.warning("%s", exc.message)  # overload, not a fault: no traceback per request
        elif exc.status >= 500 and not isinstance(exc, UnavailableError):
            # A failed batch was logged once with its cause by the batcher; one line per request here.
            log.error("%s: %s", type(exc).__name__, exc.message)
        return _error(exc.status, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        parts = [f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in errors]
        # A bad query or path parameter is a bad request (400); a body that breaks the schema is 422.
        in_params = all(e["loc"] and e["loc"][0] in ("query", "path", "header") for e in errors)
        return _error(400 if in_params else 422, "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.url.path}; see /docs for the API"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return _error(exc.status_code, message, dict(exc.headers) if exc.headers else None)

    # Anything else is caught by RequestMiddleware, which answers a JSON 500 with the request id.


def create_app(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    manager: ModelManager | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """Build the app. Models load in the background after start-up, so /livez answers at once and
    /readyz says 503 until every model is loaded and warmed. A start-up failure calls ``on_fatal``."""
    metrics = metrics or Metrics()
    budget = MemoryBudget.for_settings(settings)  # the process as it is before any model (service/budget.py)
    manager = manager or ModelManager(settings, metrics, budget=budget)
    pool = ThreadPoolExecutor(
        max_workers=settings.decode_threads or (os.cpu_count() or 2),
        thread_name_prefix="decode",
        initializer=functools.partial(lower_thread_priority, settings.worker_niceness),  # service/memory.py
    )
    repository = RepositorySync(manager)
    ctx = AppContext(
        settings=settings,
        metrics=metrics,
        models=manager,
        decode_pool=pool,
        repository=repository,
        pipeline=InferencePipeline(settings, manager, metrics, pool),
        bodies=BodyBudget(budget.upload_bound, settings.max_uploads),
        budget=budget,
    )
    _observe_memory(ctx)

    async def load() -> None:
        try:
            budget.check_start()
            await manager.load_repository()
        except LoadCancelledError as exc:  # SIGTERM during start-up: a clean exit, not a failed start
            log.info("%s", exc, extra={"event": "startup_cancelled"})
        except (ArtifactError, GpuRequiredError, MemoryBudgetError) as exc:
            ctx.startup_error = str(exc)
            log.critical("start-up failed: %s", exc, extra={"event": "startup_failed"})
            if on_fatal is not None:
                on_fatal(str(exc))
        except Exception as exc:
            ctx.startup_error = f"{type(exc).__name__}: {exc}"
            log.exception("start-up failed")
            if on_fatal is not None:
                on_fatal(ctx.startup_error)
        else:
            if settings.repository_poll_s > 0:
                await repository.poll_forever(settings.repository_poll_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(load(), name="load-models")
        try:
            yield
        finally:
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            try:
                await asyncio.wait_for(manager.close(), timeout=ctx.shutdown_budget_s)
            except TimeoutError:
                log.error("models still busy %.0fs into shutdown; exiting without them", ctx.shutdown_budget_s)
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="deepvit-serve",
        summary="DeepViT image classification over ONNX Runtime, with dynamic batching",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    _install_error_handlers(app, ctx)
    app.include_router(health.router)
    app.include_router(classify.router)
    app.include_router(explain.router)
    app.include_router(oip.router)
    app.include_router(page.router)
    app.add_middleware(RequestMiddleware, ctx=ctx)
    _document_raw_bodies(app)
    return app


def _observe_memory(ctx: AppContext) -> None:
    """The upload budget and the memory budget as gauges, read at each scrape."""
    m, budget = ctx.metrics, ctx.budget
    m.upload_bytes.set_function(lambda: ctx.bodies.held_bytes)
    m.uploads_in_transit.set_function(lambda: ctx.bodies.in_transit)
    m.memory_limit.set(budget.limit or 0)
    for part in ("process", "sessions", "decode", "uploads"):
        m.memory_budget.labels(part).set_function(functools.partial(lambda p: budget.parts()[p], part))


def _document_raw_bodies(app: FastAPI) -> None:
    """Add the models of the bodies that routes read raw (the v2 inference request) to the OpenAPI
    document's components, where those routes' schemas refer to them."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(oip.OPENAPI_SCHEMAS)
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
