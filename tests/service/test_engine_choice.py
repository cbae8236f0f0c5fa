"""The engine that computes a model version on the CPU: chosen by measurement among those the host offers and
the artifact's gate allows, fixed by the operator, refused where the gate failed, and today's CPU provider
where the plugin or the CPU's bf16 is absent; the choice is reported (log, GET /models, deepvit_model_info)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from inprocess import InProcessApp
from serving import metric_samples

from deepvit.artifact.engines import CPU_ENGINE, OPENVINO_BF16, OPENVINO_ENGINE, HostEngines
from deepvit.service.config import Settings
from deepvit.service.engines import EngineRequiredError
from deepvit.service.metrics import Metrics
from deepvit.service.models import manager as manager_module
from deepvit.service.models.manager import ModelManager, ModelVersion

PLUGIN_ABSENT = "the OpenVINO execution provider plugin is not installed"
BF16_GATE = {"precision": "bf16", "top1_agreement": 0.83, "passed": False, "engine": "openvino-bf16"}


def _repository(source: Path, tmp_path: Path, **props: str) -> Path:
    """A repository holding ``source`` as tiny v1, its metadata changed as ``props`` say."""
    artifact = tmp_path / "repo" / "tiny" / "1" / "model.onnx"
    artifact.parent.mkdir(parents=True)
    shutil.copy(source, artifact)
    if props:
        proto = onnx.load(str(artifact))
        for entry in proto.metadata_props:
            entry.value = props.pop(entry.key, entry.value)
        for key, value in props.items():
            added = proto.metadata_props.add()
            added.key, added.value = key, value
        onnx.save_model(proto, str(artifact))
    return artifact


def _load(artifact: Path, settings: Settings, metrics: Metrics | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """Load tiny v1, compute a batch of noise on it; its engine report (with ``info``: the labels of
    deepvit_model_info while it served) and the logits."""
    metrics = metrics or Metrics()
    manager = ModelManager(settings, metrics)

    async def load() -> tuple[dict[str, Any], np.ndarray]:
        mv: ModelVersion = await manager.load_version("tiny", 1, artifact)
        try:
            assert mv.engine is not None
            crop = mv.runtime.meta.preprocess.crop_size
            x = np.random.default_rng(0).integers(0, 256, (4, crop, crop, 3), dtype=np.uint8)
            info = list(metric_samples(metrics.render().decode(), "deepvit_model_info"))
            return {**mv.engine.to_dict(), "info": info}, mv.runtime.run(x)
        finally:
            await manager.close()

    return asyncio.run(load())


def _host(monkeypatch: pytest.MonkeyPatch, host: HostEngines) -> None:
    monkeypatch.setattr(manager_module, "host_engines", lambda: host)


def test_the_fastest_engine_serves_and_the_choice_is_reported(
    exported_tiny_patch: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    artifact = _repository(exported_tiny_patch, tmp_path)
    metrics = Metrics()
    with caplog.at_level(logging.INFO, logger="deepvit.repository"):
        engine, _ = _load(artifact, Settings(model_repository=artifact.parents[2], providers=["cpu"]), metrics)
    rates = engine["warmup_images_per_s"]
    assert set(rates) == {"cpu", "openvino"}  # both measured; this artifact records no bf16 gate
    assert engine["name"] == max(rates, key=rates.get)
    assert engine["chosen_by"] == "measurement"
    assert (
        "records no bf16 gate" in engine["not_used"]["openvino-bf16"] or "BF16" in engine["not_used"]["openvino-bf16"]
    )
    said = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "engine"]
    assert said
    assert f"engine {engine['name']} (fp32), chosen by measurement" in said[0]
    info = metric_samples(metrics.render().decode(), "deepvit_model_info")
    assert info == {}  # removed at unload; while served, see test_get_models_and_the_metric_name_the_engine


def test_get_models_and_the_metric_name_the_engine(tiny_app: InProcessApp) -> None:
    async def run() -> tuple[dict[str, Any], str]:
        async with tiny_app.serving() as (client, _):
            models = (await client.get("/models")).json()["models"]
            return models[0]["engine"], tiny_app.ctx.metrics.render().decode()

    engine, metrics = asyncio.run(run())
    assert engine["name"] == "cpu"  # no warm-up: nothing measured, today's engine
    assert engine["chosen_by"] in {"default", "only one"}
    assert engine["precision"] == "fp32"
    info = metric_samples(metrics, "deepvit_model_info")
    assert any('provider="cpu"' in k and 'precision="fp32"' in k for k in info), info


def test_without_the_plugin_todays_cpu_provider_serves(
    exported_tiny_patch: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _host(monkeypatch, HostEngines((CPU_ENGINE,), {"openvino": PLUGIN_ABSENT, "openvino-bf16": PLUGIN_ABSENT}))
    artifact = _repository(exported_tiny_patch, tmp_path)
    settings = Settings(model_repository=artifact.parents[2], providers=["cpu"])
    engine, logits = _load(artifact, settings)
    assert (engine["name"], engine["chosen_by"], engine["provider"]) == ("cpu", "only one", "CPUExecutionProvider")
    assert engine["not_used"]["openvino-bf16"] == PLUGIN_ABSENT
    assert np.isfinite(logits).all()
    # Asked for by name: today's path, saying why; fatal when required.
    engine, _ = _load(artifact, settings.model_copy(update={"engine": "openvino"}))
    assert (engine["name"], engine["chosen_by"]) == ("cpu", "fallback")
    assert PLUGIN_ABSENT in engine["reason"]
    with pytest.raises(EngineRequiredError, match="DEEPVIT_REQUIRE_ENGINE"):
        _load(artifact, settings.model_copy(update={"engine": "openvino", "require_engine": True}))


def test_bf16_is_refused_for_an_artifact_whose_gate_failed(
    exported_tiny_patch: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A constructed case: trained weights whose recorded bf16 gate failed, on a host offering bf16."""
    _host(monkeypatch, HostEngines((CPU_ENGINE, OPENVINO_ENGINE, OPENVINO_BF16)))
    gates = json.dumps({"openvino-bf16": BF16_GATE})
    artifact = _repository(exported_tiny_patch, tmp_path, **{"deepvit.engine_gates": gates})
    settings = Settings(model_repository=artifact.parents[2], providers=["cpu"], engine="openvino-bf16")
    engine, _ = _load(artifact, settings)
    assert (engine["name"], engine["chosen_by"], engine["precision"]) == ("cpu", "fallback", "fp32")
    assert "bf16 gate failed (top-1 agreement 83.00%" in engine["reason"]
    with pytest.raises(EngineRequiredError, match="gate failed"):
        _load(artifact, settings.model_copy(update={"require_engine": True}))
    # By measurement it is never a candidate.
    engine, _ = _load(artifact, settings.model_copy(update={"engine": "auto"}))
    assert set(engine["warmup_images_per_s"]) == {"cpu", "openvino"}
    assert "gate failed" in engine["not_used"]["openvino-bf16"]


def test_bf16_computes_where_its_gate_passed(
    exported_tiny_patch: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _host(monkeypatch, HostEngines((CPU_ENGINE, OPENVINO_ENGINE, OPENVINO_BF16)))
    gates = json.dumps({"openvino-bf16": {**BF16_GATE, "top1_agreement": 1.0, "passed": True}})
    artifact = _repository(exported_tiny_patch, tmp_path, **{"deepvit.engine_gates": gates})
    settings = Settings(model_repository=artifact.parents[2], providers=["cpu"], warmup=False)
    engine, bf16 = _load(artifact, settings.model_copy(update={"engine": "openvino-bf16"}))
    assert (engine["name"], engine["precision"], engine["chosen_by"]) == ("openvino-bf16", "bf16", "setting")
    assert 'precision="bf16"' in engine["info"][0]
    assert 'provider="openvino"' in engine["info"][0]
    _, fp32 = _load(artifact, settings.model_copy(update={"engine": "cpu"}))
    assert np.abs(bf16 - fp32).max() <= 5e-2 * np.abs(fp32).max()
