"""Engines (an execution provider and the precision it computes in): what the host offers, what an artifact's
gates allow, and that the OpenVINO execution provider computes the artifact as the CPU provider does, within
the tolerance of its precision."""

from __future__ import annotations

import dataclasses
import platform
import sys
from pathlib import Path

import numpy as np
import pytest

from deepvit.artifact import ArtifactMetadata, engines
from deepvit.artifact.engines import CPU_ENGINE, OPENVINO_BF16, OPENVINO_ENGINE, gate_verdict, host_engines
from deepvit.artifact.session import open_session, read_metadata

# The plugin is a dependency where its wheels exist.
needs_plugin = pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64"),
    reason="onnxruntime-ep-openvino ships for linux x86_64",
)


def _meta(
    artifact: Path, weights: str = "state_dict", gates: dict[str, object] | None = None, precision: str = "fp32"
) -> ArtifactMetadata:
    """The artifact's metadata as if exported with these weights, engine gates and precision."""
    return dataclasses.replace(read_metadata(artifact), weights=weights, engine_gates=gates or {}, precision=precision)


def _gate(passed: bool, agreement: float) -> dict[str, object]:
    return {"precision": "bf16", "top1_agreement": agreement, "passed": passed, "engine": "openvino-bf16"}


def test_bf16_is_refused_where_its_gate_failed_or_never_ran(exported_tiny_patch: Path) -> None:
    failed = _meta(exported_tiny_patch, gates={"openvino-bf16": _gate(False, 0.83)})
    ok, why = gate_verdict(failed, OPENVINO_BF16)
    assert not ok
    assert "gate failed" in why
    assert "83.00%" in why
    ok, why = gate_verdict(_meta(exported_tiny_patch), OPENVINO_BF16)
    assert not ok
    assert "records no bf16 gate" in why
    assert gate_verdict(_meta(exported_tiny_patch, gates={"openvino-bf16": _gate(True, 1.0)}), OPENVINO_BF16)[0]
    # Random weights: recorded, not enforced (as fp16 and int8).
    ok, why = gate_verdict(
        _meta(exported_tiny_patch, "random_init", {"openvino-bf16": _gate(False, 0.5)}), OPENVINO_BF16
    )
    assert ok
    assert "not enforced" in why
    # float32 engines need no gate beyond parity; OpenVINO takes float32 graphs only.
    assert gate_verdict(failed, OPENVINO_ENGINE)[0]
    assert gate_verdict(failed, CPU_ENGINE)[0]
    assert not gate_verdict(_meta(exported_tiny_patch, precision="int8"), OPENVINO_ENGINE)[0]


def test_without_the_plugin_only_the_cpu_is_offered_and_why_is_said(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engines, "openvino_device", lambda: "the OpenVINO execution provider plugin is not installed")
    host = host_engines()
    assert host.offered == (CPU_ENGINE,)
    assert host.absent == {
        "openvino": "the OpenVINO execution provider plugin is not installed",
        "openvino-bf16": "the OpenVINO execution provider plugin is not installed",
    }


@needs_plugin
def test_without_bf16_in_the_cpu_bf16_is_not_offered_unless_emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    device, caps = engines.openvino_device()  # type: ignore[misc]
    without = {**caps, "OPTIMIZATION_CAPABILITIES": "WINOGRAD FP32 INT8 BIN EXPORT_IMPORT"}
    monkeypatch.setattr(engines, "openvino_device", lambda: (device, without))
    host = host_engines()
    assert host.offered == (CPU_ENGINE, OPENVINO_ENGINE)
    assert "no BF16 capability" in host.absent["openvino-bf16"]
    assert host_engines(emulated=True).offered == (CPU_ENGINE, OPENVINO_ENGINE, OPENVINO_BF16)
    with_bf16 = {**caps, "OPTIMIZATION_CAPABILITIES": "FP32 BF16 INT8"}
    monkeypatch.setattr(engines, "openvino_device", lambda: (device, with_bf16))
    assert OPENVINO_BF16 in host_engines().offered


@needs_plugin
@pytest.mark.parametrize(("engine", "tolerance"), [(OPENVINO_ENGINE, 1e-4), (OPENVINO_BF16, 5e-2)])
def test_openvino_computes_as_the_cpu_provider_within_its_precision(
    exported_tiny_patch: Path, engine: engines.Engine, tolerance: float
) -> None:
    """bf16 keeps 8 bits of mantissa: logits move by about 1e-2 of their scale (emulated where the CPU lacks
    it, with the same rounding); float32 stays float32 (OpenVINO's default on a CPU with AMX would be bf16)."""
    cpu = open_session(exported_tiny_patch, intra_op_threads=1)
    ov = open_session(exported_tiny_patch, intra_op_threads=1, engine=engine)
    assert ov.get_providers()[0] == "OpenVINOExecutionProvider"
    crop = read_metadata(exported_tiny_patch).preprocess.crop_size
    x = np.random.default_rng(0).integers(0, 256, (8, crop, crop, 3), dtype=np.uint8)
    want, got = cpu.run(None, {"image": x})[0], ov.run(None, {"image": x})[0]
    scale = float(np.abs(want).max())
    assert np.abs(got - want).max() <= tolerance * scale


def test_one_scheduler_the_sessions_threads_and_one_stream() -> None:
    config = engines.load_config(OPENVINO_BF16, 1)
    assert config == {
        "INFERENCE_PRECISION_HINT": "bf16",
        "INFERENCE_NUM_THREADS": "1",
        "NUM_STREAMS": "1",
        "ENABLE_CPU_PINNING": "NO",
    }
    assert engines.load_config(OPENVINO_ENGINE, 2)["INFERENCE_PRECISION_HINT"] == "f32"
