"""Load and unload of the repository extension change what serves and have no authentication of their own: they
are off (403) unless ``DEEPVIT_REPOSITORY_CONTROL`` turns them on, while the index stays readable. In process,
on an app whose models never load: the answers come before any model is touched."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from deepvit.service.app import create_app
from deepvit.service.config import Settings


def post(settings: Settings, paths: list[str], loaded: bool = True) -> list[httpx.Response]:
    app = create_app(settings)
    app.state.ctx.models.loaded = loaded  # as if the start-up load had finished (with nothing) or not

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.post(p) for p in paths]

    try:
        return asyncio.run(run())
    finally:
        app.state.ctx.decode_pool.shutdown()


def test_load_and_unload_are_forbidden_by_default_and_the_index_stays_readable(tmp_path: Path) -> None:
    settings = Settings(model_repository=tmp_path, providers=["cpu"])
    assert settings.repository_control is False
    load, unload, index = post(
        settings, ["/v2/repository/models/m/load", "/v2/repository/models/m/unload", "/v2/repository/index"]
    )
    for r in (load, unload):
        assert r.status_code == 403
        assert r.headers["content-type"] == "application/json"
        assert "DEEPVIT_REPOSITORY_CONTROL" in r.json()["error"]
    assert index.status_code == 200
    assert index.json() == []


def test_the_setting_turns_them_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPVIT_REPOSITORY_CONTROL", "true")
    settings = Settings(model_repository=tmp_path, providers=["cpu"])
    assert settings.repository_control is True
    load, unload = post(settings, ["/v2/repository/models/m/load", "/v2/repository/models/m/unload"])
    assert (load.status_code, unload.status_code) == (404, 404)  # past the gate: an unknown model
    assert "'m'" in load.json()["error"]


def test_load_and_unload_wait_for_the_start_up_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The start-up load runs outside the repository's lock: a load or unload meanwhile is 503, not a race."""
    monkeypatch.setenv("DEEPVIT_REPOSITORY_CONTROL", "true")
    settings = Settings(model_repository=tmp_path, providers=["cpu"])
    paths = ["/v2/repository/models/m/load", "/v2/repository/models/m/unload"]
    for r in post(settings, paths, loaded=False):
        assert r.status_code == 503
        assert "still loading" in r.json()["error"]
        assert r.headers["Retry-After"]


@pytest.mark.parametrize(
    ("control", "draining", "ready"),
    [(True, False, True), (False, False, False), (True, True, False)],
    ids=["control-on-nothing-loaded", "control-off-nothing-loaded", "draining"],
)
def test_readiness_is_one_decision_every_surface_renders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, control: bool, draining: bool, ready: bool
) -> None:
    """/readyz, /v2/health/ready, gRPC's ServerReady and grpc.health.v1 agree: with repository control on and
    nothing loaded the server is ready (models come by request, Triton's explicit mode); without it, or
    while draining, none of them says ready."""
    from grpc_health.v1 import health_pb2

    from deepvit.service.grpc.health import SERVICE, Health
    from deepvit.service.grpc.proto import grpc_service_pb2 as pb
    from deepvit.service.grpc.servicer import InferenceServicer

    monkeypatch.setenv("DEEPVIT_REPOSITORY_CONTROL", str(control).lower())
    app = create_app(Settings(model_repository=tmp_path, providers=["cpu"]))
    ctx = app.state.ctx
    ctx.models.loaded = True  # the start-up load finished, with nothing
    ctx.draining = draining

    async def run() -> tuple[int, httpx.Response, bool, int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            readyz = (await client.get("/readyz")).status_code
            v2 = await client.get("/v2/health/ready")
        server_ready = (await InferenceServicer(ctx, "0").server_ready(pb.ServerReadyRequest(), None)).ready
        health = Health(ctx)
        await health.update()
        return readyz, v2, server_ready, health._server_status[SERVICE]

    try:
        readyz, v2, server_ready, health = asyncio.run(run())
    finally:
        ctx.decode_pool.shutdown()
    assert readyz == v2.status_code == (200 if ready else 503)
    assert v2.json()["ready"] is ready
    assert server_ready is ready
    assert health == (health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING)
