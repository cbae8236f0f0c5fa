from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from inprocess import InProcessApp

from deepvit.service.app import create_app
from deepvit.service.config import Settings


@pytest.fixture
def anyio_backend() -> str:
    # The service runs on asyncio (uvicorn); async tests use anyio's pytest plugin on that backend.
    return "asyncio"


@pytest.fixture
def tiny_app(exported_tiny_patch: Path, tmp_path: Path) -> Iterator[InProcessApp]:
    artifact = tmp_path / "repo" / "tiny" / "1" / "model.onnx"
    artifact.parent.mkdir(parents=True)
    shutil.copy(exported_tiny_patch, artifact)
    app = create_app(Settings(model_repository=tmp_path / "repo", providers=["cpu"], warmup=False))
    try:
        yield InProcessApp(app, app.state.ctx, artifact)
    finally:
        app.state.ctx.decode_pool.shutdown()
