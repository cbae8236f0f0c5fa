"""ModelManager (service.models.manager) with a real artifact, in process: what a drain does to a load under way,
and the readiness series that the DeepvitModelNotReady alert watches."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from serving import metric_samples

from deepvit.service.config import Settings
from deepvit.service.errors import ArtifactError
from deepvit.service.metrics import Metrics
from deepvit.service.models.manager import ModelManager
from deepvit.service.runtime import LoadCancelledError, ModelRuntime


def _repo(tmp_path: Path, artifact: Path) -> Path:
    (tmp_path / "m" / "1").mkdir(parents=True)
    shutil.copy(artifact, tmp_path / "m" / "1" / "model.onnx")
    (tmp_path / "m" / "2").mkdir()
    (tmp_path / "m" / "2" / "model.onnx").write_bytes(b"not an onnx model")
    return tmp_path


def _ready(metrics: Metrics) -> dict[str, float]:
    return metric_samples(metrics.render().decode(), "deepvit_model_ready")


def test_a_warm_up_stops_between_shapes_when_told(exported_tiny_patch: Path) -> None:
    runtime = ModelRuntime(exported_tiny_patch, Settings(providers=["cpu"]))
    asked = iter([False, True])
    with pytest.raises(LoadCancelledError, match="shutting down"):
        runtime.warmup(8, cancelled=lambda: next(asked))


def test_a_load_under_way_when_draining_begins_is_no_failure(exported_tiny_patch: Path, tmp_path: Path) -> None:
    repo = _repo(tmp_path, exported_tiny_patch)
    metrics = Metrics()
    manager = ModelManager(Settings(model_repository=repo, providers=["cpu"]), metrics)
    manager.stop_loading()
    with pytest.raises(LoadCancelledError):
        asyncio.run(manager.load_version("m", 1, repo / "m" / "1" / "model.onnx"))
    assert manager.failures() == {}
    assert "deepvit_model_load_failures_total{" not in metrics.render().decode()


def test_model_ready_is_0_for_a_version_that_failed_until_its_file_is_gone(
    exported_tiny_patch: Path, tmp_path: Path
) -> None:
    repo = _repo(tmp_path, exported_tiny_patch)
    metrics = Metrics()
    manager = ModelManager(Settings(model_repository=repo, providers=["cpu"], warmup=False), metrics)

    async def scenario() -> None:
        await manager.load_version("m", 1, repo / "m" / "1" / "model.onnx")
        with pytest.raises(ArtifactError):
            await manager.load_version("m", 2, repo / "m" / "2" / "model.onnx")
        assert _ready(metrics) == {'{model="m",version="1"}': 1.0, '{model="m",version="2"}': 0.0}
        manager.forget_failure("m", 2)  # what the live repository does once the file is removed
        assert _ready(metrics) == {'{model="m",version="1"}': 1.0}
        await manager.close()
        assert _ready(metrics) == {}

    asyncio.run(scenario())
